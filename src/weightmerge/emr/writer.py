"""Writing EMR artifacts: the streaming writer (positioned writes, chunk by chunk, as the engine
emits them) and the in-memory path (``write_emr_artifact``), which drives the same writer so both
produce byte-identical files.

Artifact directory (format version 1; see docs/emr-artifact.md):

    emr_manifest.json                 tasks, rescalers, rescale mode, tensors, base identity, files
    unified.safetensors               the unified task vector, one tensor per merged tensor
      (or unified-0000i-of-0000n.safetensors when over the shard size)
    masks-000.safetensors ...         per task: uint8 [ceil(numel/8)] per merged tensor (bits.py)
    task-000.safetensors ...          per task: its own tensors that are not merged (heads, ...)
    task-000.config.json ...          per task, optional: its own config.json

By default everything is written into a hidden sibling directory (``weightmerge.io.atomic``) and
renamed into place by ``finalize``; an error or an unfinished writer leaves nothing at ``out_dir``.
With ``atomic=False`` the files go straight into an existing directory that the caller makes
atomic (``weightmerge merge`` does), and ``abort`` deletes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from weightmerge.emr import bits
from weightmerge.emr.files import Entry, FileWriter, ShardedWriter, dtype_name
from weightmerge.emr.result import EMRResult, EMRTensor
from weightmerge.emr.sources import base_identity as compute_base_identity
from weightmerge.emr.sources import check_identity
from weightmerge.io.atomic import atomic_output_dir, fsync_dir

FORMAT = "weightmerge-emr"
FORMAT_VERSION = 1
MANIFEST = "emr_manifest.json"
RESCALES = ("per_tensor_mean", "global")
DEFAULT_SHARD_BYTES = 5 * 10**9
Rows = tuple[int, int] | None
LayoutItem = tuple[str, Sequence[int], torch.dtype]


def mask_file(i: int) -> str:
    return f"masks-{i:03d}.safetensors"


def task_file(i: int) -> str:
    return f"task-{i:03d}.safetensors"


def task_config_file(i: int) -> str:
    return f"task-{i:03d}.config.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 * 2**20):
            h.update(block)
    return h.hexdigest()


def check_tasks(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise TypeError("tasks must be a list of task names")
    out = list(tasks)
    if not out:
        raise ValueError("tasks is empty: an EMR artifact needs at least one task")
    for t in out:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"task names must be non-empty strings, got {t!r}")
    dup = sorted({t for t in out if out.count(t) > 1})
    if dup:
        raise ValueError(f"task name {dup[0]!r} is given twice")
    return out


class EMRArtifactWriter:
    """Streams an EMR merge into an artifact directory.

    ``layout`` lists the merged tensors ``(name, shape, output dtype)``: the dtype a task is
    materialized in. The unified vector is stored in ``unified_dtype`` (default: each tensor's
    output dtype; pass the compute dtype to make reconstruction bit-identical to the in-memory
    ``EMRResult``). ``write`` takes whole tensors or row chunks in any order; chunk boundaries need
    not fall on a multiple of 8 elements (shared mask bytes are merged, see ``bits.SharedBytes``).
    Use as a context manager (an exception aborts), or call ``abort`` yourself.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        tasks: Sequence[str],
        layout: Sequence[LayoutItem],
        base_identity: Mapping[str, Any],
        rescale: str = "per_tensor_mean",
        compute_dtype: torch.dtype = torch.float32,
        unified_dtype: torch.dtype | None = None,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        fsync: bool = True,
        atomic: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.tasks = check_tasks(tasks)
        if rescale not in RESCALES:
            raise ValueError(f"rescale must be one of {list(RESCALES)}, got {rescale!r}")
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        check_identity(base_identity)
        self.rescale, self.compute_dtype, self.fsync = rescale, compute_dtype, fsync
        self.identity = dict(base_identity)
        self.outputs = self._check_layout(layout)
        self.unified_entries = [
            Entry(e.name, e.shape, unified_dtype or e.dtype) for e in self.outputs.values()
        ]
        for e in self.unified_entries:
            if not e.dtype.is_floating_point:
                raise TypeError(
                    f"tensor {e.name!r}: the unified vector needs a floating dtype, got {e.dtype}"
                )
        self._created: list[str] = []
        self._atomic: AbstractContextManager[Path] | None = None
        if atomic:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self._atomic = atomic_output_dir(self.out_dir, force=False)
            self.dir = self._atomic.__enter__()
        else:
            if not self.out_dir.is_dir():
                raise NotADirectoryError(f"{self.out_dir} is not a directory (atomic=False writes into one)")
            if (self.out_dir / MANIFEST).exists():
                raise FileExistsError(f"{self.out_dir} already holds an EMR artifact")
            self.dir = self.out_dir
        self._done = False
        try:
            self._unified = ShardedWriter(
                self.dir,
                self.unified_entries,
                prefix="unified",
                max_shard_bytes=max_shard_bytes,
                metadata={"format": FORMAT, "content": "unified task vector"},
            )
            self._created += self._unified.files
            self._masks = []
            for i, task in enumerate(self.tasks):
                entries = [
                    Entry(e.name, (bits.packed_size(e.numel),), torch.uint8) for e in self.outputs.values()
                ]
                meta = {"format": FORMAT, "content": "mask", "task": task, "bit_order": bits.BIT_ORDER}
                self._masks.append(FileWriter(self.dir / mask_file(i), entries, meta))
                self._created.append(mask_file(i))
        except BaseException:
            self._discard()
            raise
        self._shared = bits.SharedBytes()
        self._written = dict.fromkeys(self.outputs, 0)  # elements written per tensor

    def _check_layout(self, layout: Sequence[LayoutItem]) -> dict[str, Entry]:
        base = self.identity["tensors"]
        out: dict[str, Entry] = {}
        for item in layout:
            name, shape, dtype = item
            e = Entry(str(name), tuple(int(s) for s in shape), dtype)
            if e.name in out:
                raise ValueError(f"tensor {e.name!r} appears twice in the layout")
            b = base.get(e.name)
            if b is None:
                raise ValueError(f"merged tensor {e.name!r} is not in the base model {self.identity['path']}")
            if tuple(b["shape"]) != e.shape:
                raise ValueError(
                    f"merged tensor {e.name!r}: shape {list(e.shape)} but {b['shape']} in the base"
                )
            if not e.dtype.is_floating_point:
                raise TypeError(f"merged tensor {e.name!r}: output dtype {e.dtype} is not floating point")
            out[e.name] = e
        return {k: out[k] for k in sorted(out)}

    # -- streaming -------------------------------------------------------------------------

    def write(self, name: str, rows: Rows, out: EMRTensor) -> None:
        """Store EMR's output for tensor ``name`` (``rows``: None or a row chunk [start, stop))."""
        if self._done:
            raise ValueError("the artifact is already finalized or aborted")
        e = self.outputs.get(name)
        if e is None:
            raise KeyError(f"tensor {name!r} is not in the artifact layout")
        n = len(self.tasks)
        if rows is None:
            chunk_shape, start_row = e.shape, 0
        else:
            if len(e.shape) == 0 or not 0 <= rows[0] < rows[1] <= e.shape[0]:
                raise ValueError(f"tensor {name!r}: bad row chunk {rows} for shape {list(e.shape)}")
            chunk_shape, start_row = (rows[1] - rows[0], *e.shape[1:]), rows[0]
        if tuple(out.unified.shape) != chunk_shape:
            raise ValueError(
                f"tensor {name!r}: unified chunk {list(out.unified.shape)}, expected {list(chunk_shape)}"
            )
        if tuple(out.masks.shape) != (n, *chunk_shape) or out.masks.dtype != torch.bool:
            raise ValueError(
                f"tensor {name!r}: masks must be bool {[n, *chunk_shape]}, "
                f"got {out.masks.dtype} {list(out.masks.shape)}"
            )
        row_numel = math.prod(e.shape[1:]) if e.shape else 1
        start = start_row * row_numel
        count = math.prod(chunk_shape)
        if self._written[name] + count > e.numel:
            raise ValueError(f"tensor {name!r}: more elements written than it has (overlapping chunks?)")
        uent = self._unified.writer(name).entries[name]
        self._unified.write_tensor(name, out.unified.to(uent.dtype), start)
        head, tail = bits.split_chunk(start, start + count, e.numel)
        for t in range(n):
            self._write_mask(t, name, e.numel, start, count, out.masks[t], head, tail)
        self._written[name] += count

    def _write_mask(
        self,
        t: int,
        name: str,
        numel: int,
        start: int,
        count: int,
        mask: torch.Tensor,
        head: bool,
        tail: bool,
    ) -> None:
        if count == 0:
            return
        packed = bits.pack_at(mask, start)
        first = start // 8
        lo, hi = 0, len(packed)
        edges = []
        if head:
            edges.append((0, min(start + count, 8 * first + 8) - start))
            lo = 1
        if tail and (len(packed) > 1 or not head):
            last = len(packed) - 1
            edges.append((last, start + count - 8 * (first + last)))
            hi = last
        for k, nbits in edges:
            byte = first + k
            done = self._shared.add((t, name), byte, int(packed[k]), nbits, bits.bits_needed(byte, numel))
            if done is not None:
                self._masks[t].write_bytes(name, bytes([done]), byte)
        if hi > lo:
            self._masks[t].write_bytes(name, packed[lo:hi], first + lo)

    # -- finishing -------------------------------------------------------------------------

    def finalize(
        self,
        rescalers: Sequence[float],
        per_task_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        *,
        task_configs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Path:
        """Write the per-task tensors and the manifest, then move the artifact into place."""
        if self._done:
            raise ValueError("the artifact is already finalized or aborted")
        try:
            return self._finalize(rescalers, per_task_tensors or {}, task_configs or {})
        except BaseException:
            self.abort()
            raise

    def _finalize(
        self,
        rescalers: Sequence[float],
        per_task: Mapping[str, Mapping[str, torch.Tensor]],
        configs: Mapping[str, Mapping[str, Any]],
    ) -> Path:
        resc = [float(r) for r in rescalers]
        if len(resc) != len(self.tasks):
            raise ValueError(f"{len(resc)} rescalers for {len(self.tasks)} tasks")
        if not all(math.isfinite(r) for r in resc):
            raise ValueError(f"rescalers must be finite, got {resc}")
        missing = [k for k, e in self.outputs.items() if self._written[k] != e.numel]
        if missing:
            k = missing[0]
            raise ValueError(
                f"tensor {k!r}: {self._written[k]} of {self.outputs[k].numel} elements written "
                f"({len(missing)} tensors incomplete)"
            )
        if self._shared.incomplete():
            raise ValueError(f"mask bytes left incomplete: {self._shared.incomplete()[:3]}")
        for key in list(per_task) + list(configs):
            if key not in self.tasks:
                raise ValueError(f"per-task data for unknown task {key!r}; tasks are {self.tasks}")
        self._unified.close(fsync=self.fsync)
        for w in self._masks:
            w.close(fsync=self.fsync)
        per_task_meta = [
            self._write_task_files(i, per_task.get(task, {}), configs.get(task))
            for i, task in enumerate(self.tasks)
        ]
        files = sorted(self._created)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "weightmerge_version": _version(),
            "tasks": self.tasks,
            "rescalers": resc,
            "rescale": self.rescale,
            "compute_dtype": dtype_name(self.compute_dtype),
            "mask_bit_order": bits.BIT_ORDER,
            "unified_files": self._unified.files,
            "mask_files": [mask_file(i) for i in range(len(self.tasks))],
            "tensors": {
                e.name: {
                    "shape": list(e.shape),
                    "dtype": dtype_name(e.dtype),
                    "unified_dtype": dtype_name(u.dtype),
                    "file": self._unified.file_of[e.name],
                }
                for e, u in zip(self.outputs.values(), self.unified_entries, strict=True)
            },
            "per_task": per_task_meta,
            "base": self.identity,
            "files": {
                f: {"bytes": (self.dir / f).stat().st_size, "sha256": file_sha256(self.dir / f)}
                for f in files
            },
        }
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        self._created.append(MANIFEST)
        if self._atomic is not None:
            self._atomic.__exit__(None, None, None)  # fsync, then rename into place
        elif self.fsync:
            fsync_dir(self.dir)
        self._done = True
        return self.out_dir

    def _write_task_files(
        self, i: int, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {"task": self.tasks[i], "file": None, "tensors": {}, "config": None}
        if config is not None:
            meta["config"] = task_config_file(i)
            self._created.append(meta["config"])
            (self.dir / meta["config"]).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        if not tensors:
            return meta
        entries = []
        for name in sorted(tensors):
            if name in self.outputs:
                raise ValueError(f"tensor {name!r} is merged; it cannot also be a per-task tensor")
            t = tensors[name]  # lazy mappings read here and again below: one tensor in memory at a time
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"task {self.tasks[i]!r}: per-task tensor {name!r} is a {type(t).__name__}")
            entries.append(Entry(name, tuple(t.shape), t.dtype))
            meta["tensors"][name] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
        meta["file"] = task_file(i)
        self._created.append(meta["file"])
        w = FileWriter(
            self.dir / meta["file"],
            entries,
            {"format": FORMAT, "content": "task tensors", "task": self.tasks[i]},
        )
        try:
            for e in entries:
                w.write_tensor(e.name, tensors[e.name])
        finally:
            w.close(fsync=self.fsync)
        return meta

    def abort(self) -> None:
        """Discard everything written; nothing remains at ``out_dir`` (atomic) or of the files this
        writer created in it (``atomic=False``)."""
        if self._done:
            return
        self._done = True
        self._unified.close(fsync=False)
        for w in self._masks:
            w.close(fsync=False)
        self._discard()

    def _discard(self) -> None:
        self._done = True
        if self._atomic is not None:
            self._atomic.__exit__(_Aborted, _Aborted("EMR artifact aborted"), None)  # removes the directory
        else:
            for f in self._created:
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / f).unlink()

    def __enter__(self) -> EMRArtifactWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._done:
            return
        self.abort()
        if exc_type is None:
            raise ValueError(
                f"EMR artifact writer for {self.out_dir} closed without finalize(); nothing written"
            )


class _Aborted(Exception):
    """Thrown into the atomic output directory to make it discard its contents."""


def _version() -> str:
    from weightmerge.version import __version__

    return __version__


def write_emr_artifact(
    result: Any,
    out_dir: str | os.PathLike[str],
    task_names: Sequence[str],
    base_identity: Mapping[str, Any] | None = None,
    per_task: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    *,
    rescale: str = "per_tensor_mean",
    out_dtype: torch.dtype | None = None,
    unified_dtype: torch.dtype | None = None,
    task_configs: Mapping[str, Mapping[str, Any]] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    fsync: bool = True,
) -> Path:
    """Write an in-memory ``EMRResult`` (from ``merge_state_dicts(..., "emr")``) as an artifact.

    ``rescale`` must name the mode the result was merged with (it is recorded, not recomputed).
    ``base_identity`` defaults to the identity of ``result.base`` (path ``<in-memory>``).
    Output dtype defaults to each base tensor's dtype; the unified vector is stored in
    ``unified_dtype`` (default: the output dtype).
    """
    if not isinstance(result, EMRResult):
        raise TypeError(f"result must be an EMRResult, got {type(result).__name__}")
    names = sorted(result.unified)
    dtypes = {result.unified[k].dtype for k in names}
    if len(dtypes) > 1:
        raise ValueError(f"unified tensors have mixed dtypes {sorted(map(str, dtypes))}")
    compute = dtypes.pop() if dtypes else torch.float32
    identity = base_identity if base_identity is not None else compute_base_identity(result.base)
    layout = [(k, tuple(result.unified[k].shape), out_dtype or result.base[k].dtype) for k in names]
    with EMRArtifactWriter(
        out_dir,
        tasks=task_names,
        layout=layout,
        base_identity=identity,
        rescale=rescale,
        compute_dtype=compute,
        unified_dtype=unified_dtype,
        max_shard_bytes=max_shard_bytes,
        fsync=fsync,
    ) as w:
        if len(result.masks) != len(w.tasks):
            raise ValueError(f"{len(w.tasks)} task names for {len(result.masks)} tasks in the result")
        for k in names:
            masks = torch.stack([m[k] for m in result.masks])  # (n_tasks, *shape)
            w.write(k, None, EMRTensor(unified=result.unified[k], masks=masks))
        return w.finalize(result.rescalers, per_task, task_configs=task_configs)
