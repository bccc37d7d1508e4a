"""A slow, literal reference of PCB-Merging (duguodong7/pcb-merging semantics, docs/methods/pcb.md).

Written straight from the formulas of docs/methods/pcb.md, on one flattened float64 vector per
model, sharing no code with weightmerge: flatten the task vectors in sorted key order, full sorts
for every order statistic, the authors' exp(n U^2) (not the shifted form), min/max of the clamped
magnitudes taken directly, the three inter-score variants written out, then cut the vector back into
tensors.

Guards (weightmerge's documented choices, the authors leave these divisions unguarded): a row whose
clamped magnitudes are constant gets U = 0; a row whose max beta equals its threshold gets W = 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def flatten(sd: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([sd[k].reshape(-1).to(torch.float64) for k in keys])


def unflatten(vec: torch.Tensor, like: Mapping[str, torch.Tensor], keys: Sequence[str]) -> dict:
    out, pos = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vec[pos : pos + n].reshape(like[k].shape)
        pos += n
    return out


def pcb_vector(
    T: torch.Tensor, *, keep_ratio: float, clamp_ratio: float, lam: Sequence[float], inter: str = "A"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T: (n, D) float64 task vectors -> (merged task vector (D,), weights W (n, D), clamped Tc (n, D))."""
    n, D = T.shape
    # 1. clamp magnitudes at order statistics of each row (Python indexing: -1 = last)
    A = T.abs()
    srt = torch.sort(A, dim=1).values
    lo = srt[:, math.floor(D * clamp_ratio)]
    hi = srt[:, math.floor(D * (1 - clamp_ratio)) - 1]
    A_hat = torch.stack([torch.clamp(A[i], min=lo[i], max=hi[i]) for i in range(n)])
    Tc = torch.sign(T) * A_hat
    # 2. intra: min-max normalise the clamped magnitudes, exp(n U^2)
    U = torch.zeros_like(A_hat)
    for i in range(n):
        mn, mx = A_hat[i].min(), A_hat[i].max()
        if mx > mn:
            U[i] = (A_hat[i] - mn) / (mx - mn)
    intra = torch.exp(n * U**2)
    # 3. inter
    V = torch.sign(T) * U
    if inter == "A":
        S = T.sum(dim=0)
        cross = torch.tanh(T * S)
    elif inter == "B":
        cross = torch.tanh(T * V.sum(dim=0))
    elif inter == "C":
        cross = torch.zeros_like(T)
        for i in range(n):
            for j in range(n):
                cross[i] += torch.tanh(V[i] * V[j])
    else:
        raise ValueError(inter)
    beta = intra * cross
    # 5. drop threshold and continuous weights
    W = torch.zeros_like(beta)
    for i in range(n):
        thr = torch.sort(beta[i]).values[math.floor(D * (1 - keep_ratio))]
        top = beta[i].max()
        if top > thr:
            W[i] = (torch.clamp(beta[i], min=thr) - thr) / (top - thr)
    # 6-7. weighted mean of the lambda-scaled clamped task vectors
    lam_t = torch.tensor(list(lam), dtype=torch.float64)[:, None]
    tau = (W * lam_t * Tc).sum(dim=0) / torch.clamp(W.sum(dim=0), min=1e-12)
    return tau, W, Tc


def pcb_state_dicts(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    *,
    keep_ratio: float = 0.1,
    clamp_ratio: float = 0.01,
    lam: Sequence[float] | float = 1.0,
    inter: str = "A",
    scope: str = "global",
    drop: Sequence[Mapping[str, torch.Tensor]] | None = None,
    drop_rate: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Merged float64 state dict. ``drop``: optional bool masks per model and tensor (True = dropped
    by DARE), applied with the 1/(1 - drop_rate) rescale before PCB."""
    keys = sorted(base)
    lams = [float(lam)] * len(models) if isinstance(lam, (int, float)) else list(lam)
    deltas = []
    for i, m in enumerate(models):
        d = {k: m[k].to(torch.float64) - base[k].to(torch.float64) for k in keys}
        if drop is not None:
            d = {k: torch.where(drop[i][k], 0.0, d[k]) / (1 - drop_rate) for k in keys}
        deltas.append(d)
    groups = [keys] if scope == "global" else [[k] for k in keys]
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        T = torch.stack([flatten(d, group) for d in deltas])
        tau, _, _ = pcb_vector(T, keep_ratio=keep_ratio, clamp_ratio=clamp_ratio, lam=lams, inter=inter)
        merged = flatten(base, group) + tau
        out.update(unflatten(merged, base, group))
    return out
