"""Sampling arithmetic shared by the exact selections (``engine.select.SampleSelect`` over a whole
model, the fused per-tensor TIES threshold): where to sample, and which sample window brackets
a rank. Pure integer arithmetic; no I/O."""

from __future__ import annotations

import math

import torch


def window_ranks(rank: int, total: int, s: int) -> tuple[int, int]:
    """0-based positions (lo, hi) in a sorted sample of ``s`` values out of ``total`` between which
    the value of ``rank`` (0-based, of ``total``) lies unless the sample is off by more than eight
    standard deviations of a random sample's rank (plus 16)."""
    q = (rank + 0.5) / total
    margin = 8.0 * math.sqrt(s * q * (1.0 - q)) + 16.0
    return int(q * s - margin), int(q * s + margin) + 1


def _mix32(j: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 ``j`` (multiply, xor-shift; no int64 overflow)."""
    h = (j * 1540483477) % (1 << 32)
    h = h ^ (h >> 15)
    h = (h * 1540483477) % (1 << 32)
    return h ^ (h >> 13)


def sample_positions(start: int, m: int, step: int) -> torch.Tensor:
    """Positions in ``[0, m)`` of the sampled values among the stream's values ``[start, start + m)``:
    one per stride ``[j*step, (j+1)*step)`` of the whole stream, at a hashed offset inside it
    (a stratified sample). A plain stride would alias with the tensors' row length (a stride that
    divides 768 samples the same columns of every row, and columns differ)."""
    if step == 1:
        return torch.arange(m)
    j = torch.arange(start // step, (start + m - 1) // step + 1, dtype=torch.int64)
    pos = j * step + _mix32(j) % step - start
    return pos[(pos >= 0) & (pos < m)]
