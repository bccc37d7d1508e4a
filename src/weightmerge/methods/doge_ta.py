"""doge_ta -- DOGE task arithmetic: adaptive projective gradient descent, data-free.

With task vectors tau_t, per 2-D tensor ("layer") l:

    lam_t   = lambda / ||tau_t^l||_F                      (each layer's task vector normalised)
    Lam     = sum_t lam_t,   S = sum_t lam_t tau_t
    r_t(d)  = rowsum( tau_t * (tau_t - S - Lam d) )       (m,) for a shared correction d (m, n)
    L(d)    = sum_t || r_t(d) ||^2
    grad    = dL/dd = -2 Lam sum_t r_t[:, None] * tau_t,   projected: grad - U_K U_K^T grad
    d       = ``steps`` Adam iterations (lr ``lr``, torch's default betas/eps) from d = 0
    U_K     = the top K = floor(k / subspace) left singular vectors of [U_1[:, :r] ... U_T[:, :r]],
              U_t the left singular vectors of tau_t, r = floor(k / T), k = min(m, n)
    mask_t  = |tau_t| >= thr_t,  thr_t = the (floor(D density) + 1)-th largest |tau_t| over the
              2-D tensors of the whole model (D entries per model)
    theta_m = theta_0 + sum_t lam_t (tau_t + d) * mask_t

Every other tensor (biases, norms): theta_m = theta_0 + mean_t tau_t.

Paper: Wei et al., "Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent"
(ICML 2025), arXiv:2501.01230. Semantics and defaults of fusion_bench 0.2.33 ``DOGE_TA_Algorithm``
(``lamda`` 0.07 = our ``lambda``, ``K`` 30 % = ``density`` 0.3, ``subspace`` 6, 400 Adam steps at
lr 1e-4). Its mask keeps every entry >= the (int(D density) + 1)-th largest magnitude: int(D
density) + 1 entries (more on ties), as here; density 1 keeps all (fusion_bench's kthvalue(0)
fails there). fusion_bench merges only the CLIP encoder's weight matrices (keys with "encoder"
and "weight", not "layer_norm") and leaves every other tensor at the base; here every 2-D tensor
is a layer and the other tensors are averaged, like the other SVD methods.

The threshold is an exact order statistic over all matrices of each model (the engine's
``OrderStat`` pass, as global TIES and PCB: two sweeps); the rest is per tensor (not row-chunked).
Arithmetic in the compute dtype, SVDs in float64. An all-zero layer task vector has no norm: its
lam_t is 0 (the reference divides by zero).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from weightmerge.methods._svd import is_matrix, svd64
from weightmerge.methods.base import MethodSpec, OrderStat, Param, StatRequest, TensorCtx
from weightmerge.methods.wudi import adam_step

if TYPE_CHECKING:
    from torch import Tensor

THR = "doge.thr"


def keep_rank(*, numel: int, density: float) -> int:
    """0-based ascending rank of the mask threshold: D - int(D density) - 1 (at least 0)."""
    return max(numel - int(numel * density) - 1, 0)


def projector_basis(tau: Tensor, *, subspace: int) -> Tensor:
    """U_K (m, K), float64: the top K = k // subspace left singular vectors of the stacked top
    r = k // T left singular vectors of each task vector."""
    n_tasks, m, n = tau.shape
    k = min(m, n)
    r = k // n_tasks
    stacked = torch.zeros((m, k), dtype=torch.float64, device=tau.device)
    for t in range(n_tasks):
        u, _, _ = svd64(tau[t])
        stacked[:, t * r : (t + 1) * r] = u[:, :r]
    u_u, _, _ = svd64(stacked)
    return u_u[:, : k // subspace]


def layer_scales(tau: Tensor, *, lam: float) -> Tensor:
    """lam_t = lambda / ||tau_t||_F (0 for an all-zero tau_t), shape (T,)."""
    norms = torch.linalg.vector_norm(tau.reshape(tau.shape[0], -1), dim=1)
    return torch.where(norms > 0, lam / torch.where(norms > 0, norms, 1.0), 0.0)


def optimise_delta(tau: Tensor, scales: Tensor, basis: Tensor, *, steps: int, lr: float) -> Tensor:
    """The shared correction d (m, n) after ``steps`` projected Adam iterations from 0."""
    lam_all = scales.sum()
    s = torch.einsum("t,tmn->mn", scales, tau)
    basis = basis.to(tau.dtype)
    d = torch.zeros_like(tau[0])
    m1 = torch.zeros_like(d)
    m2 = torch.zeros_like(d)
    for step in range(1, steps + 1):
        resid = (tau * (tau - s - lam_all * d)).sum(dim=2)  # (T, m): r_t
        grad = torch.einsum("tm,tmn->mn", resid, tau).mul_(-2 * lam_all)
        grad -= basis @ (basis.T @ grad)
        adam_step(d, grad, m1, m2, step=step, lr=lr)
    return d


def _magnitudes(ctx: TensorCtx) -> Tensor:
    """|tau| of the chunk's matrix entries (n, m); nothing for the other tensors."""
    x = ctx.x.reshape(ctx.n_models, -1)
    if not is_matrix(ctx):
        return x[:, :0]
    if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"doge_ta: NaN or infinite task-vector entries in tensor {ctx.name!r}")
    return x.abs()


def _passes(p: Mapping[str, Any]) -> Sequence[Sequence[StatRequest]]:
    density = p["density"]
    return ((OrderStat(THR, _magnitudes, lambda d: keep_rank(numel=d, density=density), nan_free=True),),)


def _apply(ctx: TensorCtx) -> Tensor:
    assert ctx.base is not None
    tau = ctx.x
    if not is_matrix(ctx):
        if not bool(torch.isfinite(tau).all()):
            raise ValueError(f"doge_ta: NaN or infinite task-vector entries in tensor {ctx.name!r}")
        return ctx.base + tau.mean(dim=0)
    p = ctx.params
    scales = layer_scales(tau, lam=p["lambda"])
    basis = projector_basis(tau, subspace=p["subspace"])
    delta = optimise_delta(tau, scales, basis, steps=p["steps"], lr=p["lr"])
    thr = ctx.stats[THR].to(tau.dtype).reshape(-1, 1, 1)
    masks = tau.abs() >= thr
    merged = torch.einsum("t,tmn->mn", scales, (tau + delta).mul_(masks))
    return ctx.base + merged


SPEC = MethodSpec(
    name="doge_ta",
    summary="DOGE TA: task vectors normalised per layer, a shared correction by projected Adam, top-k masks.",
    paper="https://arxiv.org/abs/2501.01230",
    params=(
        Param("lambda", "float", 0.07, "norm each layer's task vector is scaled to", tensor_scoped=False),
        Param(
            "density",
            "float",
            0.3,
            "fraction of each task vector's matrix entries kept (over all matrices together)",
            low=0.0,
            high=1.0,
            low_open=True,
            tensor_scoped=False,
        ),
        Param("subspace", "int", 6, "the projection keeps k / subspace shared directions", low=1),
        Param("steps", "int", 400, "Adam iterations per matrix", low=0),
        Param("lr", "float", 1e-4, "Adam learning rate", low=0.0, low_open=True),
    ),
    apply=_apply,
    passes=_passes,
    row_chunkable=False,
    order_invariant=True,
    examples=({"density": 0.5, "steps": 10, "subspace": 2},),
)
