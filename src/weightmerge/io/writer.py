"""A header-first sharded safetensors writer with positioned writes.

The whole output layout (name, shape, dtype) is given up front, so every shard's header and every
tensor's byte range are known before any data arrives: shards are assigned in the given order
(a new shard starts when the next tensor would push the current one past ``shard_size`` bytes; a
tensor larger than the limit gets a shard of its own), each shard file is created at its final
size with its header written first, and ``write(name, tensor, rows=None)`` puts whole tensors or
row ranges at their offsets with ``os.pwrite``: in any order, from any thread, holding no data
beyond the chunk it is given. ``finalize()`` checks that every tensor's rows were written exactly
once (overlaps are refused as they happen), fsyncs, and writes ``model.safetensors.index.json``
(with ``metadata.total_size``) when there is more than one shard; a single shard is
``model.safetensors``. Shards are ``model-00001-of-0000N.safetensors``, as transformers names them.

Within a shard, tensors are stored by decreasing element size (then in the given order), and the
header is padded with spaces to a multiple of 8 bytes, so every tensor's data is aligned for its
dtype; the header lists ``__metadata__ = {"format": "pt"}`` (plus any metadata given).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from weightmerge.io._common import check_rows
from weightmerge.io.atomic import fsync_dir
from weightmerge.io.safetensors_format import (
    TORCH_TO_ST,
    PositionedFile,
    encode_header,
    itemsize,
    nbytes,
    numel,
    pack,
)
from weightmerge.io.safetensors_format import plan_shards as plan_sizes

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

TensorSpec = tuple[str, Sequence[int], torch.dtype]


@dataclass(frozen=True)
class _Slot:
    shard: int
    begin: int  # absolute file offset of the tensor's data
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return numel(self.shape[1:]) * itemsize(self.dtype) if self.shape else itemsize(self.dtype)


@dataclass
class _Progress:
    spans: list[tuple[int, int]] = field(default_factory=list)  # row ranges written
    calls: int = 0


def plan_shards(layout: Sequence[TensorSpec], shard_size: int) -> list[list[int]]:
    """Indices into ``layout`` per shard: in order, a new shard when the next tensor would exceed
    ``shard_size`` bytes (a tensor larger than the limit alone in its shard); no shard for an empty
    layout."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be a positive number of bytes, got {shard_size}")
    groups = plan_sizes([nbytes(tuple(shape), dtype) for _name, shape, dtype in layout], shard_size)
    return groups if layout else []


def shard_names(n: int) -> list[str]:
    return [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _check_layout(layout: Sequence[TensorSpec]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    seen: set[str] = set()
    out = []
    for spec in layout:
        name, shape, dtype = spec
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in the output layout")
        seen.add(name)
        if dtype not in TORCH_TO_ST:
            raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        shp = tuple(int(s) for s in shape)
        if any(s < 0 for s in shp):
            raise ValueError(f"tensor {name!r}: negative dimension in shape {shp}")
        out.append((name, shp, dtype))
    return out


class ShardedSafetensorsWriter:
    """Writes one safetensors checkpoint (see the module docstring). Use as a context manager, or
    call ``finalize()`` on success and ``close()`` on failure."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        layout: Sequence[TensorSpec],
        *,
        shard_size: int,
        metadata: Mapping[str, str] | None = None,
        resume: bool = False,
    ) -> None:
        if sys.byteorder != "little":
            raise RuntimeError(
                "safetensors data is little-endian; this writer runs on little-endian hosts only"
            )
        self.directory = os.fspath(directory)
        specs = _check_layout(layout)
        meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        groups = plan_shards(specs, shard_size)
        self.files = shard_names(len(groups)) if specs else [SINGLE_NAME]
        self._slots: dict[str, _Slot] = {}
        self._progress: dict[str, _Progress] = {name: _Progress() for name, _, _ in specs}
        self._files: list[PositionedFile] = []
        self._lock = threading.Condition()
        self._inflight = 0  # writes between bookkeeping and pwrite: close() waits for them
        self._done = False
        self._written: list[str] | None = None  # set by finalize()
        self.total_size = sum(nbytes(s, d) for _, s, d in specs)
        self.resumed_files: list[str] = []  # shards kept from an interrupted run (resume=True)
        try:
            for k, group in enumerate(groups or [[]]):
                self._open_shard(k, [specs[i] for i in group], meta, resume=resume)
        except BaseException:
            self.close()
            raise

    def _open_shard(
        self,
        k: int,
        specs: list[tuple[str, tuple[int, ...], torch.dtype]],
        meta: dict[str, str],
        *,
        resume: bool = False,
    ) -> None:
        order = sorted(range(len(specs)), key=lambda i: -itemsize(specs[i][2]))  # stable: given order kept
        slots = pack([specs[i] for i in order])
        head = encode_header(slots, meta, ensure_ascii=False)
        for sl in slots:
            self._slots[sl.name] = _Slot(k, len(head) + sl.begin, sl.shape, sl.dtype)
        path = os.path.join(self.directory, self.files[k])
        size = len(head) + (slots[-1].end if slots else 0)
        if resume and _same_layout(path, head, size):
            # an interrupted run's shard of exactly this layout: keep its bytes (the caller marks
            # the tensors it knows complete with mark_written; the others are written again)
            self._files.append(PositionedFile.existing(path))
            self.resumed_files.append(self.files[k])
            return
        self._files.append(PositionedFile(path, head, size, exclusive=False))

    def write(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Store ``tensor`` as tensor ``name`` (or as its rows ``[start, stop)``): dtype and shape
        must match the layout exactly. Thread-safe; each row may be written once."""
        slot = self._slots.get(name)
        if slot is None:
            raise KeyError(f"tensor {name!r} is not in the output layout")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != slot.dtype:
            raise TypeError(f"tensor {name!r}: layout says dtype {slot.dtype}, got {tensor.dtype}")
        start, stop = check_rows(name=name, shape=slot.shape, rows=rows)
        want = slot.shape if rows is None else (stop - start, *slot.shape[1:])
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"tensor {name!r}: expected shape {want} for rows {rows}, got {tuple(tensor.shape)}"
            )
        with self._lock:
            if self._done:
                raise ValueError(f"writer for {self.directory} is finalized or closed; cannot write {name!r}")
            prog = self._progress[name]
            for a, b in prog.spans:
                if (start < b and a < stop) or (a == b == start == stop and slot.rows == 0):
                    raise ValueError(
                        f"tensor {name!r}: rows [{start}, {stop}) overlap rows [{a}, {b}) written before"
                    )
            prog.spans.append((start, stop))
            prog.calls += 1
            file = self._files[slot.shard]
            self._inflight += 1
        try:
            if tensor.numel():
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                file.pwrite(data, slot.begin + start * slot.row_bytes)
        except BaseException:
            with self._lock:
                prog.spans.remove((start, stop))
                prog.calls -= 1
            raise
        finally:
            with self._lock:
                self._inflight -= 1
                self._lock.notify_all()

    def mark_written(self, name: str) -> None:
        """Record tensor ``name`` as completely written by an earlier, interrupted run whose shard
        was kept (``resume=True``); its rows must not be written again."""
        slot = self._slots.get(name)
        if slot is None:
            raise KeyError(f"tensor {name!r} is not in the output layout")
        if self.files[slot.shard] not in self.resumed_files:
            raise ValueError(
                f"tensor {name!r}: its shard {self.files[slot.shard]} was not kept; cannot resume it"
            )
        with self._lock:
            prog = self._progress[name]
            prog.spans = [(0, slot.rows)]
            prog.calls = max(prog.calls, 1)

    def complete(self, name: str) -> bool:
        """Whether every row of tensor ``name`` has been written."""
        slot = self._slots[name]
        with self._lock:
            covered = sum(b - a for a, b in self._progress[name].spans)
            return self._progress[name].calls > 0 and covered >= slot.rows

    def sync(self) -> None:
        """fsync the shard files written so far (what a resume may rely on after a power loss)."""
        with self._lock:
            files = list(self._files)
        for f in files:
            f.sync()

    def missing(self) -> dict[str, list[tuple[int, int]]]:
        """Tensors not completely written: name -> row ranges still missing."""
        out: dict[str, list[tuple[int, int]]] = {}
        with self._lock:
            for name, prog in self._progress.items():
                total = self._slots[name].rows
                gaps, at = [], 0
                for a, b in sorted(prog.spans):
                    if a > at:
                        gaps.append((at, a))
                    at = max(at, b)
                if at < total:
                    gaps.append((at, total))
                if gaps or prog.calls == 0:
                    out[name] = gaps or [(0, total)]
        return out

    def finalize(self) -> list[str]:
        """Check completeness, fsync, write the index when sharded. Returns the files written."""
        if self._written is not None:
            return list(self._written)
        with self._lock:
            self._lock.wait_for(lambda: self._inflight == 0)
            missing = self.missing()
            if missing:
                shown = ", ".join(
                    f"{n} (rows {', '.join(f'[{a}, {b})' for a, b in gaps)})"
                    for n, gaps in list(missing.items())[:10]
                )
                more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
                raise ValueError(f"output in {self.directory} is incomplete: not written: {shown}{more}")
            self._done = True
        shards, self._files = self._files, []
        for shard in shards:
            shard.close(fsync=True)
        files = list(self.files)
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: self.files[self._slots[name].shard] for name in sorted(self._slots)},
            }
            path = os.path.join(self.directory, INDEX_NAME)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            files.append(INDEX_NAME)
        fsync_dir(self.directory)
        self._written = files
        return list(files)

    def close(self) -> None:
        """Release the files without checks (after a failure; the caller discards the directory)."""
        with self._lock:
            self._done = True
            self._lock.wait_for(lambda: self._inflight == 0)
            shards, self._files = self._files, []
        for shard in shards:
            shard.close(fsync=False)

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            try:
                self.finalize()
            finally:
                self.close()
        else:
            self.close()


def _same_layout(path: str, head: bytes, size: int) -> bool:
    """Whether ``path`` is a shard file with exactly this header and total size."""
    try:
        if os.path.getsize(path) != size:
            return False
        with open(path, "rb") as f:
            return f.read(len(head)) == head
    except OSError:
        return False
