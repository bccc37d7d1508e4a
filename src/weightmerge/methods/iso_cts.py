"""iso_cts -- Isotropic merging in common and task-specific subspaces (Iso-CTS).

Per 2-D tensor, with T task vectors tau_t (m, n), k = min(m, n), f = ``common_fraction``:

    p       = round((k - floor(f k)) / T)      task-specific directions per task (round half to
                                               even, as Python), at most floor(k / T)
    c       = k - T p                          common directions (so c + T p = k)
    U S V^T = sum_t tau_t                      (thin SVD, float64); U_c, S_c, V_c: its top c
    tau_t'  = tau_t - U_c U_c^T tau_t          each task vector with the common subspace removed
    U_t' S_t' V_t'^T = tau_t'                  (thin SVD); its top p triplets
    U*      = [U_1'[:, :p] ... U_T'[:, :p]  U_c]      (m, k),  V*^T likewise (k, n)
    S*      = [S_1'[:p] ... S_T'[:p]  S_c]            (k,)
    tau_m   = mean(S*) polar(U*) polar(V*^T)   polar(A) = P Q^T for A = P Sigma Q^T
Every other tensor: tau_m = mean_t tau_t.        theta_m = theta_0 + lambda * tau_m.

Paper: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces" (ICML 2025), arXiv:2502.04959. Semantics of fusion_bench 0.2.33
``iso_cts`` (``common_space_fraction`` = our ``common_fraction``, ``scaling_factor`` = ``lambda``).
The column order inside U* and V*^T does not change the result (the polar factor commutes with
permutations). fusion_bench's p can exceed k / T when f is small (then its c < 0 and the slices
break); we cap p at floor(k / T).

Degenerate cases: as for ``iso_c``, singular directions of value 0 (rank-deficient inputs) are
LAPACK's choice and get weight mean(S*); task vectors with a dense component are full rank.
Per tensor, not row-chunked; memory: T + 3 SVDs of at most (m, n) in float64, one at a time, plus
the stacked factors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from weightmerge.methods._svd import check_finite, is_matrix, polar, svd64
from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor


def subspace_sizes(*, k: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(c, p): common directions and task-specific directions per task, with c + n_tasks p = k."""
    p = round((k - int(k * common_fraction)) / n_tasks)
    p = min(p, k // n_tasks)
    return k - n_tasks * p, p


def iso_cts_matrix(tau: Tensor, *, common_fraction: float) -> Tensor:
    """tau: (T, m, n) task vectors -> the Iso-CTS merged matrix (m, n), float64."""
    n_tasks, m, n = tau.shape
    c, p = subspace_sizes(k=min(m, n), n_tasks=n_tasks, common_fraction=common_fraction)
    u, s, vh = svd64(tau.sum(dim=0))
    u_c, s_c, vh_c = u[:, :c], s[:c], vh[:c]
    del u, s, vh
    us, ss, vhs = [], [], []
    for t in range(n_tasks):
        w = tau[t].to(torch.float64)
        w = w - u_c @ (u_c.T @ w)
        ut, st, vht = svd64(w)
        us.append(ut[:, :p])
        ss.append(st[:p])
        vhs.append(vht[:p])
    s_all = torch.cat([*ss, s_c])
    u_all = polar(torch.cat([*us, u_c], dim=1))
    vh_all = polar(torch.cat([*vhs, vh_c], dim=0))
    return (u_all * s_all.mean()) @ vh_all


def _apply(ctx: TensorCtx) -> Tensor:
    assert ctx.base is not None
    check_finite(ctx, "iso_cts")
    if is_matrix(ctx):
        merged = iso_cts_matrix(ctx.x, common_fraction=ctx.params["common_fraction"]).to(ctx.x.dtype)
    else:
        merged = ctx.x.mean(dim=0)
    return ctx.base + ctx.params["lambda"] * merged


SPEC = MethodSpec(
    name="iso_cts",
    summary="Isotropic merging with a common subspace plus task-specific directions (no data).",
    paper="https://arxiv.org/abs/2502.04959",
    params=(
        Param("lambda", "float", 1.0, "scale of the merged task vector (the paper tunes it on validation)"),
        Param(
            "common_fraction",
            "float",
            0.8,
            "fraction of the rank given to the common subspace of the summed task vectors",
            low=0.0,
            high=1.0,
        ),
    ),
    apply=_apply,
    row_chunkable=False,
    order_invariant=True,
    examples=({"common_fraction": 0.5, "lambda": 1.2},),
)
