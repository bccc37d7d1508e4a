"""cart -- Centered Arithmetic with Rank-reduced Task vectors (CART).

Per 2-D tensor, with fine-tuned weights theta_1..theta_T of shape (m, n), k = min(m, n):

    theta_avg = mean_t theta_t
    r         = floor(rank_ratio * k)
    theta_m   = theta_avg + prior * sum_t LR_r(theta_t - theta_avg)
    LR_r(A)   = U[:, :r] diag(S[:r]) V^T[:r]           (top r singular triplets, float64 SVD)
Every other tensor: theta_m = theta_avg (its centred task vectors sum to zero).

Paper: Choi, Kim, Lee & Hong, "Revisiting Weight Averaging for Model Merging" (2024),
arXiv:2412.12153: weight averaging is task arithmetic centred at the average (the centred task
vectors theta_t - theta_avg sum to zero), and keeping only their top singular directions removes
most of the interference. Defaults from the paper's ViT-B/32 8-task configuration: rank ratio
0.12, merging coefficient (``prior`` there) 2.0. Reimplemented from the paper.

No base model is needed (the average is the centre); a base, if given, only supplies tensors
that are not merged. ``rank_ratio`` 1 gives the average back (the full centred vectors sum to
zero); a matrix with r = 0 also keeps the average. Per tensor, not row-chunked; memory: T float64
SVDs of the matrix, one at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from weightmerge.methods._svd import check_finite, is_matrix, svd64
from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor


def low_rank(a: Tensor, r: int) -> Tensor:
    """LR_r(a): the best rank-r approximation of ``a`` (float64)."""
    u, s, vh = svd64(a)
    return (u[:, :r] * s[:r]) @ vh[:r]


def cart_merge_matrix(weights: Tensor, *, rank_ratio: float, prior: float) -> Tensor:
    """weights: (T, m, n) fine-tuned matrices -> the CART merge (m, n), float64."""
    avg = weights.to(torch.float64).mean(dim=0)
    r = int(rank_ratio * min(weights.shape[1:]))
    if r == 0:
        return avg
    total = torch.zeros_like(avg)
    for t in range(weights.shape[0]):
        total += low_rank(weights[t].to(torch.float64) - avg, r)
    return avg + prior * total


def _apply(ctx: TensorCtx) -> Tensor:
    check_finite(ctx, "cart")
    if not is_matrix(ctx):
        return ctx.x.mean(dim=0)
    p = ctx.params
    return cart_merge_matrix(ctx.x, rank_ratio=p["rank_ratio"], prior=p["prior"]).to(ctx.x.dtype)


SPEC = MethodSpec(
    name="cart",
    summary="CART: the average plus the top singular directions of the task vectors centred on it.",
    paper="https://arxiv.org/abs/2412.12153",
    params=(
        Param(
            "rank_ratio",
            "float",
            0.12,
            "fraction of each matrix's rank kept from every centred task vector",
            low=0.0,
            high=1.0,
        ),
        Param("prior", "float", 2.0, "merging coefficient of the summed rank-reduced centred vectors"),
    ),
    apply=_apply,
    inputs="weights",
    needs_base=False,
    row_chunkable=False,
    order_invariant=True,
    examples=({"rank_ratio": 0.5, "prior": 1.5},),
)
