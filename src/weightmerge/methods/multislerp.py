"""multislerp -- barycentric interpolation of n models on the hypersphere (tangent-space mean).

Per tensor, with v_i = theta_i (no base) or tau_i = theta_i - theta_0 (base), flattened, and
weights w (normalised to sum 1 when ``normalize_weights``):

    u_i  = v_i / (|v_i| + eps)
    mu   = sum_i w_i u_i / |sum_i w_i u_i|
    g    = sum_i w_i (u_i - <u_i, mu> mu)                       (tangent vectors at mu)
    r    = mu cos(|g| + eps) + g sin(|g| + eps) / (|g| + eps)   (exponential map)
    out  = r * sum_i w_i |v_i|          (+ theta_0 with a base)

A single model is returned unchanged. If |sum_i w_i u_i| < eps (e.g. opposite tensors with equal
weights), two models fall back to sum_i w_i v_i and more models are an error naming the tensor.

Reference: C. Goddard, "Multi-SLERP" (goddard.blog/posts/multislerp-wow-what-a-cool-idea);
mergekit 0.1.5 semantics and names (``weight``, ``normalize_weights``, ``eps``); weights default to
1 here (mergekit requires them). Per tensor, not row-chunked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor


def multislerp(vectors: Tensor, weights: Tensor, *, eps: float, name: str) -> Tensor:
    """vectors: (n, *shape); weights: (n,) already normalised if wanted -> (*shape)."""
    flat = vectors.reshape(vectors.shape[0], -1)
    w = weights.to(flat.dtype)
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(dim=0)
    mean_norm = torch.linalg.vector_norm(mean)
    if bool(mean_norm < eps):
        if vectors.shape[0] == 2:
            return vectors[0] * w[0] + vectors[1] * w[1]
        raise ValueError(
            f"multislerp: the weighted mean direction of tensor {name!r} is zero (opposite tensors "
            "with balancing weights); change the weights"
        )
    mean = mean / mean_norm
    dots = (units * mean).sum(dim=-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(dim=0)
    tn = torch.linalg.vector_norm(tangent) + eps
    out = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
    return (out * (norms.squeeze(-1) * w).sum()).reshape(vectors.shape[1:])


def _apply(ctx: TensorCtx) -> Tensor:
    p = ctx.params
    if ctx.n_models == 1:
        return ctx.x[0]
    w = torch.tensor(p["weight"], dtype=ctx.x.dtype, device=ctx.x.device)
    if p["normalize_weights"]:
        total = w.sum()
        if bool(total == 0):
            raise ValueError(f"multislerp: the weights of tensor {ctx.name!r} sum to 0")
        w = w / total
    eps = float(p["eps"])
    if ctx.base is None:
        return multislerp(ctx.x, w, eps=eps, name=ctx.name)
    return multislerp(ctx.x.sub_(ctx.base), w, eps=eps, name=ctx.name) + ctx.base


SPEC = MethodSpec(
    name="multislerp",
    summary="Spherical barycentre of n models (or task vectors), rescaled by the mean norm.",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    params=(
        Param("weight", "float", 1.0, "weight of each model", per_model=True),
        Param("normalize_weights", "bool", True, "divide the weights by their sum"),
        Param("eps", "float", 1e-8, "numerical floor", low=0.0, low_open=True),
    ),
    apply=_apply,
    inputs="weights",
    needs_base=False,
    row_chunkable=False,
    order_invariant=True,
    examples=({"normalize_weights": False},),
)
