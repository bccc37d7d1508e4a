"""Header-first safetensors files for the EMR artifact and for materialized checkpoints.

The layout (names, shapes, dtypes) is known before any data exists, so the header is written
first, the file is sized at once, and tensors or row chunks are written at their byte offsets in
any order. The bytes depend only on the layout and the data, never on the write order. Tensors
are laid out in the order given, without gaps; the JSON header is compact and padded with spaces
to a multiple of 8 bytes, as the safetensors library writes it.

Materialized checkpoints use ``weightmerge.io.writer``; the artifact keeps this small writer
because masks need byte-level positioned writes (partial mask bytes of row chunks), its files
have their own names (``unified*``, ``masks-*``), and the artifact format must not change when
the checkpoint writer's layout rules do.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored in safetensors") from None


def dtype_name(dtype: torch.dtype) -> str:
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
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def encode_header(entries: Sequence[Entry], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length prefix and the padded JSON header of a file holding ``entries`` in order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for e in entries:
        if e.name == "__metadata__" or e.name in header:
            raise ValueError(f"tensor name {e.name!r} is reserved or repeated")
        header[e.name] = {
            "dtype": dtype_code(e.dtype),
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw little-endian bytes of ``t`` (row-major) as a uint8 array, without copying when possible."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


class FileWriter:
    """One safetensors file, created at full size from its header; data written at offsets."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Sequence[Entry],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.entries = {e.name: e for e in entries}
        head = encode_header(entries, metadata)
        self._start: dict[str, int] = {}
        pos = len(head)
        for e in entries:
            self._start[e.name] = pos
            pos += e.nbytes
        self.size = pos
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._pwrite(head, 0)
        os.ftruncate(self._fd, self.size)

    def _pwrite(self, data: bytes | np.ndarray, pos: int) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        view = (data.data if isinstance(data, np.ndarray) else memoryview(data)).cast("B")
        while len(view):
            done = os.pwrite(self._fd, view, pos)
            view, pos = view[done:], pos + done

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
            self._pwrite(data, self._start[name] + byte_offset)

    def write_tensor(self, name: str, t: torch.Tensor, element_offset: int = 0) -> None:
        e = self.entries.get(name)
        if e is None:
            raise KeyError(f"{self.path.name}: no tensor {name!r} in the layout")
        if t.dtype != e.dtype:
            raise TypeError(f"tensor {name!r}: got {t.dtype}, the layout says {e.dtype}")
        self.write_bytes(name, tensor_bytes(t), element_offset * e.itemsize)

    def close(self, *, fsync: bool = True) -> None:
        if self._fd is not None:
            if fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


def shard_file_names(prefix: str, n: int) -> list[str]:
    if n == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_shards(entries: Sequence[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Greedy, in the order given: a new shard when the next tensor would overflow the current one."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max shard size must be positive, got {max_shard_bytes}")
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


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
        shards = plan_shards(entries, max_shard_bytes)
        self.files = shard_file_names(prefix, len(shards))
        self.file_of = {e.name: f for f, group in zip(self.files, shards, strict=True) for e in group}
        self.total_bytes = sum(e.nbytes for e in entries)
        self._index = index and len(shards) > 1
        self._writers = [
            FileWriter(self.directory / f, g, metadata) for f, g in zip(self.files, shards, strict=True)
        ]
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


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype_code: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Parse and validate a safetensors header: sizes, offsets, dtypes; errors name the file."""
    p = Path(path)
    size = p.stat().st_size
    what = f"{p} is not a valid safetensors file"
    if size < 8:
        raise ValueError(f"{what}: {size} bytes (truncated?)")
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{what}: header length {n} exceeds the file ({size} bytes; truncated?)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{what}: header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{what}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    out: dict[str, StoredTensor] = {}
    data_start = 8 + n
    spans = []
    for name, d in header.items():
        try:
            code, shape, (b, e) = d["dtype"], tuple(int(s) for s in d["shape"]), d["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{what}: malformed entry for tensor {name!r}") from None
        if code not in CODE_DTYPES:
            raise ValueError(f"{what}: tensor {name!r} has unknown dtype {code!r}")
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=CODE_DTYPES[code]).element_size()
        if not 0 <= b <= e or e - b != numel * itemsize:
            raise ValueError(f"{what}: tensor {name!r} offsets [{b}, {e}) do not match {code}{list(shape)}")
        out[name] = StoredTensor(name, code, shape, data_start + b, data_start + e)
        spans.append((b, e))
    end = 0
    for b, e in sorted(spans):
        if b != end:
            raise ValueError(f"{what}: tensor data has a gap or overlap at byte {b}")
        end = e
    if data_start + end != size:
        raise ValueError(
            f"{what}: {size} bytes on disk, the header describes {data_start + end} (truncated?)"
        )
    return out, {str(k): str(v) for k, v in metadata.items()}
