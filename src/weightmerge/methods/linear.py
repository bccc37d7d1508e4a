"""linear -- weighted average of full weights (model soup; mergekit ``linear``).

    theta_m = sum_i w_i theta_i / sum_i w_i          (normalize: true, the default)
    theta_m = sum_i w_i theta_i                      (normalize: false)

Paper: Wortsman et al., "Model soups" (ICML 2022), arXiv:2203.05482. Per tensor, element-wise;
mergekit 0.1.5 semantics and parameter names. The base model, if given, is not averaged in (list
it among the models to include it); it supplies non-merged tensors and the output dtype.
Degenerate case: a zero weight sum divides by 1 instead (the weighted sum), never NaN.
"""

from __future__ import annotations

import torch

from weightmerge.methods.base import MethodSpec, Param, TensorCtx


def linear_merge(weights: torch.Tensor, x: torch.Tensor, *, normalize: bool) -> torch.Tensor:
    """weights: (n,) ; x: (n, *shape) full weights -> (*shape)."""
    w = weights.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    out = (x * w).sum(dim=0)
    if normalize:
        total = weights.to(x.dtype).sum()
        out = out / (total if total != 0 else torch.ones((), dtype=x.dtype, device=x.device))
    return out


def _apply(ctx: TensorCtx) -> torch.Tensor:
    w = torch.tensor(ctx.params["weight"], dtype=ctx.x.dtype, device=ctx.x.device)
    return linear_merge(w, ctx.x, normalize=ctx.params["normalize"])


SPEC = MethodSpec(
    name="linear",
    summary="Weighted average of the models' weights (model soup).",
    paper="https://arxiv.org/abs/2203.05482",
    params=(
        Param("weight", "float", 1.0, "weight of each model", per_model=True),
        Param("normalize", "bool", True, "divide by the sum of weights"),
    ),
    apply=_apply,
    inputs="weights",
    needs_base=False,
    order_invariant=True,
    examples=({"normalize": False},),
    unlisted_base_note="base_model is not averaged in: list it under 'models' to include it (mergekit's "
    "linear adds it with the global weight)",
)
