"""fisher -- Fisher-weighted averaging of full weights (diagonal Fisher).

    F_i  <- F_i + eps                                   (eps = minimal_fisher_weight, default 1e-6)
    theta_m = sum_i s_i F_i theta_i / sum_i s_i F_i     (element-wise)

with ``s_i`` the per-model ``weight`` (default 1.0; only ratios matter) and, when
``normalize_fisher_weight`` is true (the default, as in MergeLM and fusion_bench),

    s_i <- s_i * (1 / (||F_i|| + eps)) / sum_j (1 / (||F_j|| + eps))

where ``||F_i||`` is the L2 norm of model i's *raw* Fisher over every merged tensor (one
statistics pass, float64). This rescales each model's Fisher to a comparable overall size.

Paper: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging" (NeurIPS 2022),
arXiv:2111.09832. Semantics and names of the merge step follow MergeLM / fusion_bench
(``merging_with_fisher_weights``). The Fisher itself (squared gradients on each model's own task
data) is computed outside this method and passed as ``fisher: [dict name -> tensor, ...]``, one dict
per model, each tensor the same shape as the parameter.

Scope: per element (chunkable); the normalisation statistic spans the whole model. Variant
choices:

* a tensor with no Fisher for any model is an error naming it (``missing_fisher: error``, the
  default); ``missing_fisher: average`` merges it as if every model's Fisher were the same constant,
  i.e. ``sum_i s_i theta_i / sum_i s_i``. Exclude heads etc. with ``exclude``.
* Fisher values must be finite and >= 0. Weights must be >= 0 with a positive sum.
* with ``minimal_fisher_weight: 0`` an element whose Fisher is 0 for every model gets the
  ``s``-weighted average there (never 0/0); with normalisation, a model whose Fisher is all zero
  is an error (its 1/||F|| is infinite).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from weightmerge.methods.aux import check_stats_param
from weightmerge.methods.base import MethodSpec, Param, Reduce, StatRequest, TensorCtx, row_partials

NORM_KEY = "fisher_sq_sum"  # per-model sum of squared raw Fisher values over the merged tensors


def fisher_coefficients(
    weights: torch.Tensor, *, fisher_sq_sum: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """(n,) float64 coefficients s_i, normalised by 1/(||F_i|| + eps) when ``fisher_sq_sum`` is given."""
    s = weights.to(torch.float64)
    if fisher_sq_sum is None:
        return s
    inv = 1.0 / (fisher_sq_sum.to(torch.float64).sqrt() + eps)
    if not bool(torch.isfinite(inv).all()):
        zero = [i for i, v in enumerate(inv.tolist()) if v == float("inf")]
        raise ValueError(
            f"fisher: normalize_fisher_weight with an all-zero Fisher for model(s) {zero} and "
            "minimal_fisher_weight 0; set minimal_fisher_weight > 0 or normalize_fisher_weight: false"
        )
    return s * inv / inv.sum()


def fisher_merge(x: torch.Tensor, fisher: torch.Tensor, coeffs: torch.Tensor, *, eps: float) -> torch.Tensor:
    """x: (n, *shape) weights (overwritten); fisher: (n, *shape) raw F_i (overwritten); coeffs: (n,).

    Returns sum_i c_i (F_i + eps) x_i / sum_i c_i (F_i + eps); where the denominator is 0, the
    c-weighted average sum_i c_i x_i / sum_i c_i.
    """
    c = coeffs.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    weight = fisher.add_(eps).mul_(c)  # (n, *shape)
    den = weight.sum(dim=0)
    safe = den != 0
    if bool(safe.all()):
        return x.mul_(weight).sum(dim=0).div_(den)
    plain = (x * c).sum(dim=0) / c.sum()
    num = x.mul_(weight).sum(dim=0)
    return torch.where(safe, num / torch.where(safe, den, torch.ones_like(den)), plain)


def _check_fisher_values(name: str, fisher: torch.Tensor) -> None:
    if not bool(torch.isfinite(fisher).all()):
        raise ValueError(f"fisher: statistics for tensor {name!r} contain NaN or infinity")
    if bool((fisher < 0).any()):
        raise ValueError(f"fisher: statistics for tensor {name!r} contain negative values (a Fisher is >= 0)")


def _check_weights(name: str, weights: Sequence[float]) -> None:
    if sum(weights) <= 0:
        raise ValueError(f"fisher: the weights {list(weights)} of tensor {name!r} sum to 0")


def _apply(ctx: TensorCtx) -> torch.Tensor:
    p = ctx.params
    _check_weights(ctx.name, p["weight"])
    eps = float(p["minimal_fisher_weight"])
    weights = torch.tensor(p["weight"], dtype=torch.float64, device=ctx.x.device)
    coeffs = fisher_coefficients(
        weights, fisher_sq_sum=ctx.stats.get(NORM_KEY) if p["normalize_fisher_weight"] else None, eps=eps
    )
    fisher = ctx.aux.get("fisher")
    if fisher is None:
        if p["missing_fisher"] == "error":
            raise ValueError(
                f"fisher: no Fisher statistics for tensor {ctx.name!r}; give them for every model, "
                "exclude the tensor, or set missing_fisher: average"
            )
        c = coeffs.to(ctx.x.dtype).reshape(-1, *([1] * (ctx.x.dim() - 1)))
        return (ctx.x * c).sum(dim=0) / c.sum()
    _check_fisher_values(ctx.name, fisher)
    return fisher_merge(ctx.x, fisher, coeffs, eps=eps)


def _sq_partials(ctx: TensorCtx) -> torch.Tensor:
    fisher = ctx.aux.get("fisher")
    if fisher is None:
        rows = 1 if len(ctx.full_shape) <= 1 else int(ctx.x.shape[1])
        return torch.zeros((ctx.n_models, rows), dtype=torch.float64, device=ctx.x.device)
    _check_fisher_values(ctx.name, fisher)
    return row_partials(fisher.to(torch.float64).square(), len(ctx.full_shape))


def _passes(params: Mapping[str, Any]) -> list[list[StatRequest]]:
    if not params.get("normalize_fisher_weight", True):
        return []
    return [[Reduce(key=NORM_KEY, fn=_sq_partials, op="sum")]]


def _check(params: Mapping[str, Any], n_models: int) -> None:
    check_stats_param("fisher", params.get("fisher"), n_models)


SPEC = MethodSpec(
    name="fisher",
    summary="Fisher-weighted average of the models' weights (diagonal Fisher given per model).",
    paper="https://arxiv.org/abs/2111.09832",
    params=(
        Param(
            "fisher",
            "stats",
            None,
            "diagonal Fisher per model: a list of dicts tensor name -> tensor of the parameter's shape",
            required=True,
        ),
        Param("weight", "float", 1.0, "scaling coefficient s_i of each model", per_model=True, low=0.0),
        Param(
            "normalize_fisher_weight",
            "bool",
            True,
            "scale each model's coefficient by 1/(global L2 norm of its Fisher + eps), normalised",
            tensor_scoped=False,
        ),
        Param(
            "minimal_fisher_weight",
            "float",
            1e-6,
            "eps added to every Fisher value (and to the norms)",
            low=0.0,
            tensor_scoped=False,
        ),
        Param(
            "missing_fisher",
            "str",
            "error",
            "tensors with no Fisher for any model: error, or average (as if all Fishers were equal)",
            choices=("error", "average"),
        ),
    ),
    apply=_apply,
    inputs="weights",
    needs_base=False,
    passes=_passes,
    row_chunkable=True,
    check=_check,
    order_invariant=True,
    examples=({"normalize_fisher_weight": False},),
)
