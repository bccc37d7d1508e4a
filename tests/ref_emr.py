"""A slow, literal reference of EMR-Merging (harveyhuang18/EMR_Merging semantics, docs/methods/emr.md).

Written straight from the formulas of docs/methods/emr.md, sharing no code with weightmerge: per
tensor, per element, the mean over tasks elects the direction (mean exactly 0 -> -1), the largest
agreeing magnitude is the unified value, masks are strict agreement; rescalers are ratios of sums of
per-tensor means ("per_tensor_mean") or of sums over the flattened model ("global"; sorted key
order). A zero denominator gives 1.0 (weightmerge's documented guard; the reference code divides by zero).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def emr_state_dicts(
    base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]], *, rescale: str
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[float]]:
    """(unified float64, masks per task, rescalers) of ``models`` fine-tuned from ``base``."""
    keys = sorted(base)
    n = len(models)
    tau = [{k: m[k].to(torch.float64) - base[k].to(torch.float64) for k in keys} for m in models]
    unified: dict[str, torch.Tensor] = {}
    masks: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for k in keys:
        stacked = torch.stack([tau[t][k] for t in range(n)])
        gamma = torch.where(stacked.mean(dim=0) > 0, 1.0, -1.0).to(torch.float64)
        eps = torch.zeros_like(gamma)
        for t in range(n):
            agree = tau[t][k] * gamma > 0
            masks[t][k] = agree
            eps = torch.where(agree & (tau[t][k].abs() > eps), tau[t][k].abs(), eps)
        unified[k] = gamma * eps
    resc = []
    for t in range(n):
        if rescale == "per_tensor_mean":
            num = sum(float(tau[t][k].abs().mean()) for k in keys if tau[t][k].numel())
            den = sum(float((masks[t][k] * unified[k]).abs().mean()) for k in keys if unified[k].numel())
        elif rescale == "global":
            num = float(torch.cat([tau[t][k].reshape(-1) for k in keys]).abs().sum())
            den = float(torch.cat([(masks[t][k] * unified[k]).reshape(-1) for k in keys]).abs().sum())
        else:
            raise ValueError(rescale)
        resc.append(num / den if den > 0 else 1.0)
    return unified, masks, resc
