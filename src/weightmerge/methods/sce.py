"""sce -- SCE: Select (by variance), Calculate (weights), Erase (minority signs), merge.

Per tensor, with task vectors tau_i = theta_i - theta_0 (n models):

    select:   with k = floor(select_topk * #{p: var_p > 0}), var_p = population variance over models,
              keep the k entries of largest variance in every tau_i (select_topk 1: keep all)
    erase:    elected_p = +1 if sum_i tau_{i,p} >= 0 else -1;  m_{i,p} = [sign(tau_{i,p}) = elected_p]
    weights:  c_i = mean_p(tau_{i,p}^2) / sum_j mean_p(tau_{j,p}^2)    (1/n if that sum < 1e-6)
    tau_m   = sum_i c_i m_i tau_i / max(sum_i c_i m_i, 1e-6)
    theta_m = theta_0 + tau_m

Paper: Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (2024), arXiv:2408.07990.
mergekit 0.1.5 semantics and names (``select_topk``, default 1.0; no per-model weights). The 1e-6
thresholds are absolute, as in mergekit: task vectors whose mean squares sum below 1e-6 (small
fine-tuning deltas) get equal weights. Ties in variance are broken by the lowest flat index.
Per tensor (variance ranking and mean squares over the tensor), not row-chunked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from weightmerge.methods._sign import agreement, elect_sign
from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor

WEIGHT_FLOOR = 1e-6


def variance_mask(tvs: Tensor, *, select_topk: float) -> Tensor:
    """Bool (*shape): the floor(select_topk * #nonzero-variance) entries of largest variance."""
    var = tvs.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    keep = torch.zeros(var.numel(), dtype=torch.bool, device=var.device)
    if k > 0:
        order = torch.sort(var.reshape(-1), descending=True, stable=True).indices
        keep[order[:k]] = True
    return keep.reshape(var.shape)


def sce_weights(tvs: Tensor) -> Tensor:
    """(n,) mean square of each task vector, normalised to sum 1 (uniform if the sum < 1e-6)."""
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = float(w.sum())
    if abs(total) < WEIGHT_FLOOR:
        return torch.full_like(w, 1.0 / w.shape[0])
    return w / total


def sce_merge(base: Tensor, tvs: Tensor, *, select_topk: float) -> Tensor:
    """base: (*shape); tvs: (n, *shape) task vectors (overwritten) -> merged weights."""
    if select_topk < 1:
        tvs.mul_(variance_mask(tvs, select_topk=select_topk).to(tvs.dtype))
    agree = agreement(tvs, elect_sign(tvs, zero=1.0))
    c = sce_weights(tvs).reshape(-1, *([1] * (tvs.dim() - 1)))
    erased = c * agree.to(tvs.dtype)  # (n, *shape)
    merged = (tvs * erased).sum(dim=0)
    return base + merged / erased.sum(dim=0).clamp(min=WEIGHT_FLOOR)


def _apply(ctx: TensorCtx) -> Tensor:
    assert ctx.base is not None
    return sce_merge(ctx.base, ctx.x, select_topk=float(ctx.params["select_topk"]))


SPEC = MethodSpec(
    name="sce",
    summary="SCE: keep high-variance entries, erase minority signs, mean-square-weighted merge.",
    paper="https://arxiv.org/abs/2408.07990",
    params=(
        Param(
            "select_topk",
            "float",
            1.0,
            "fraction of the (non-zero-variance) entries kept, by variance across models",
            low=0.0,
            high=1.0,
        ),
        Param("int8_mask", "bool", False, "accepted for mergekit configs; no effect", tensor_scoped=False),
    ),
    apply=_apply,
    row_chunkable=False,
    order_invariant=True,
    examples=({"select_topk": 0.5},),
)
