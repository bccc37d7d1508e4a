"""consensus_ta -- Consensus Task Arithmetic: TALL masks, keep the weights most tasks use.

Element-wise, per tensor, with task vectors tau_t and their sum S = sum_j tau_j:

    m_t   = |tau_t| > mask_lambda * |S - tau_t|        (TALL mask of task t)
    c     = sum_t m_t                                   (how many tasks use each weight)
    theta = theta_0 + lambda * [c >= k] * S

Paper: Wang et al., "Localizing Task Information for Improved Model Merging and Compression"
(ICML 2024), arXiv:2405.07813. The TALL mask marks the weights where task t's own vector is
larger than what the other tasks add there (the distance |theta_0 - theta_t| against
|theta_MTL - theta_t|, theta_MTL = theta_0 + S); a weight used by fewer than k tasks is either
"catastrophic" (no task) or "selfish" (one task) and is dropped from the task-arithmetic sum.
``k`` = 0 keeps everything (task arithmetic), k > T drops everything (the base).

fusion_bench 0.2.33's state-dict class ``TallMaskTaskArithmeticAlgorithm`` compares
|theta_0 - tau_t| on the left (it passes the task vector where the fine-tuned weights belong); we
follow the paper and fusion_bench's flat-vector ``generate_task_masks`` (|tau_t| on the left).
The comparison is strict, so a weight no task moved is never in a mask. No data, no tuning
besides ``lambda`` (the paper tunes it on validation like task arithmetic's; see the docs page
for the default). Element-wise: row-chunkable and streamed like task arithmetic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor

DEFAULT_LAMBDA = 1.0


def tall_masks(tau: Tensor, total: Tensor, *, mask_lambda: float) -> Tensor:
    """(n, *shape) bool TALL masks of task vectors ``tau`` given their sum ``total`` (*shape)."""
    return tau.abs() > (total - tau).abs_().mul_(mask_lambda)


def consensus_merge(tau: Tensor, *, mask_lambda: float, k: int) -> Tensor:
    """The consensus task vector [sum_t m_t >= k] * sum_t tau_t, (*shape)."""
    total = tau.sum(dim=0)
    if k <= 0:
        return total
    count = tall_masks(tau, total, mask_lambda=mask_lambda).sum(dim=0)
    return total.mul_((count >= k).to(total.dtype))


def _apply(ctx: TensorCtx) -> Tensor:
    assert ctx.base is not None
    merged = consensus_merge(ctx.x, mask_lambda=ctx.params["mask_lambda"], k=ctx.params["k"])
    return ctx.base + ctx.params["lambda"] * merged


SPEC = MethodSpec(
    name="consensus_ta",
    summary="Consensus TA: task arithmetic on the weights that at least k tasks' TALL masks select.",
    paper="https://arxiv.org/abs/2405.07813",
    params=(
        Param("lambda", "float", DEFAULT_LAMBDA, "scale of the kept sum of task vectors"),
        Param(
            "mask_lambda",
            "float",
            0.6,
            "TALL mask threshold: task t keeps a weight where |tau_t| > mask_lambda |sum - tau_t|",
            low=0.0,
        ),
        Param("k", "int", 2, "keep a weight when at least k tasks' masks select it", low=0),
    ),
    apply=_apply,
    order_invariant=True,
    examples=({"k": 1, "mask_lambda": 0.4, "lambda": 0.5},),
)
