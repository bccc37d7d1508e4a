"""emr -- EMR-Merging: Elect, Mask & Rescale (tuning-free; the output is an artifact, not a model).

Per tensor, element-wise, over the task vectors tau_1..tau_n:

    gamma    = +1 where sum_t tau_t > 0 else -1        (= sign of the mean; a zero mean -> -1)
    agree_t  = tau_t * gamma > 0                        (strict: zeros never agree)
    epsilon  = max_{t: agree_t} |tau_t|                 (0 where no task agrees)
    unified  = gamma * epsilon;   M_t = agree_t         (one bool mask per task)

Per task, over all merged tensors (``rescale``):

    per_tensor_mean (default, the published code):
        lambda_t = sum_tensors mean|tau_t| / sum_tensors mean|M_t * unified|
    global (the paper's formula):
        lambda_t = sum |tau_t| / sum |M_t * unified|             (sums over every merged entry)

Task t is reconstructed as theta_0 + lambda_t * M_t * unified (``weightmerge.emr.EMRResult``).

Paper: Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging" (NeurIPS 2024),
arXiv:2405.17461; semantics of harveyhuang18/EMR_Merging (docs/methods/emr.md). The paper elects
with the mean, we test the sum (same sign, no underflow of sum/n). No hyper-parameters.

Scope: election and masks are per element (chunkable); the rescalers are two associative sums per
task (one statistics pass). Degenerate case: a task that agrees nowhere (denominator 0; its
M_t * unified is all zero, so its reconstruction is the base whatever lambda_t) gets lambda_t = 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from weightmerge.emr.output import EMR_ARTIFACT
from weightmerge.emr.result import EMRTensor
from weightmerge.methods.base import (
    MethodSpec,
    Param,
    Reduce,
    StatRequest,
    TensorCtx,
    row_partials,
)

if TYPE_CHECKING:
    from torch import Tensor

NUM, DEN = "emr.num", "emr.den"
RESCALES = ("per_tensor_mean", "global")
DEGENERATE_RESCALER = 1.0  # denominator 0: the reconstruction is the base anyway


def elect(tau: Tensor, *, inplace: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(gamma, epsilon, masks) of task vectors ``tau`` (n, *shape): gamma and epsilon (*shape),
    masks (n, *shape) bool. ``inplace`` lets it overwrite ``tau``."""
    # +1.0 / -1.0 by arithmetic on the bool: the same values as torch.where(sum > 0, 1.0, -1.0),
    # chosen for speed (docs/benchmarks.md, "Element-wise choices")
    gamma = (tau.sum(dim=0) > 0).to(tau.dtype).mul_(2.0).sub_(1.0)
    signed = tau.mul_(gamma) if inplace else tau * gamma  # exact: a sign flip
    masks = signed > 0
    epsilon = signed.clamp_(min=0).amax(dim=0)  # |tau_t| of the agreeing tasks, 0 for the others
    return gamma, epsilon, masks


def _deltas(ctx: TensorCtx) -> Tensor:
    """The chunk's task vectors, checked finite once per chunk and sweep: a finite sum proves it
    (NaN or inf makes the sum non-finite); only a non-finite sum, which an overflow can also give,
    takes the exact look."""
    if "emr.finite" not in ctx.memo:
        x = ctx.x
        if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
            raise ValueError(f"emr: NaN or infinite task-vector entries in tensor {ctx.name!r}")
        ctx.memo["emr.finite"] = x
    return ctx.x


def _apply(ctx: TensorCtx) -> EMRTensor:
    gamma, epsilon, masks = elect(_deltas(ctx), inplace=True)
    return EMRTensor(unified=gamma.mul_(epsilon), masks=masks)


def _num_partials(ctx: TensorCtx) -> Tensor:
    return row_partials(_deltas(ctx).to(torch.float64, copy=True).abs_(), len(ctx.full_shape))  # |x|, f64


def _den_partials(ctx: TensorCtx) -> Tensor:
    _, epsilon, masks = elect(_deltas(ctx))
    # |M_t * unified| = where(masks, epsilon, +0.0), as a product (for speed: docs/benchmarks.md,
    # "Element-wise choices"): epsilon > 0 wherever a mask is set, and |epsilon| turns its -0.0
    # entries (no task agrees) into +0.0
    kept = masks.to(epsilon.dtype).mul_(epsilon.abs_())
    return row_partials(kept, len(ctx.full_shape))


def _passes(p: Mapping[str, Any]) -> Sequence[Sequence[StatRequest]]:
    mean = p["rescale"] == "per_tensor_mean"
    return (
        (
            Reduce(NUM, _num_partials, per_tensor_mean=mean),
            Reduce(DEN, _den_partials, per_tensor_mean=mean),
        ),
    )


def rescalers(num: Tensor, den: Tensor) -> list[float]:
    """lambda_t = num_t / den_t; a zero denominator gives 1.0 (see the module docstring)."""
    return [
        float(a / b) if b > 0 else DEGENERATE_RESCALER
        for a, b in zip(num.tolist(), den.tolist(), strict=True)
    ]


def _finalize(stats: Mapping[str, Tensor], _p: Mapping[str, Any]) -> dict[str, Any]:
    return {"rescalers": rescalers(stats[NUM], stats[DEN])}


SPEC = MethodSpec(
    name="emr",
    summary="EMR-Merging: one unified task vector, a 1-bit mask and a rescaler per task (tuning-free).",
    paper="https://arxiv.org/abs/2405.17461",
    params=(
        Param(
            "rescale",
            "str",
            "per_tensor_mean",
            "rescaler: sum of per-tensor means (published code) or global sums (the paper's formula)",
            choices=RESCALES,
            tensor_scoped=False,
        ),
    ),
    apply=_apply,
    passes=_passes,
    finalize=_finalize,
    output=EMR_ARTIFACT,
    order_invariant=True,
    examples=({"rescale": "global"},),
)
