"""breadcrumbs / breadcrumbs_ties -- Model Breadcrumbs: drop the smallest AND the largest deltas.

Per tensor and model, with N elements, density d and outlier fraction gamma:

    t     = floor(d * N)                    entries kept
    n_top = floor(gamma * N)                largest-|tau| outliers dropped
    n_bot = max(0, N - t - n_top)           smallest-|tau| entries dropped
    keep_i = ranks [n_bot, n_bot + t) of |tau_i| sorted ascending
    tau_hat_i = keep_i * tau_i              (rescale: true -> times |tau_i|_1 / |tau_hat_i|_1)
    breadcrumbs:      tau_m = sum_i w_i tau_hat_i        [/ sum_i w_i if normalize; |sum| < 1e-8 -> 1]
    breadcrumbs_ties: tau_m = sum_i w_i m_i tau_hat_i    [/ sum_i w_i m_i if normalize; 0 -> 1]
                      m_i = TIES sign consensus of w_i tau_hat_i (elected sign of the sum, 0 -> +1)
    theta_m = theta_0 + lambda * tau_m

Paper: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks" (ECCV 2024), arXiv:2312.06795. mergekit 0.1.5 semantics, names and defaults (gamma 0.01,
normalize false, rescale false, density 1 = no trim). When t + n_top > N the outlier cut shrinks so
that t entries are kept (n_bot = 0: the t smallest). density 1 leaves the task vector untouched
(the gamma cut too), density 0 zeroes it. Equal magnitudes are ordered by flat index (stable sort);
mergekit's unstable sort may order them differently. Magnitudes are sorted in the compute dtype
(mergekit sorts CPU magnitudes in float32). Per tensor (a sort of each task vector), not
row-chunked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from weightmerge.methods.base import MethodSpec, Param, TensorCtx
from weightmerge.methods.dare import consensus_sum, drop_and_rescale, linear_sum

if TYPE_CHECKING:
    from torch import Tensor


def breadcrumbs_keep(delta: Tensor, *, density: float, gamma: float) -> Tensor:
    """Bool mask of ``delta``'s shape: ranks [n_bot, n_bot + t) of |delta| in ascending order."""
    numel = delta.numel()
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bot = max(0, numel - target - n_top)
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    keep = torch.zeros(numel, dtype=torch.bool, device=delta.device)
    keep[order[n_bot : n_bot + target]] = True
    return keep.reshape(delta.shape)


def breadcrumbs_deltas(
    x: Tensor, densities: tuple[float, ...], gammas: tuple[float, ...], *, rescale: bool
) -> Tensor:
    """Trim every model row of ``x`` (n, *shape) in place; returns ``x``."""
    for i, (d, g) in enumerate(zip(densities, gammas, strict=True)):
        if d < 1:
            keep = breadcrumbs_keep(x[i], density=d, gamma=g)
            drop_and_rescale(x[i], keep, density=d, rescale="l1" if rescale else "none")
    return x


def _make_apply(combine: Callable[..., Tensor]) -> Callable[[TensorCtx], Tensor]:
    def apply(ctx: TensorCtx) -> Tensor:
        assert ctx.base is not None
        p = ctx.params
        x = breadcrumbs_deltas(ctx.x, p["density"], p["gamma"], rescale=bool(p["rescale"]))
        w = torch.tensor(p["weight"], dtype=x.dtype, device=x.device)
        mixed = combine(x, w, normalize=bool(p["normalize"]))
        lam = float(p["lambda"])
        return ctx.base + (mixed * lam if lam != 1 else mixed)

    return apply


def _params(normalize_help: str) -> tuple[Param, ...]:
    return (
        Param("weight", "float", 1.0, "weight of each model's task vector", per_model=True),
        Param(
            "density",
            "float",
            1.0,
            "fraction of each task vector kept (1 = no trim)",
            per_model=True,
            low=0.0,
            high=1.0,
        ),
        Param(
            "gamma",
            "float",
            0.01,
            "fraction of the largest-magnitude entries dropped as outliers",
            per_model=True,
            low=0.0,
            high=1.0,
        ),
        Param("lambda", "float", 1.0, "scale of the merged task vector"),
        Param("normalize", "bool", False, normalize_help),
        Param("rescale", "bool", False, "rescale each trimmed task vector to its original L1 norm"),
        Param("int8_mask", "bool", False, "accepted for mergekit configs; no effect", tensor_scoped=False),
    )


SPEC = MethodSpec(
    name="breadcrumbs",
    summary="Model Breadcrumbs: drop the smallest and the largest deltas, add the weighted sum.",
    paper="https://arxiv.org/abs/2312.06795",
    params=_params("divide by the sum of weights"),
    apply=_make_apply(linear_sum),
    row_chunkable=False,
    order_invariant=True,
    examples=({"density": 0.5, "gamma": 0.1},),
)

TIES_SPEC = MethodSpec(
    name="breadcrumbs_ties",
    summary="Model Breadcrumbs trim, then TIES sign consensus.",
    paper="https://arxiv.org/abs/2312.06795",
    params=_params("divide by the sum of agreeing weights"),
    apply=_make_apply(consensus_sum),
    row_chunkable=False,
    order_invariant=True,
    examples=({"density": 0.5, "gamma": 0.1, "normalize": True},),
)
