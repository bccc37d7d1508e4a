"""Shared pieces of the SVD-based merge methods (tsv_m, iso_c, iso_cts, cart, doge_ta).

These methods treat every 2-D tensor as a matrix and merge it through singular value
decompositions; every other tensor (biases, norms, 0-d/3-d+ tensors) is averaged. SVDs run in
float64 whatever the compute dtype (in float32 the polar factors and the trailing singular values
of realistic task vectors change in the 4th-5th digit), and their results are cast back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from weightmerge.methods.base import TensorCtx

if TYPE_CHECKING:
    from torch import Tensor


def is_matrix(ctx: TensorCtx) -> bool:
    """True for the tensors the SVD methods decompose: exactly two dimensions."""
    return len(ctx.full_shape) == 2


def svd64(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD (U, S, Vh) of ``a`` in float64: U (m, k), S (k,), Vh (k, n), k = min(m, n)."""
    return torch.linalg.svd(a.to(torch.float64), full_matrices=False)


def polar(a: Tensor) -> Tensor:
    """The orthogonal polar factor U Vh of ``a`` (the nearest matrix with orthonormal columns or
    rows), from its float64 SVD."""
    u, _, vh = svd64(a)
    return u @ vh


def per_model(values: tuple[float, ...] | list[float], like: Tensor) -> Tensor:
    """(n, 1, ..., 1) tensor of per-model scalars broadcasting against ``like`` (n, *shape)."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))


def check_finite(ctx: TensorCtx, method: str) -> None:
    """Refuse NaN or infinite inputs, naming the tensor (an SVD of them fails or returns NaN)."""
    x = ctx.x
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{method}: NaN or infinite entries in the inputs of tensor {ctx.name!r}")
