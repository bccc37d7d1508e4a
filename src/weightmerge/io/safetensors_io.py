"""Reading one ``.safetensors`` file lazily: the JSON header is parsed and checked here (no tensor
data touched), tensors and row ranges are read with positioned reads (``preadv``) into fresh memory.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data buffer; offsets are relative to the buffer start, data little-endian, row-major.

``read`` returns a fresh tensor the caller owns (writing into it never touches the file or later
reads). Memory maps are not used on purpose: touched mapped pages stay resident and count in
the process RSS, so a long streaming merge would grow towards the model size.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from weightmerge.io._common import ST_TO_TORCH, check_rows, itemsize, numel
from weightmerge.io.base import TensorInfo

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    begin: int  # absolute byte offset in the file
    end: int


def _fail(path: str, msg: str) -> ValueError:
    return ValueError(f"safetensors file {path}: {msg}")


def _short(value: Any, limit: int = 100) -> str:
    """A bounded repr: header values come from untrusted files (up to 100 MB of JSON)."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} characters)"


def _parse_entry(path: str, name: Any, raw: Any, data_start: int, file_size: int) -> _Entry:
    if not isinstance(name, str) or not isinstance(raw, dict):
        raise _fail(path, f"header entry {_short(name)} is not an object")
    dtype_name = raw.get("dtype")
    shape = raw.get("shape")
    offsets = raw.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in ST_TO_TORCH:
        raise _fail(
            path,
            f"tensor {_short(name)} has unsupported dtype {_short(dtype_name)} "
            f"(supported: {', '.join(sorted(ST_TO_TORCH))})",
        )
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _fail(path, f"tensor {_short(name)} has an invalid shape {_short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _fail(path, f"tensor {_short(name)} has invalid data_offsets {_short(offsets)}")
    dtype = ST_TO_TORCH[dtype_name]
    want = numel(tuple(shape)) * itemsize(dtype)
    if offsets[1] - offsets[0] != want:
        raise _fail(
            path,
            f"tensor {_short(name)} ({dtype_name}, shape {_short(shape)}) needs {want} bytes but its "
            f"data_offsets {offsets} span {offsets[1] - offsets[0]}",
        )
    begin, end = data_start + offsets[0], data_start + offsets[1]
    if end > file_size:
        raise _fail(
            path,
            f"truncated: tensor {_short(name)} ends at byte {end} but the file has {file_size} bytes",
        )
    return _Entry(TensorInfo(name=name, shape=tuple(shape), dtype=dtype, file=path), begin, end)


def read_header(path: str) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse and check a safetensors header: entries by name, and the ``__metadata__`` dict."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"truncated: {file_size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > file_size:
            raise _fail(
                path,
                f"header length {n} does not fit in the file ({file_size} bytes): truncated, or not a "
                "safetensors file",
            )
        raw_header = f.read(n)
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, f"header is not valid JSON ({err}): corrupted or not a safetensors file") from None
    except RecursionError:
        raise _fail(path, "header JSON is nested too deeply: corrupted or not a safetensors file") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _fail(path, "__metadata__ is not an object")
    data_start = 8 + n
    entries = {name: _parse_entry(path, name, raw, data_start, file_size) for name, raw in header.items()}
    spans = sorted((e.begin, e.end, e.info.name) for e in entries.values() if e.end > e.begin)
    for (_b0, e0, n0), (b1, _e1, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise _fail(path, f"tensors {_short(n0)} and {_short(n1)} overlap in the data buffer")
    return entries, {str(k): str(v) for k, v in metadata.items()}


class _FdPool:
    """A process-wide LRU of open file descriptors, so the number of files held open stays bounded
    however many shards the inputs have (30 experts x 40 shards under ``ulimit -n 1024``).

    ``use(owner)`` yields the owner's descriptor, opening it (and closing the least recently used
    idle one when full) as needed; a descriptor in use by a read is pinned and never closed under
    it (the pool then exceeds its capacity until the read ends)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: OrderedDict[object, list[Any]] = OrderedDict()  # owner -> [fd, pins, path]
        self.capacity = _default_capacity()

    @contextlib.contextmanager
    def use(self, owner: object, path: str) -> Iterator[int]:
        with self._lock:
            ent = self._open.get(owner)
            if ent is None:
                self._evict(self.capacity - 1)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as err:
                    if err.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
                    self._evict(0)  # the process is out of descriptors: give back every idle one
                    fd = os.open(path, os.O_RDONLY)
                ent = self._open[owner] = [fd, 0, path]
            self._open.move_to_end(owner)
            ent[1] += 1
        try:
            yield ent[0]
        finally:
            with self._lock:
                ent[1] -= 1
                if ent[1] == 0 and self._open.get(owner) is not ent:  # discarded while in use
                    os.close(ent[0])

    def _evict(self, keep: int) -> None:
        for owner in list(self._open):
            if len(self._open) <= keep:
                return
            ent = self._open[owner]
            if ent[1] == 0:
                del self._open[owner]
                os.close(ent[0])

    def discard(self, owner: object) -> None:
        with self._lock:
            ent = self._open.pop(owner, None)
            if ent is not None and ent[1] == 0:
                os.close(ent[0])

    def count(self) -> int:
        with self._lock:
            return len(self._open)


def _default_capacity() -> int:
    """128 open shards, or an eighth of the soft descriptor limit when that is lower (min. 8)."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 128
    if soft == resource.RLIM_INFINITY:
        return 128
    return max(8, min(128, soft // 8))


FD_POOL = _FdPool()


class SafetensorsFile:
    """A TensorSource over one ``.safetensors`` file."""

    def __init__(self, path: str, *, config: dict[str, Any] | None = None) -> None:
        self.path = path
        self.config = config
        self._entries, self.metadata = read_header(path)

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.path}") from None

    def info(self, name: str) -> TensorInfo:
        return self._entry(name).info

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        e = self._entry(name)
        shape = e.info.shape
        start, stop = check_rows(name=name, shape=shape, rows=rows)
        out_shape = shape if rows is None else (stop - start, *shape[1:])
        row_bytes = numel(shape[1:]) * itemsize(e.info.dtype)
        begin = e.begin + start * row_bytes if shape else e.begin
        end = e.begin + stop * row_bytes if shape else e.end
        if end == begin:
            return torch.empty(out_shape, dtype=e.info.dtype)
        # Positioned read into fresh memory, not a memory map: mapped pages stay resident (and count
        # in the process RSS) after use, so a long merge would grow towards the model size; a pread
        # buffer is freed with the tensor, keeping peak memory independent of the model size.
        flat = torch.empty(end - begin, dtype=torch.uint8)
        buf = flat.numpy().data
        done = 0
        with FD_POOL.use(self, self.path) as fd:
            while done < end - begin:
                got = os.preadv(fd, [buf[done:]], begin + done)
                if got <= 0:
                    raise _fail(self.path, f"unexpected end of file reading tensor {name!r}")
                done += got
        flat = flat.view(e.info.dtype)
        return flat.reshape(out_shape)

    def close(self) -> None:
        FD_POOL.discard(self)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
