"""The EMR artifact's safetensors files, on the shared format module
(``weightmerge.io.safetensors_format``: dtype table, header encoding and reading, shard planning,
the positioned writer).

The layout (names, shapes, dtypes) is known before any data exists, so the header is written
first, the file is sized at once, and tensors, row chunks or single mask bytes are written at
their byte offsets in any order; the bytes depend only on the layout and the data, never on the
write order. Tensors are laid out in the order given (sorted names), without gaps; the JSON
header is compact, ASCII-only and padded with spaces to a multiple of 8 bytes, metadata first.
Files have the artifact's own names (``unified*``, ``masks-*``, ``task-*``) and keep these
rules whatever the checkpoint writer's layout rules (``weightmerge.io.writer``) become: the
artifact format is frozen by ``tests/test_emr_golden.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from weightmerge.io.safetensors_format import (
    PositionedFile,
    encode_header,
    itemsize,
    numel,
    pack,
    plan_shards,
    tensor_bytes,
)


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest's name of a dtype: torch's without the prefix (``float32``)."""
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


class FileWriter:
    """One safetensors file, created (never overwritten) at full size from its header; data written
    at offsets."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Sequence[Entry],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.entries = {e.name: e for e in entries}
        slots = pack([(e.name, e.shape, e.dtype) for e in entries])
        head = encode_header(slots, metadata, ensure_ascii=True)
        self._start = {s.name: len(head) + s.begin for s in slots}
        self.size = len(head) + (slots[-1].end if slots else 0)
        self._file = PositionedFile(self.path, head, self.size, exclusive=True)

    def write_bytes(self, name: str, data: bytes | np.ndarray, byte_offset: int = 0) -> None:
        """Write raw bytes of tensor ``name`` starting ``byte_offset`` bytes into its data."""
        e = self.entries.get(name)
        if e is None:
            raise KeyError(f"{self.path.name}: no tensor {name!r} in the layout")
        n = data.nbytes if isinstance(data, np.ndarray) else len(data)
        if byte_offset < 0 or byte_offset + n > e.nbytes:
            raise ValueError(
                f"{self.path.name}: write of {n} bytes at {byte_offset} overruns tensor {name!r} "
                f"({e.nbytes} bytes)"
            )
        if n:
            self._file.pwrite(data, self._start[name] + byte_offset)

    def write_tensor(self, name: str, t: torch.Tensor, element_offset: int = 0) -> None:
        e = self.entries.get(name)
        if e is None:
            raise KeyError(f"{self.path.name}: no tensor {name!r} in the layout")
        if t.dtype != e.dtype:
            raise TypeError(f"tensor {name!r}: got {t.dtype}, the layout says {e.dtype}")
        self.write_bytes(name, tensor_bytes(t), element_offset * e.itemsize)

    def close(self, *, fsync: bool = True) -> None:
        self._file.close(fsync=fsync)


def shard_file_names(prefix: str, n: int) -> list[str]:
    if n == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardedWriter:
    """Tensors in ``prefix.safetensors`` or ``prefix-0000i-of-0000n.safetensors`` (+ an HF index)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        entries: Sequence[Entry],
        *,
        prefix: str,
        max_shard_bytes: int,
        metadata: Mapping[str, str] | None = None,
        index: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        shards = [
            [entries[i] for i in group] for group in plan_shards([e.nbytes for e in entries], max_shard_bytes)
        ]
        self.files = shard_file_names(prefix, len(shards))
        self.file_of = {e.name: f for f, group in zip(self.files, shards, strict=True) for e in group}
        self.total_bytes = sum(e.nbytes for e in entries)
        self._index = index and len(shards) > 1
        self._writers: list[FileWriter] = []
        try:
            for f, g in zip(self.files, shards, strict=True):
                self._writers.append(FileWriter(self.directory / f, g, metadata))
        except BaseException:
            self.close(fsync=False)
            raise
        self._by_file = dict(zip(self.files, self._writers, strict=True))

    def writer(self, name: str) -> FileWriter:
        return self._by_file[self.file_of[name]]

    def write_tensor(self, name: str, t: torch.Tensor, element_offset: int = 0) -> None:
        if name not in self.file_of:
            raise KeyError(f"no tensor {name!r} in the layout of {self.prefix}")
        self.writer(name).write_tensor(name, t, element_offset)

    def close(self, *, fsync: bool = True) -> None:
        for w in self._writers:
            w.close(fsync=fsync)
        if self._index:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {k: self.file_of[k] for k in sorted(self.file_of)},
            }
            (self.directory / f"{self.prefix}.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n"
            )
