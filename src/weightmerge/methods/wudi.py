"""wudi -- WUDI merging: minimise the interference each task vector causes, with no data.

Per 2-D tensor, with T task vectors tau_t (m, n), the merged task vector x minimises

    L(x) = sum_t || (x - tau_t) tau_t^T ||_F^2 / || tau_t ||_F^2

starting from x_0 = sum_t tau_t, by ``steps`` iterations of Adam (learning rate ``lr``, betas
(0.9, 0.999), eps 1e-8: torch's defaults, no weight decay). The gradient is computed in closed form,

    grad L(x) = 2 (x A - B),   A = sum_t tau_t^T tau_t / ||tau_t||^2 (n, n),   B = sum_t tau_t A_t

(B = sum_t tau_t tau_t^T tau_t / ||tau_t||^2), or as 2 ((x G^T) G - B) with G the stacked
tau_t / ||tau_t|| when n > 2 T m (cheaper there). Every other tensor: x = mean_t tau_t.
theta_m = theta_0 + lambda * x.

Paper: Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors" (ICML 2025), arXiv:2503.08099. Semantics of fusion_bench 0.2.33
``wudi_merging`` (which differentiates the loss with autograd, one (m, m) product per task per
step; the same gradient). The published numbers come from this early-stopped Adam iterate, not
from the minimiser of L (a linear least-squares problem): ``steps`` and ``lr`` are part of the
method. fusion_bench's ``iter_num`` default is 300 in the function and 400 in its config; 400 here.
``lambda`` (1.0, not in the reference) scales the merged task vector like the other methods'.

Arithmetic runs in the compute dtype (float64 for exactness: Adam normalises each gradient entry,
so rounding in a tiny gradient entry can flip its step). A task vector that is all zero adds
nothing to L (the reference divides 0 by 0 there). Per tensor, not row-chunked; memory: x, the
two Adam moments, the gradient, B and A (n x n) per matrix, besides the inputs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from weightmerge.methods._svd import check_finite, is_matrix
from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def adam_step(x: Tensor, grad: Tensor, m: Tensor, v: Tensor, *, step: int, lr: float) -> None:
    """One Adam update of ``x`` in place (moments ``m``, ``v`` updated in place; ``step`` from 1)."""
    m.lerp_(grad, 1 - BETA1)
    v.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
    denom = (v.sqrt() / math.sqrt(1 - BETA2**step)).add_(EPS)
    x.addcdiv_(m, denom, value=-lr / (1 - BETA1**step))


def wudi_matrix(tau: Tensor, *, steps: int, lr: float) -> Tensor:
    """tau: (T, m, n) task vectors -> the WUDI merged matrix (m, n), in tau's dtype."""
    n_tasks, rows, cols = tau.shape
    norms = tau.reshape(n_tasks, -1).pow(2).sum(dim=1)
    live = [t for t in range(n_tasks) if float(norms[t]) > 0]
    x = tau.sum(dim=0)
    if not live or steps == 0:
        return x
    g = torch.stack([tau[t] / norms[t].sqrt() for t in live])  # (T', m, n): tau_t / ||tau_t||
    gram_side = cols <= 2 * len(live) * rows
    a = torch.einsum("tmi,tmj->ij", g, g) if gram_side else None  # (n, n)
    b = sum((tau[t] @ g[i].T) @ g[i] for i, t in enumerate(live))  # (m, n)
    assert isinstance(b, torch.Tensor)
    gs = g.reshape(-1, cols) if not gram_side else None
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    for step in range(1, steps + 1):
        if a is not None:
            grad = (x @ a).sub_(b).mul_(2)
        else:
            assert gs is not None
            xg = (x @ gs.T).reshape(rows, len(live), rows)  # (m, T', m): x g_t^T per task
            grad = torch.einsum("itj,tjn->in", xg, g).sub_(b).mul_(2)
        adam_step(x, grad, m, v, step=step, lr=lr)
    return x


def _apply(ctx: TensorCtx) -> Tensor:
    assert ctx.base is not None
    check_finite(ctx, "wudi")
    p = ctx.params
    merged = wudi_matrix(ctx.x, steps=p["steps"], lr=p["lr"]) if is_matrix(ctx) else ctx.x.mean(dim=0)
    return ctx.base + p["lambda"] * merged


SPEC = MethodSpec(
    name="wudi",
    summary="WUDI: the task-vector sum refined by Adam to cut each task's interference (no data).",
    paper="https://arxiv.org/abs/2503.08099",
    params=(
        Param("steps", "int", 400, "Adam iterations per matrix", low=0),
        Param("lr", "float", 1e-5, "Adam learning rate", low=0.0, low_open=True),
        Param("lambda", "float", 1.0, "scale of the merged task vector (not in the reference)"),
    ),
    apply=_apply,
    row_chunkable=False,
    order_invariant=True,
    examples=({"steps": 20, "lr": 1e-4},),
)
