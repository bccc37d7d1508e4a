"""tsv_m -- Task Singular Vectors: Merge (TSV-M).

Per 2-D tensor, with T task vectors tau_t = w_t (theta_t - theta_0) of shape (m, n), k = min(m, n),
r = floor(k / T):

    tau_t = U_t S_t V_t^T                     (thin SVD, float64)
    U     = [U_1[:, :r] ... U_T[:, :r]]       (m, T r)   each task's top r singular triplets,
    S     = diag(S_1[:r], ..., S_T[:r])                  stacked side by side
    V^T   = [V_1^T[:r]; ...; V_T^T[:r]]       (T r, n)
    tau_m = polar(U) S polar(V^T)             polar(A) = P Q^T for A = P Sigma Q^T (the nearest
                                              matrix with orthonormal columns / rows)
Every other tensor: tau_m = mean_t tau_t.       theta_m = theta_0 + lambda * tau_m.

Paper: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging"
(CVPR 2025), arXiv:2412.00081. Semantics of fusion_bench 0.2.33 ``TaskSingularVectorMerging``
(``compute_and_sum_svd_mem_reduction``): ``weight`` is its per-model alpha (scales each task
vector before the SVD), ``lambda`` its scalar alpha (scales the whole merged task vector, averaged
tensors included). fusion_bench leaves the k - T r trailing columns of the stacked U and V^T at
zero; their singular values are zero, so dropping them (as we do) gives the same tau_m.

Degenerate cases (documented, finite): a matrix with fewer than T singular values (r = 0) keeps
the base (tau_m = 0, as fusion_bench). Singular triplets with a zero singular value (a task vector
of rank < r, e.g. all zero) are left out of the stacks: LAPACK's directions for them are arbitrary
and would otherwise move the polar factors. A stack that is still rank deficient (e.g. two
identical experts) has no unique polar factor; the result is then LAPACK's choice, as in
fusion_bench. Per tensor, not row-chunked; memory: the T truncated
factors plus two SVDs of (m, T r) and (T r, n) matrices, in float64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from weightmerge.methods._svd import check_finite, is_matrix, per_model, polar, svd64
from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor


def tsv_merge_matrix(tau: Tensor) -> Tensor:
    """tau: (T, m, n) task vectors (already weighted) -> the TSV-M merged matrix (m, n), float64."""
    n_tasks, m, n = tau.shape
    r = min(m, n) // n_tasks
    if r == 0:
        return torch.zeros((m, n), dtype=torch.float64, device=tau.device)
    us, ss, vhs = [], [], []
    for t in range(n_tasks):
        u, s, vh = svd64(tau[t])
        us.append(u[:, :r])
        ss.append(s[:r])
        vhs.append(vh[:r])
    s_all = torch.cat(ss)
    keep = s_all > 0  # directions of zero singular values are arbitrary: leave them out
    if not bool(keep.any()):
        return torch.zeros((m, n), dtype=torch.float64, device=tau.device)
    u_all = polar(torch.cat(us, dim=1)[:, keep])
    vh_all = polar(torch.cat(vhs, dim=0)[keep])
    return (u_all * s_all[keep]) @ vh_all


def _apply(ctx: TensorCtx) -> Tensor:
    assert ctx.base is not None
    check_finite(ctx, "tsv_m")
    tau = ctx.x.mul_(per_model(ctx.params["weight"], ctx.x))
    merged = tsv_merge_matrix(tau).to(ctx.x.dtype) if is_matrix(ctx) else tau.mean(dim=0)
    return ctx.base + ctx.params["lambda"] * merged


SPEC = MethodSpec(
    name="tsv_m",
    summary="Task Singular Vectors merge: each task's top singular directions, decorrelated (no data).",
    paper="https://arxiv.org/abs/2412.00081",
    params=(
        Param("weight", "float", 1.0, "scale of each model's task vector before the SVD", per_model=True),
        Param("lambda", "float", 1.0, "scale of the merged task vector"),
    ),
    apply=_apply,
    row_chunkable=False,
    order_invariant=True,
    examples=({"weight": [1.0, 0.5, 1.5], "lambda": 0.8}, {"lines_alpha": 0.5, "lines_beta": 0.5}),
)
