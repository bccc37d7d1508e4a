"""task_arithmetic -- add scaled task vectors to the base (mergekit ``task_arithmetic``).

    theta_m = theta_0 + lambda * sum_i w_i tau_i               (normalize: false, the default)
    theta_m = theta_0 + lambda * sum_i w_i tau_i / sum_i w_i   (normalize: true; zero sum -> / 1)

Paper: Ilharco et al., "Editing models with task arithmetic" (ICLR 2023), arXiv:2212.04089.
Per tensor, element-wise; mergekit 0.1.5 semantics and names (``weight`` per model, ``lambda``).
"""

from __future__ import annotations

import torch

from weightmerge.methods.base import MethodSpec, Param, TensorCtx


def task_arithmetic_merge(
    base: torch.Tensor, deltas: torch.Tensor, weights: torch.Tensor, *, lam: float, normalize: bool
) -> torch.Tensor:
    """base: (*shape); deltas: (n, *shape); weights: (n,) -> merged weights (*shape)."""
    w = weights.to(deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))
    mixed = (deltas * w).sum(dim=0)
    if normalize:
        total = weights.to(deltas.dtype).sum()
        mixed = mixed / (total if total != 0 else torch.ones((), dtype=deltas.dtype, device=deltas.device))
    return base + lam * mixed


def _apply(ctx: TensorCtx) -> torch.Tensor:
    assert ctx.base is not None
    w = torch.tensor(ctx.params["weight"], dtype=ctx.x.dtype, device=ctx.x.device)
    return task_arithmetic_merge(
        ctx.base, ctx.x, w, lam=ctx.params["lambda"], normalize=ctx.params["normalize"]
    )


SPEC = MethodSpec(
    name="task_arithmetic",
    summary="Base plus the (weighted) sum of task vectors, scaled by lambda.",
    paper="https://arxiv.org/abs/2212.04089",
    params=(
        Param("weight", "float", 1.0, "weight of each model's task vector", per_model=True),
        Param("lambda", "float", 1.0, "scale of the merged task vector"),
        Param("normalize", "bool", False, "divide by the sum of weights"),
    ),
    apply=_apply,
    order_invariant=True,
    examples=({"lambda": 0.7},),
    mergekit_ignored=(
        ("density", "mergekit's task_arithmetic accepts it but does not sparsify"),
        ("rescale", "mergekit's task_arithmetic accepts it but does not sparsify"),
    ),
)
