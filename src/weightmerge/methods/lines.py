"""LiNeS -- layer-increasing network scaling, an option of every task-vector method.

With ``lines_alpha`` set, the merged task vector of a method is rescaled per transformer block:

    theta_m' = theta_0 + s(l) * (theta_m - theta_0),     s(l) = alpha + beta * l / (L - 1)

for a tensor of block l (0-based) of L blocks: shallow blocks stay close to the base, deep
blocks keep (alpha + beta times) the merged update. Paper: Wang et al., "LiNeS: Post-training
Layer Scaling Prevents Forgetting and Enhances Model Merging" (ICLR 2025), arXiv:2410.17146.

Blocks are found from the tensor names: the number after ``layers.``, ``layer.``, ``h.``,
``blocks.``, ``block.`` or ``resblocks.`` (``model.layers.7.mlp.up_proj.weight`` is block 7).
Tensors outside the blocks get s = alpha when they sit before them (names matching embed, wte,
wpe, position, patch, cls_token, class_embedding, conv1 or ln_pre) and alpha + beta otherwise
(final norm, heads). L = 1 + the largest block index; with L = 1 (or no block at all) every
tensor gets alpha. ``lines_blocks`` gives L directly; otherwise L is read from the names in the
method's first statistics pass (a pass of its own for a method without one: one more read of the
inputs).

``wrap`` adds the parameters to a method spec and rescales its output; with ``lines_alpha``
unset (the default) the method is unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from weightmerge.methods.base import MethodSpec, Param, Reduce, StatRequest, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor

BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.(\d+)(?:\.|$)")
BEFORE_BLOCKS = re.compile(r"embed|wte|wpe|position|patch|cls_token|class_embedding|conv1|ln_pre")
BLOCKS_KEY = "lines.max_block"

PARAMS = (
    Param(
        "lines_alpha",
        "float",
        None,
        "LiNeS: scale of the merged task vector in the first block (unset: no LiNeS)",
        tensor_scoped=False,
    ),
    Param("lines_beta", "float", 0.0, "LiNeS: extra scale reached at the last block", tensor_scoped=False),
    Param(
        "lines_blocks",
        "int",
        None,
        "LiNeS: number of blocks L (unset: found from the tensor names)",
        low=1,
        tensor_scoped=False,
    ),
)


def block_index(name: str) -> int | None:
    """The block number in a tensor name, or None for a tensor outside the blocks."""
    m = BLOCK.search(name)
    return int(m.group(1)) if m else None


def scale(name: str, *, n_blocks: int, alpha: float, beta: float) -> float:
    """s(l) = alpha + beta * l / (L - 1) for the tensor ``name`` (see the module docstring)."""
    if n_blocks <= 1:
        return alpha
    idx = block_index(name)
    if idx is None:
        idx = 0 if BEFORE_BLOCKS.search(name) else n_blocks - 1
    return alpha + beta * min(idx, n_blocks - 1) / (n_blocks - 1)


def _block_partials(ctx: TensorCtx) -> Tensor:
    """(n_models, rows) float64 filled with the tensor's block index (-1 outside the blocks), for a
    max-reduction over the model: the largest block index."""
    idx = block_index(ctx.name)
    rows = 1 if len(ctx.full_shape) <= 1 else int(ctx.x.shape[1])
    return torch.full((ctx.n_models, rows), -1.0 if idx is None else float(idx), dtype=torch.float64)


def n_blocks(ctx: TensorCtx) -> int:
    given = ctx.params["lines_blocks"]
    if given is not None:
        return int(given)
    return int(ctx.stats[BLOCKS_KEY].max()) + 1


def wrap(spec: MethodSpec) -> MethodSpec:
    """``spec`` with the LiNeS parameters; its output rescaled per block when ``lines_alpha`` is set."""
    inner_apply = spec.apply
    inner_passes = spec.passes
    inner_check = spec.check

    def apply(ctx: TensorCtx) -> Any:
        p = ctx.params
        if p["lines_alpha"] is None:
            return inner_apply(ctx)
        assert ctx.base is not None
        base = ctx.base.clone()  # the method may reuse its buffers
        out = inner_apply(ctx)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"LiNeS needs a method that returns one merged tensor, not {type(out).__name__}")
        s = scale(ctx.name, n_blocks=n_blocks(ctx), alpha=p["lines_alpha"], beta=p["lines_beta"])
        return out.sub_(base).mul_(s).add_(base)

    def passes(p: Mapping[str, Any]) -> Sequence[Sequence[StatRequest]]:
        own = [list(requests) for requests in inner_passes(p)]
        if p["lines_alpha"] is None or p["lines_blocks"] is not None:
            return own
        find = Reduce(BLOCKS_KEY, _block_partials, op="max")
        if own:
            own[0].append(find)  # read in the method's first sweep: no extra pass
            return own
        return [[find]]

    def check(p: Mapping[str, Any], n: int) -> None:
        inner_check(p, n)
        if p["lines_alpha"] is None and (p["lines_beta"] != 0.0 or p["lines_blocks"] is not None):
            raise ValueError(f"method {spec.name!r}: lines_beta / lines_blocks need lines_alpha (LiNeS)")

    return dataclasses.replace(spec, params=spec.params + PARAMS, apply=apply, passes=passes, check=check)


def applies_to(spec: MethodSpec) -> bool:
    """Task-vector methods that return one merged model (EMR's per-task artifact excluded): LiNeS
    rescales their merged task vector."""
    return spec.inputs == "deltas" and spec.needs_base and spec.name != "emr"
