"""Sign consensus and disjoint merging, shared by ``ties``, ``dare_ties`` (and any TIES-like method).

    elected_p   = sign(sum_i v_{i,p})                 (mass election over the models' values v)
    agree_{i,p} = v_{i,p} > 0 if elected_p > 0 else v_{i,p} < 0      (zeros never agree)
    mixed_p     = sum_i u_{i,p} agree_{i,p}  [ / sum_i w_i agree_{i,p}  if normalize; 0 -> 1 ]

``v`` is what votes (weighted deltas for mergekit, unweighted trimmed deltas for paper TIES) and
``u`` what is merged (the weighted deltas). All functions are element-wise, pure, and take the
stacked ``(n_models, *shape)`` tensors; nothing here is scope-dependent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import Tensor


def model_view(per_model: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``(n,)`` vector to broadcast against ``like`` of shape ``(n, *shape)``."""
    return per_model.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def elect_sign(values: Tensor, *, zero: float | Tensor) -> Tensor:
    """``(n, *shape) -> (*shape)``: sign of the column sum; entries whose sum is 0 get ``zero``.

    ``zero = 1.0`` is mergekit's rule (sum >= 0 -> +1); paper TIES passes the majority sign.
    """
    total = values.sum(dim=0)
    sign = torch.sign(total)
    fill = torch.as_tensor(zero, dtype=sign.dtype, device=sign.device)
    return torch.where(total == 0, fill, sign)


def agreement(values: Tensor, elected: Tensor) -> Tensor:
    """Bool ``(n, *shape)``: v_i > 0 where elected > 0, else v_i < 0 (the reference's rule, so an
    elected sign of 0 selects the negative entries); exact zeros never agree."""
    return torch.where(elected > 0, values > 0, values < 0)


def merge_agreeing(weighted: Tensor, weights: Tensor, agree: Tensor, *, normalize: bool) -> Tensor:
    """``sum_i weighted_i * agree_i``, divided by ``sum_i w_i agree_i`` when ``normalize`` (a zero
    divisor counts as 1, so entries nobody agrees on give 0). ``weighted`` and ``agree`` are
    overwritten."""
    divisor = None
    if normalize:
        # sum_i w_i [agree_i]: one (n, *shape) temporary (where == w * 1.0 or 0: the same summands,
        # up to the sign of zero, which the zero-divisor rule below makes irrelevant)
        zero = torch.zeros((), dtype=weighted.dtype, device=weighted.device)
        divisor = torch.where(agree, model_view(weights, weighted), zero).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    mixed = weighted.masked_fill_(agree.logical_not_(), 0.0).sum(dim=0)  # agree is not needed after
    return mixed if divisor is None else mixed / divisor


def majority_sign(elected: Tensor) -> Tensor:
    """Scalar sign of the sum of elected signs (paper TIES's fallback for a zero elected sign)."""
    return torch.sign(elected.to(torch.float64).sum())
