"""della / della_linear -- DELLA: magnitude-ranked random drop (MagPrune), rescale, merge.

Per tensor and model, with density d and epsilon e (2-D and larger tensors: ranks within each
slice along dim 1, e.g. each row of a matrix; 0-/1-D tensors: one row):

    r        = rank of |tau| in its row, 0 = smallest (ties by position), m = row length
    p        = (d - e) + 2 e * r / (m - 1)              keep probability; r/(m-1) := 1/2 if m = 1
    keep     = [u < p],  u ~ U[0,1) seeded by (seed, tensor name, model i, element)
    tau_hat  = keep * tau * s                            rescale (default true):
                 s = |tau|_1 / |keep tau|_1                rescale_mode l1 (mergekit; 1 if a norm < 1e-7)
                 s = 1 / p (element-wise)                  rescale_mode inverse_keep (the paper)
    della:        tau_m = sum_i w_i m_i tau_hat_i / sum_i w_i m_i   (normalize true; 0 -> 1)
                  m_i = TIES sign consensus of w_i tau_hat_i (elected sign of the sum, 0 -> +1)
    della_linear: tau_m = sum_i w_i tau_hat_i                       (normalize false)
    theta_m = theta_0 + lambda * tau_m

Paper: Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling" (2024), arXiv:2406.11617. mergekit 0.1.5 semantics, names and defaults
(epsilon 0.15, rescale true; normalize true for della, false for della_linear); d +/- e must lie
in (0, 1) when 0 < d < 1. density 1 keeps the task vector untouched, density 0 zeroes it.
Draws come from ``weightmerge.methods._random.uniform`` (mergekit uses the global torch RNG), so
results depend only on (seed, tensor, model, element). The ranks are computed within rows, so the
method is row-chunkable unless the L1 rescale (a whole-tensor norm) is on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from weightmerge.methods._random import uniform
from weightmerge.methods.base import MethodSpec, Param, TensorCtx
from weightmerge.methods.dare import consensus_sum, drop_and_rescale, linear_sum

if TYPE_CHECKING:
    from torch import Tensor


def della_keep_probability(delta: Tensor, *, density: float, epsilon: float) -> Tensor:
    """p = (d - e) + 2 e * rank_norm, ranks of |delta| along dim 1 (0-/1-D: one row); delta's shape."""
    rows = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    m = rows.shape[1]
    if m <= 1:
        rank_norm = torch.full(rows.shape, 0.5, dtype=delta.dtype, device=delta.device)
    else:
        order = torch.argsort(rows.abs(), dim=1, stable=True)
        steps = torch.arange(m, device=delta.device).reshape(1, m, *([1] * (rows.dim() - 2))).expand_as(order)
        ranks = torch.empty_like(order).scatter_(1, order, steps)
        rank_norm = ranks.to(delta.dtype) / (m - 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(delta.shape)


def check_della_bounds(density: float, epsilon: float, where: str) -> None:
    if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise ValueError(
            f"della{where}: density {density} +/- epsilon {epsilon} must lie in (0, 1); "
            "lower epsilon or move density away from 0 and 1"
        )


def della_deltas(ctx: TensorCtx, *, rescale: bool, mode: str) -> Tensor:
    """MagPrune every model row of ``ctx.x`` in place and return it."""
    p = ctx.params
    full = math.prod(ctx.full_shape)
    for i, (d, e) in enumerate(zip(p["density"], p["epsilon"], strict=True)):
        if d >= 1:
            continue
        row = ctx.x[i]
        if d <= 0:
            row.zero_()
            continue
        check_della_bounds(d, e, f" (tensor {ctx.name!r}, model {i})")
        prob = della_keep_probability(row, density=d, epsilon=e)
        u = uniform(ctx.seed, ctx.name, i, ctx.element_offset, row.numel(), full).reshape(row.shape)
        keep = u.to(device=prob.device, dtype=prob.dtype) < prob
        if rescale and mode == "inverse_keep":
            row.masked_fill_(~keep, 0.0).div_(prob)
        else:
            drop_and_rescale(row, keep, density=d, rescale="l1" if rescale else "none")
    return ctx.x


def _make_apply(combine: Callable[..., Tensor]) -> Callable[[TensorCtx], Tensor]:
    def apply(ctx: TensorCtx) -> Tensor:
        assert ctx.base is not None
        p = ctx.params
        x = della_deltas(ctx, rescale=bool(p["rescale"]), mode=str(p["rescale_mode"]))
        w = torch.tensor(p["weight"], dtype=x.dtype, device=x.device)
        mixed = combine(x, w, normalize=bool(p["normalize"]))
        lam = float(p["lambda"])
        return ctx.base + (mixed * lam if lam != 1 else mixed)

    return apply


def _check(params: Mapping[str, Any], n_models: int) -> None:
    for i, (d, e) in enumerate(zip(params["density"], params["epsilon"], strict=True)):
        if d is not None and e is not None:
            check_della_bounds(d, e, f" (model {i})")


def _row_chunkable(params: Mapping[str, Any]) -> bool:
    return not params["rescale"] or params["rescale_mode"] == "inverse_keep"


def _params(normalize: bool, normalize_help: str) -> tuple[Param, ...]:
    return (
        Param("weight", "float", 1.0, "weight of each model's task vector", per_model=True),
        Param(
            "density",
            "float",
            1.0,
            "mean fraction of each task vector kept (1 = no drop)",
            per_model=True,
            low=0.0,
            high=1.0,
        ),
        Param(
            "epsilon",
            "float",
            0.15,
            "keep probabilities range over density +/- epsilon by magnitude rank",
            per_model=True,
            low=0.0,
            high=0.5,
            high_open=True,
        ),
        Param("lambda", "float", 1.0, "scale of the merged task vector"),
        Param("normalize", "bool", normalize, normalize_help),
        Param(
            "rescale",
            "bool",
            True,
            "rescale the kept entries (see rescale_mode)",
            tensor_scoped=False,
        ),
        Param(
            "rescale_mode",
            "str",
            "l1",
            "l1: match each task vector's L1 norm (mergekit); inverse_keep: divide by p (the paper)",
            choices=("l1", "inverse_keep"),
            tensor_scoped=False,
        ),
        Param("int8_mask", "bool", False, "accepted for mergekit configs; no effect", tensor_scoped=False),
    )


def _draws_nothing(p: Mapping[str, Any]) -> bool:
    """The model order matters only through the random draws (seeded by the model's index): none
    are made when density 1 drops nothing."""
    return all(d >= 1 for d in p["density"])


SPEC = MethodSpec(
    name="della",
    summary="DELLA: magnitude-ranked random drop, rescale, TIES sign consensus.",
    paper="https://arxiv.org/abs/2406.11617",
    params=_params(True, "divide by the sum of agreeing weights"),
    apply=_make_apply(consensus_sum),
    row_chunkable=_row_chunkable,
    check=_check,
    order_invariant=_draws_nothing,
    examples=({"density": 0.6, "epsilon": 0.1}, {"density": 0.6, "rescale_mode": "inverse_keep"}),
)

LINEAR_SPEC = MethodSpec(
    name="della_linear",
    summary="DELLA drop and rescale, then the weighted sum of task vectors.",
    paper="https://arxiv.org/abs/2406.11617",
    params=_params(False, "divide by the sum of weights"),
    apply=_make_apply(linear_sum),
    row_chunkable=_row_chunkable,
    check=_check,
    order_invariant=_draws_nothing,
    examples=({"density": 0.6, "epsilon": 0.1},),
)
