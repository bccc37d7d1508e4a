"""The safetensors file format, once: dtype table, header reading and encoding, shard planning and
a positioned writer. The checkpoint reader (``safetensors_io``), the checkpoint writer
(``writer``) and the EMR artifact writer (``weightmerge.emr.writer``) are built on it.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data buffer; offsets are relative to the buffer start, data little-endian, row-major.

The reader is as strict as the safetensors library (0.8): a header longer than 100,000,000 bytes
(the library's limit), dims or offsets that are not non-negative integers (``true``, ``1.0``),
an unknown dtype, metadata values that are not strings, offsets that do not match the dtype and
shape, a hole or an overlap in the data buffer, or a buffer that does not end where the file does
are refused; it also refuses a name given twice (the library keeps one of them silently). Every
error names the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# safetensors dtype names <-> torch dtypes (little-endian, as the format prescribes). Formats torch
# cannot hold element-wise (F4/F6 packed, complex) are not listed: they are refused by name.
ST_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit (HeaderTooLarge above it)
METADATA = "__metadata__"


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return numel(shape) * itemsize(dtype)


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors name of ``dtype`` (TypeError for one the format cannot store)."""
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored in safetensors") from None


# ---------------------------------------------------------------------------------------------
# Headers


@dataclass(frozen=True)
class Slot:
    """One tensor's place in a file: ``begin``/``end`` relative to the data buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    begin: int
    end: int


def pack(entries: Sequence[tuple[str, Sequence[int], torch.dtype]]) -> list[Slot]:
    """Slots for ``(name, shape, dtype)`` laid out in the order given, without gaps."""
    out, offset = [], 0
    for name, shape, dtype in entries:
        size = nbytes(tuple(shape), dtype)
        out.append(Slot(name, tuple(int(s) for s in shape), dtype, offset, offset + size))
        offset += size
    return out


def encode_header(
    slots: Sequence[Slot], metadata: Mapping[str, str] | None = None, *, ensure_ascii: bool = True
) -> bytes:
    """The 8-byte length prefix and the compact JSON header (``__metadata__`` first when given, then
    the slots in order), padded with spaces to a multiple of 8 bytes, as the library writes it."""
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA] = {str(k): str(v) for k, v in metadata.items()}
    for s in slots:
        if s.name == METADATA or s.name in header:
            raise ValueError(f"tensor name {s.name!r} is reserved or repeated")
        header[s.name] = {
            "dtype": dtype_code(s.dtype),
            "shape": list(s.shape),
            "data_offsets": [s.begin, s.end],
        }
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=ensure_ascii).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def dtype_code(self) -> str:
        return TORCH_TO_ST[self.dtype]


def _fail(path: str, msg: str) -> ValueError:
    return ValueError(f"safetensors file {path}: {msg}")


def _short(value: Any, limit: int = 100) -> str:
    """A bounded repr: header values come from untrusted files (up to 100 MB of JSON)."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} characters)"


def _no_duplicates(path: str, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _fail(path, f"the header lists {_short(k)} twice")
        out[k] = v
    return out


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry(path: str, name: str, raw: Any, data_start: int) -> StoredTensor:
    what = f"tensor {_short(name)}"
    if not isinstance(raw, dict):
        raise _fail(path, f"header entry {_short(name)} is not an object")
    code, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not isinstance(code, str) or code not in ST_TO_TORCH:
        raise _fail(
            path, f"{what} has unsupported dtype {_short(code)} (supported: {', '.join(sorted(ST_TO_TORCH))})"
        )
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise _fail(path, f"{what} has an invalid shape {_short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _fail(path, f"{what} has invalid data_offsets {_short(offsets)}")
    dtype = ST_TO_TORCH[code]
    want = nbytes(shape, dtype)
    if offsets[1] - offsets[0] != want:
        raise _fail(
            path,
            f"{what} ({code}, shape {_short(shape)}) needs {want} bytes but its data_offsets "
            f"{offsets} span {offsets[1] - offsets[0]}",
        )
    return StoredTensor(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Parse and check a safetensors header (see the module docstring): tensors by name, with
    absolute offsets, and the ``__metadata__`` dict. Reads the header only."""
    path = os.fspath(path)
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"truncated: {file_size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise _fail(path, f"header length {n} is over the format's limit of {MAX_HEADER_BYTES} bytes")
        if 8 + n > file_size:
            raise _fail(
                path,
                f"header length {n} does not fit in the file ({file_size} bytes): truncated, or not a "
                "safetensors file",
            )
        raw_header = f.read(n)
    try:
        header = json.loads(
            raw_header.decode("utf-8"), object_pairs_hook=lambda pairs: _no_duplicates(path, pairs)
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, f"header is not valid JSON ({err}): corrupted or not a safetensors file") from None
    except RecursionError:
        raise _fail(path, "header JSON is nested too deeply: corrupted or not a safetensors file") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = header.pop(METADATA, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "__metadata__ is not an object of strings")
    data_start = 8 + n
    entries = {name: _entry(path, name, raw, data_start) for name, raw in header.items()}
    for e in entries.values():
        if e.end > file_size:
            raise _fail(
                path,
                f"truncated: tensor {_short(e.name)} ends at byte {e.end} but the file has {file_size} bytes",
            )
    end, before = data_start, ""
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin < end:
            raise _fail(path, f"tensors {_short(before)} and {_short(e.name)} overlap in the data buffer")
        if e.begin > end:
            raise _fail(
                path, f"a hole of {e.begin - end} bytes before tensor {_short(e.name)} in the data buffer"
            )
        end, before = e.end, e.name
    if end != file_size:
        raise _fail(path, f"{file_size - end} bytes after the last tensor's data")
    return entries, {str(k): str(v) for k, v in metadata.items()}


# ---------------------------------------------------------------------------------------------
# Writing


def plan_shards(sizes: Sequence[int], max_bytes: int) -> list[list[int]]:
    """Indices into ``sizes`` per shard, greedy in the order given: a new shard when the next item
    would push the current one past ``max_bytes`` (an item larger than that gets a shard of its
    own). No items: one empty shard."""
    if max_bytes <= 0:
        raise ValueError(f"max shard size must be a positive number of bytes, got {max_bytes}")
    shards: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(sizes):
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw little-endian bytes of ``t`` (row-major) as a uint8 array, without copying when possible."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


class PositionedFile:
    """A file created at its final size with its header written first; data is then written at
    absolute byte positions (``os.pwrite``), in any order, from any thread.

    ``exclusive``: refuse an existing file (else it is truncated)."""

    def __init__(self, path: str | os.PathLike[str], header: bytes, size: int, *, exclusive: bool) -> None:
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        self._fd: int | None = os.open(self.path, flags, 0o644)
        try:
            self.pwrite(header, 0)
            os.ftruncate(self._fd, size)
        except BaseException:
            self.close(fsync=False)
            raise

    @classmethod
    def existing(cls, path: str | os.PathLike[str]) -> PositionedFile:
        """An existing file of the right layout, opened for positioned writes as it is."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR)
        return self

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def pwrite(self, data: bytes | memoryview | np.ndarray, pos: int) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        view = (data.data if isinstance(data, np.ndarray) else memoryview(data)).cast("B")
        while len(view):
            done = os.pwrite(self._fd, view, pos)
            if done <= 0:
                raise OSError(f"{self.path}: pwrite wrote {done} bytes")
            view, pos = view[done:], pos + done

    def close(self, *, fsync: bool = True) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
