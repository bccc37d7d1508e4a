"""model_stock -- Model Stock: move from the base towards the average by a geometry-derived ratio.

Per tensor (or per filter), with N >= 2 fine-tuned models and offsets tau_i = theta_i - theta_0:

    cos_ij = <tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6), clamped to [-1, 1]
    cos    = mean over pairs i < j of cos_ij            (mergekit; fusion_bench averages angles)
    t      = N cos / (1 + (N - 1) cos)                   (t = 0, i.e. the base, if |1 + (N-1) cos| < 1e-6)
    theta_m = t * mean_i theta_i + (1 - t) * theta_0  =  theta_0 + t * mean_i tau_i

Paper: Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models" (ECCV 2024),
arXiv:2403.19522. mergekit 0.1.5 semantics and names. t is not clipped (negative cosines give
t < 0). ``filter_wise: false`` (default) flattens the whole tensor (not row-chunked);
``filter_wise: true`` takes one ratio per vector along the last dimension (each row of a matrix; a
1-D tensor is one vector), which is row-chunkable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor

NORM_FLOOR = 1e-6
SINGULAR = 1e-6


def stock_ratio(deltas: Tensor) -> Tensor:
    """deltas: (n, ..., k) vectors along the last dim -> t of shape (..., 1)."""
    n = deltas.shape[0]
    norms = torch.linalg.vector_norm(deltas, dim=-1)  # (n, ...)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = (deltas[i] * deltas[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=NORM_FLOOR)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    den = 1 + (n - 1) * cos
    singular = den.abs() < SINGULAR
    t = (n * cos) / torch.where(singular, torch.ones_like(den), den)
    return torch.where(singular, torch.zeros_like(t), t)


def model_stock_merge(base: Tensor, weights: Tensor, *, filter_wise: bool) -> Tensor:
    """base: (*shape); weights: (n, *shape), overwritten -> t * mean_i theta_i + (1 - t) theta_0."""
    average = weights.sum(dim=0) / weights.shape[0]
    deltas = weights.sub_(base)
    if filter_wise and base.dim() >= 2:
        t = stock_ratio(deltas)  # (*shape[:-1], 1): one ratio per vector along the last dim
    else:
        t = stock_ratio(deltas.reshape(deltas.shape[0], -1)).reshape(())  # whole tensor
    return t * average + (1 - t) * base


def _apply(ctx: TensorCtx) -> Tensor:
    assert ctx.base is not None
    return model_stock_merge(ctx.base, ctx.x, filter_wise=bool(ctx.params["filter_wise"]))


def _row_chunkable(params: Mapping[str, Any]) -> bool:
    return bool(params["filter_wise"])


SPEC = MethodSpec(
    name="model_stock",
    summary="Model Stock: interpolate base -> average by a ratio from the task vectors' angle.",
    paper="https://arxiv.org/abs/2403.19522",
    params=(
        Param(
            "filter_wise",
            "bool",
            False,
            "one ratio per row (vector along the last dim) instead of per tensor",
            tensor_scoped=False,
        ),
    ),
    apply=_apply,
    inputs="weights",
    min_models=2,
    row_chunkable=_row_chunkable,
    order_invariant=True,
    examples=({"filter_wise": True},),
)
