"""dare_linear / dare_ties -- DARE: randomly Drop task-vector entries And REscale the rest.

    keep_i    = [u_i < density_i],  u_i ~ U[0,1) seeded by (seed, tensor name, model i, element)
    tau_hat_i = r_i * keep_i * tau_i     r_i = |tau_i|_1 / |keep_i tau_i|_1   (rescale: l1, default;
                                                 1 when either norm < 1e-7 -- mergekit)
                                         r_i = 1 / density_i                  (rescale: inverse_keep, paper)
                                         r_i = 1                              (rescale: none)
    dare_linear: tau_m = sum_i w_i tau_hat_i            [/ sum_i w_i if normalize; |sum| < 1e-8 -> 1]
    dare_ties:   tau_m = sum_i w_i m_i tau_hat_i        [/ sum_i w_i m_i if normalize; 0 -> 1]
                 m_i = sign consensus of w_i tau_hat_i (elected sign of the sum, zero -> +1; no trim)
    theta_m = theta_0 + lambda * tau_m

Paper: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch" (ICML 2024), arXiv:2311.03099. mergekit 0.1.5 semantics, names and defaults
(``normalize`` false for both); the DARE paper's 1/(1-p) rescale is ``rescale: inverse_keep``.
Per tensor. The drop is element-wise and its draws depend only on (seed, tensor, model, element),
so results do not depend on tensor order or row-chunking; ``l1`` rescale needs whole-tensor norms
(not row-chunked), ``inverse_keep`` and ``none`` are element-wise. density 1 keeps everything
(no draws, no rescale).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from weightmerge import kernels
from weightmerge.methods._random import uniform
from weightmerge.methods._sign import agreement, elect_sign, merge_agreeing, model_view
from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor

RESCALE_EPS = 1e-7  # mergekit: no L1 rescale when either norm is below this
NORMALIZE_EPS = 1e-8  # mergekit: a weight sum below this (in magnitude) divides by 1


def drop_and_rescale(delta: Tensor, keep: Tensor, *, density: float, rescale: str) -> None:
    """In place on one model's delta: zero the dropped entries, then rescale the kept ones."""
    _drop_and_rescale(delta, keep.logical_not(), density=density, rescale=rescale)


def _drop_and_rescale(delta: Tensor, drop: Tensor, *, density: float, rescale: str) -> None:
    before = delta.abs().sum() if rescale == "l1" else None
    delta.masked_fill_(drop, 0.0)
    if rescale == "inverse_keep":
        delta.div_(density)
    elif before is not None:
        after = delta.abs().sum()
        if not (bool(before < RESCALE_EPS) or bool(after < RESCALE_EPS)):
            delta.mul_(before / after)


_DRAW_POOL: ThreadPoolExecutor | None = None


def _draw_pool() -> ThreadPoolExecutor:
    """One helper thread that draws the next model's uniforms while this one is dropped: torch's
    CPU generator is sequential (about a quarter of a DARE merge), and its draws do not depend on
    the thread that makes them."""
    global _DRAW_POOL
    if _DRAW_POOL is None:
        _DRAW_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wm-draw")
    return _DRAW_POOL


def dare_deltas(ctx: TensorCtx, densities: Sequence[float], *, rescale: str) -> Tensor:
    """DARE-process every model row of ``ctx.x`` in place and return it. Model i keeps the entries
    whose seeded uniform draw u (its slice of the tensor's draws) is < density; the drop mask is
    the complement u >= density (u is never NaN)."""
    todo = [(i, d) for i, d in enumerate(densities) if d < 1]
    if not todo:
        return ctx.x
    m, full = ctx.x[0].numel(), math.prod(ctx.full_shape)

    def draw(i: int) -> Tensor:
        return uniform(ctx.seed, ctx.name, i, ctx.element_offset, m, full)

    pool = _draw_pool() if len(todo) > 1 else None
    nxt: Future[Tensor] | None = pool.submit(draw, todo[0][0]) if pool is not None else None
    for k, (i, d) in enumerate(todo):
        u = nxt.result() if nxt is not None else draw(i)
        nxt = pool.submit(draw, todo[k + 1][0]) if pool is not None and k + 1 < len(todo) else None
        row = ctx.x[i]
        drop = (u.to(row.device) >= d).reshape(row.shape)
        del u
        _drop_and_rescale(row, drop, density=d, rescale=rescale)
    return ctx.x


def linear_sum(deltas: Tensor, weights: Tensor, *, normalize: bool) -> Tensor:
    """sum_i w_i delta_i, divided by sum_i w_i when ``normalize`` (|sum| < 1e-8 -> 1). Overwrites deltas."""
    mixed = deltas.mul_(model_view(weights, deltas)).sum(dim=0)
    if normalize:
        total = weights.to(deltas.dtype).sum()
        if bool(total.abs() >= NORMALIZE_EPS):
            mixed = mixed / total
    return mixed


def consensus_sum(deltas: Tensor, weights: Tensor, *, normalize: bool) -> Tensor:
    """mergekit sign consensus of the weighted deltas (zero sign -> +1). Overwrites deltas."""
    deltas.mul_(model_view(weights, deltas))
    agree = agreement(deltas, elect_sign(deltas, zero=1.0))
    return merge_agreeing(deltas, weights, agree, normalize=normalize)


def _consensus_kernel(
    base: Tensor, deltas: Tensor, weights: Tensor, *, normalize: bool, lam: float
) -> Tensor:
    """``base + lam * consensus_sum(deltas)`` by the fused TIES kernel with no trim: the same
    operations in the same order as the torch path, in one pass."""
    n = deltas.shape[0]
    merged, _ = kernels.ties_merge(
        deltas.reshape(n, -1),
        base.reshape(-1),
        weights,
        torch.zeros(n, dtype=deltas.dtype),
        torch.zeros(n, dtype=torch.int64),
        torch.zeros(n, dtype=torch.bool),
        unit=bool((weights == 1).all()),
        normalize=normalize,
        lam=lam,
        block=KERNEL_BLOCK,
    )
    return merged.reshape(base.shape)


KERNEL_BLOCK = 1 << 14


def _finish(ctx: TensorCtx, mixed: Tensor) -> Tensor:
    assert ctx.base is not None
    lam = float(ctx.params["lambda"])
    if lam != 1:
        mixed = mixed * lam
    return ctx.base + mixed


def _apply_linear(ctx: TensorCtx) -> Tensor:
    p = ctx.params
    x = dare_deltas(ctx, p["density"], rescale=p["rescale"])
    w = torch.tensor(p["weight"], dtype=x.dtype, device=x.device)
    return _finish(ctx, linear_sum(x, w, normalize=bool(p["normalize"])))


def _apply_ties(ctx: TensorCtx) -> Tensor:
    p = ctx.params
    x = dare_deltas(ctx, p["density"], rescale=p["rescale"])
    w = torch.tensor(p["weight"], dtype=x.dtype, device=x.device)
    assert ctx.base is not None
    if kernels.usable(ctx.base, x):  # one fused pass, same bits as the torch path
        lam = float(p["lambda"])
        return _consensus_kernel(ctx.base, x, w, normalize=bool(p["normalize"]), lam=lam)
    return _finish(ctx, consensus_sum(x, w, normalize=bool(p["normalize"])))


def _params(normalize_help: str) -> tuple[Param, ...]:
    return (
        Param("weight", "float", 1.0, "weight of each model's task vector", per_model=True),
        Param(
            "density",
            "float",
            1.0,
            "probability of keeping each task-vector entry (1 - drop rate); 1 = no drop",
            per_model=True,
            low=0.0,
            low_open=True,
            high=1.0,
        ),
        Param("lambda", "float", 1.0, "scale of the merged task vector"),
        Param("normalize", "bool", False, normalize_help),
        Param(
            "rescale",
            "str",
            "l1",
            "l1: match each task vector's L1 norm (mergekit); inverse_keep: 1/density (DARE paper); none",
            choices=("l1", "inverse_keep", "none"),
            tensor_scoped=False,
            mergekit_values=((True, "l1"), (False, "none")),
        ),
    )


def _draws_nothing(p: Mapping[str, Any]) -> bool:
    """The model order matters only through the random draws (seeded by the model's index): none
    are made when density 1 drops nothing."""
    return all(d >= 1 for d in p["density"])


LINEAR_SPEC = MethodSpec(
    name="dare_linear",
    summary="DARE: drop task-vector entries at random, rescale, add the weighted sum to the base.",
    paper="https://arxiv.org/abs/2311.03099",
    params=_params("divide by the sum of weights"),
    apply=_apply_linear,
    row_chunkable=lambda p: p["rescale"] != "l1",
    order_invariant=_draws_nothing,
    examples=({"density": 0.6}, {"density": 0.5, "rescale": "inverse_keep", "normalize": True}),
)

TIES_SPEC = MethodSpec(
    name="dare_ties",
    summary="DARE drop/rescale, then TIES sign consensus (no magnitude trim).",
    paper="https://arxiv.org/abs/2311.03099",
    params=_params("divide by the sum of agreeing weights"),
    apply=_apply_ties,
    row_chunkable=lambda p: p["rescale"] != "l1",
    order_invariant=_draws_nothing,
    examples=({"density": 0.5}, {"density": 0.5, "rescale": "inverse_keep"}),
)
