"""iso_c -- Isotropic merging in the common subspace (Iso-C).

Per 2-D tensor, with task vectors tau_t (m, n), k = min(m, n):

    U S V^T = sum_t tau_t                     (thin SVD, float64)
    tau_m   = mean(S) U V^T                   (every singular value replaced by their mean:
                                               a flat, isotropic spectrum)
Every other tensor: tau_m = mean_t tau_t.       theta_m = theta_0 + lambda * tau_m.

Paper: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces" (ICML 2025), arXiv:2502.04959. Semantics of fusion_bench 0.2.33
``iso_c`` (``scaling_factor`` = our ``lambda``, which scales the averaged tensors too). The paper
tunes lambda on validation data (1.3-1.9 on its ViT benchmarks); the default 1.0 is fusion_bench's.

Degenerate cases: an all-zero sum gives tau_m = 0. A rank-deficient sum (fewer than k non-zero
singular values) has singular directions of value 0 that LAPACK picks arbitrarily, and the flat
spectrum gives them weight mean(S): the result then depends on LAPACK (as in fusion_bench). Task
vectors with any dense component (fine-tuning noise) are full rank. Per tensor, not row-chunked;
memory: one SVD of (m, n) in float64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from weightmerge.methods._svd import check_finite, is_matrix, svd64
from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor


def iso_c_matrix(tau: Tensor) -> Tensor:
    """tau: (T, m, n) task vectors -> the Iso-C merged matrix (m, n), float64."""
    u, s, vh = svd64(tau.sum(dim=0))
    return (u * s.mean()) @ vh


def _apply(ctx: TensorCtx) -> Tensor:
    assert ctx.base is not None
    check_finite(ctx, "iso_c")
    merged = iso_c_matrix(ctx.x).to(ctx.x.dtype) if is_matrix(ctx) else ctx.x.mean(dim=0)
    return ctx.base + ctx.params["lambda"] * merged


SPEC = MethodSpec(
    name="iso_c",
    summary="Isotropic merging: the summed task vector with a flat singular spectrum (no data).",
    paper="https://arxiv.org/abs/2502.04959",
    params=(Param("lambda", "float", 1.0, "scale of the merged task vector (the paper tunes 1.3-1.9)"),),
    apply=_apply,
    row_chunkable=False,
    order_invariant=True,
    examples=({"lambda": 1.3},),
)
