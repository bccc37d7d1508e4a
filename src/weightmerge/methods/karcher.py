"""karcher -- equal-weight Karcher (Riemannian) mean on the unit hypersphere, rescaled.

Per tensor, models theta_1..theta_n flattened, alpha_i = 1/n:

    u_i = theta_i / |theta_i|; models with |theta_i| <= tol are left out of the mean
    mu  = normalised sum_i a_i u_i over the valid models (a = alpha renormalised over them;
          mu = u of the first valid model if that sum is ~0)
    repeat max_iter times:
        g  = sum_i a_i (Theta_i / sin Theta_i) (u_i - cos Theta_i mu),  Theta_i = arccos <mu, u_i>
             (terms with Theta_i < tol skipped)
        stop if |g| < tol;  mu <- cos|g| mu + sin|g| g/|g|, renormalised
    theta_m = (sum_i alpha_i |theta_i|) mu              (0 if every model has norm <= tol)

Reference: the Karcher / Frechet mean (Karcher 1977); mergekit 0.1.5 semantics and names
(``max_iter`` 10, ``tol`` 1e-5). mergekit averages every input including ``base_model`` when one
is configured; here only ``models`` are averaged (list the base among them to include it). One
model is returned unchanged. Per tensor, not row-chunked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor


def karcher_mean(x: Tensor, *, max_iter: int, tol: float) -> Tensor:
    """x: (n, *shape) -> the rescaled Karcher mean (*shape)."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    norms = torch.linalg.vector_norm(flat, dim=1)  # (n,)
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros_like(x[0])
    units = [flat[i] / norms[i] for i in valid]
    alpha = 1.0 / n
    alpha_sum = sum([alpha] * len(valid))
    a = [alpha / alpha_sum] * len(valid)
    mean = torch.zeros_like(units[0])
    for ai, u in zip(a, units, strict=True):
        mean += ai * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, units, strict=True):
            dot = torch.dot(mean, u).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if float(tn) < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if float(un) > tol:
            mean = mean / un
    scale = sum(alpha * norms[i] for i in range(n))
    return (scale * mean).reshape(x.shape[1:])


def _apply(ctx: TensorCtx) -> Tensor:
    if ctx.n_models == 1:
        return ctx.x[0]
    return karcher_mean(ctx.x, max_iter=int(ctx.params["max_iter"]), tol=float(ctx.params["tol"]))


SPEC = MethodSpec(
    name="karcher",
    summary="Karcher mean of the models on the unit sphere, rescaled by their mean norm.",
    paper="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
    params=(
        Param("max_iter", "int", 10, "fixed-point iterations", low=0),
        Param("tol", "float", 1e-5, "convergence / zero-norm tolerance", low=0.0, low_open=True),
    ),
    apply=_apply,
    inputs="weights",
    needs_base=False,
    row_chunkable=False,
    order_invariant=True,
    examples=({"max_iter": 3},),
)
