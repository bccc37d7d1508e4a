"""Bit-packed EMR masks: exactly ceil(numel / 8) bytes per tensor per task.

Bit order (fixed, part of the artifact format): the mask is flattened in row-major (C) order and
element ``k`` is bit ``k % 8`` of byte ``k // 8``, bit ``j`` having the value ``1 << j``
("little" bit order: the first element is the least significant bit). Unused high bits of the
last byte are 0 (checked when reading).

Row chunks are packed at their element offset. A chunk whose first or last element does not sit
on a byte boundary shares that byte with its neighbour; :class:`SharedBytes` ORs the pieces of such
a byte together (in any order) and releases it once every bit it must hold has been written, so
chunked packing is byte-identical to packing the whole tensor.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

BIT_ORDER: Literal["little"] = "little"


def packed_size(numel: int) -> int:
    """Bytes of a packed mask of ``numel`` elements."""
    return (numel + 7) // 8


def pack(mask: torch.Tensor) -> np.ndarray:
    """The packed bytes (uint8, ``packed_size(numel)``) of a whole boolean mask."""
    if mask.dtype != torch.bool:
        raise TypeError(f"masks must be bool tensors, got {mask.dtype}")
    return np.packbits(mask.reshape(-1).numpy(), bitorder=BIT_ORDER)


def pack_at(bits: torch.Tensor, start: int) -> np.ndarray:
    """Bytes covering elements ``[start, start + len(bits))`` of a flat mask, beginning with byte
    ``start // 8``; bits of the first/last byte outside that range are 0."""
    flat = bits.reshape(-1).numpy()
    lead = start % 8
    if lead:
        flat = np.concatenate([np.zeros(lead, dtype=np.bool_), flat])
    return np.packbits(flat, bitorder=BIT_ORDER)


def unpack(
    data: np.ndarray | torch.Tensor,
    *,
    numel: int,
    first_byte: int = 0,
    start: int | None = None,
    stop: int | None = None,
) -> torch.Tensor:
    """Elements ``[start, stop)`` (default: all ``numel``) as a flat bool tensor, from packed bytes
    ``data`` that begin at byte ``first_byte`` of the tensor's packed mask."""
    start = 8 * first_byte if start is None else start
    stop = numel if stop is None else stop
    arr = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if arr.dtype != np.uint8:
        raise TypeError(f"packed masks are uint8, got {arr.dtype}")
    lo = start - 8 * first_byte
    hi = stop - 8 * first_byte
    if lo < 0 or hi > 8 * arr.size or lo > hi:
        raise ValueError(f"elements [{start}, {stop}) are not inside the {arr.size} bytes given")
    bits = np.unpackbits(arr, count=hi, bitorder=BIT_ORDER)[lo:]  # 0/1 bytes: a valid bool view
    return torch.from_numpy(bits.view(np.bool_))


def padding_ok(last_byte: int, numel: int) -> bool:
    """True when the unused high bits of a mask's last byte are 0 (or it has none)."""
    used = numel % 8
    return used == 0 or (last_byte >> used) == 0


def bits_needed(byte: int, numel: int) -> int:
    """How many elements byte ``byte`` of a packed mask of ``numel`` elements holds (8 but the last)."""
    return min(8, numel - 8 * byte)


@dataclass
class SharedBytes:
    """Bytes written in pieces by several chunks: OR the pieces, release each byte when complete."""

    pending: dict[tuple[Hashable, int], tuple[int, int]] = field(default_factory=dict)

    def add(self, key: Hashable, byte: int, value: int, nbits: int, need: int) -> int | None:
        """Merge ``nbits`` bits (``value``) into ``byte`` of ``key``; the byte once ``need`` bits are in."""
        old_value, old_bits = self.pending.pop((key, byte), (0, 0))
        if old_value & value:
            raise ValueError(f"{key}: bits of byte {byte} written twice (overlapping chunks)")
        value, nbits = old_value | value, old_bits + nbits
        if nbits > need:
            raise ValueError(
                f"{key}: byte {byte} received {nbits} bits, it holds {need} (overlapping chunks)"
            )
        if nbits == need:
            return value
        self.pending[(key, byte)] = (value, nbits)
        return None

    def incomplete(self) -> list[tuple[Hashable, int]]:
        return sorted(self.pending, key=repr)


def split_chunk(start: int, stop: int, numel: int) -> tuple[bool, bool]:
    """(head shared, tail shared): whether the first / last byte of the packed chunk of elements
    ``[start, stop)`` also holds elements of another chunk."""
    if stop <= start:
        return False, False
    first, last = start // 8, (stop - 1) // 8
    head = (min(stop, 8 * first + 8) - start) < bits_needed(first, numel)
    tail = (stop - max(start, 8 * last)) < bits_needed(last, numel)
    return head, tail
