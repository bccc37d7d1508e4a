"""Reading one ``.safetensors`` file lazily: the header is parsed and checked by
``safetensors_format.read_header`` (no tensor data touched), tensors and row ranges are read with
positioned reads (``preadv``) into fresh memory.

``read`` returns a fresh tensor the caller owns (writing into it never touches the file or later
reads). Memory maps are not used on purpose: touched mapped pages stay resident and count in
the process RSS, so a long streaming merge would grow towards the model size.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from weightmerge.io._common import check_rows, itemsize, numel
from weightmerge.io.base import TensorInfo
from weightmerge.io.safetensors_format import read_header as read_format_header


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    begin: int  # absolute byte offset in the file
    end: int


def _fail(path: str, msg: str) -> ValueError:
    return ValueError(f"safetensors file {path}: {msg}")


def read_header(path: str) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse and check a safetensors header (``safetensors_format.read_header``): entries by name,
    and the ``__metadata__`` dict."""
    stored, metadata = read_format_header(path)
    entries = {
        name: _Entry(TensorInfo(name=name, shape=st.shape, dtype=st.dtype, file=path), st.begin, st.end)
        for name, st in stored.items()
    }
    return entries, metadata


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
