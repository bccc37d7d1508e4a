"""Reading one ``.safetensors`` file lazily: the header is parsed and checked by
``safetensors_format.read_header`` (no tensor data touched), tensors and row ranges are read with
positioned reads (``preadv``) into fresh memory.

``read`` returns a fresh tensor the caller owns (writing into it never touches the file or later
reads). Memory maps are not used on purpose: touched mapped pages stay resident and count in
the process RSS, so a long streaming merge would grow towards the model size.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from weightmerge.io._common import check_rows
from weightmerge.io.base import TensorInfo
from weightmerge.io.safetensors_format import itemsize, numel
from weightmerge.io.safetensors_format import read_header as read_format_header


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    begin: int  # absolute byte offset in the file
    end: int


def _fail(path: str, msg: str) -> ValueError:
    return ValueError(f"safetensors file {path}: {msg}")


def read_header(path: str) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse and check a safetensors header: entries by name, and the ``__metadata__`` dict."""
    stored, metadata = read_format_header(path)
    entries = {
        name: _Entry(TensorInfo(name=name, shape=st.shape, dtype=st.dtype, file=path), st.begin, st.end)
        for name, st in stored.items()
    }
    return entries, metadata


class SafetensorsFile:
    """A TensorSource over one ``.safetensors`` file."""

    def __init__(self, path: str, *, config: dict[str, Any] | None = None) -> None:
        self.path = path
        self.config = config
        self._entries, self.metadata = read_header(path)
        self._fdesc: int | None = None
        self._lock = threading.Lock()

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

    def _fd(self) -> int:
        with self._lock:
            if self._fdesc is None:
                self._fdesc = os.open(self.path, os.O_RDONLY)
            return self._fdesc

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
        fd = self._fd()
        while done < end - begin:
            got = os.preadv(fd, [buf[done:]], begin + done)
            if got <= 0:
                raise _fail(self.path, f"unexpected end of file reading tensor {name!r}")
            done += got
        flat = flat.view(e.info.dtype)
        return flat.reshape(out_shape)

    def close(self) -> None:
        with self._lock:
            fdesc, self._fdesc = self._fdesc, None
        if fdesc is not None:
            os.close(fdesc)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
