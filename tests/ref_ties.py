"""A slow, literal reference of paper TIES (prateeky2806/ties-merging semantics, docs/methods/ties.md).

Written straight from the formulas of docs/methods/ties.md, on one flattened float64 vector per model, with no
code shared with weightmerge: flatten the state dicts in sorted key order, concatenate, trim each
row at its (D - k)-th smallest magnitude (k = floor(D * density); density 1 = no trim), elect the
sign of the column sum (zero -> the sign of the sum of elected signs), keep entries that agree
with it (``> 0`` if the elected sign is positive, else ``< 0``), take their mean (or sum), add
``lam`` times it to the base and cut the vector back into tensors.
"""

from __future__ import annotations

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


def ties_vector(T: torch.Tensor, densities: Sequence[float], merge_func: str = "mean") -> torch.Tensor:
    """T: (n, D) float64 task vectors -> merged task vector (D,)."""
    n, D = T.shape
    rows = []
    for i in range(n):
        k = int(D * densities[i])
        if k >= D:
            rows.append(T[i].clone())
            continue
        thr = torch.kthvalue(T[i].abs(), D - k).values  # 1-based: the (D-k)-th smallest
        rows.append(torch.where(T[i].abs() >= thr, T[i], torch.zeros_like(T[i])))
    Tt = torch.stack(rows)
    g = torch.sign(Tt.sum(dim=0))
    majority = torch.sign(g.sum())
    g[g == 0] = majority
    sel = torch.where(g > 0, Tt > 0, Tt < 0)
    total = (Tt * sel).sum(dim=0)
    if merge_func == "sum":
        return total
    count = sel.sum(dim=0).clamp(min=1)
    return total / count


def ties_state_dicts(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    densities: Sequence[float],
    *,
    merge_func: str = "mean",
    lam: float = 1.0,
) -> dict:
    """Paper TIES over whole state dicts; returns float64 tensors."""
    keys = sorted(base)
    b = flatten(base, keys)
    T = torch.stack([flatten(m, keys) - b for m in models])
    return unflatten(b + lam * ties_vector(T, densities, merge_func), base, keys)
