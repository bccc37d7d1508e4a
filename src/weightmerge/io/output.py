"""The output seam: what a merge's results become, chosen by what the method declares.

A method declares an :class:`OutputFormat` (``MethodSpec.output``; default :data:`CHECKPOINT`).
The engine never names a method or an output: it plans the merge, asks the format for a writer
(``in_memory`` for ``merge_state_dicts``, ``to_directory`` for ``weightmerge merge``), feeds it
every merged tensor or row chunk as ``apply`` returned it, and calls ``finish`` once with the
method's model-level outputs (``MethodSpec.finalize``). See docs/engine.md ("Output").

* :data:`CHECKPOINT` -- a model checkpoint: merged tensors cast to the plan's output dtypes, the
  plan's copied tensors read from the reference model (the base, else the first model); in memory
  a ``dict``, on disk sharded safetensors with ``config.json``.
* EMR's artifact (``weightmerge.emr.output.EMR_ARTIFACT``) -- one unified vector, 1-bit masks and
  rescalers per task.

A new kind of output (per-task masks, ...) is a new :class:`OutputFormat` in the method's own
code, declared on its spec; nothing in the engine changes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from weightmerge.io.base import TensorSource
from weightmerge.io.safetensors_format import nbytes

Rows = tuple[int, int] | None  # [start, stop) along dim 0, or None for the whole tensor


class PlannedTensor(Protocol):
    """One tensor of the plan, as an output format sees it (``engine.plan.TensorPlan``)."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def out_dtype(self) -> torch.dtype: ...

    @property
    def action(self) -> str: ...  # "merge" | "copy"

    @property
    def reason(self) -> str: ...  # why copied: "excluded", "not floating point"


@dataclass(frozen=True)
class OutputJob:
    """What a planned merge tells its output: every tensor of the reference model in order (merged
    or copied), the opened inputs (headers read, data not yet), and the model-level parameters."""

    tensors: Sequence[PlannedTensor]
    base: TensorSource | None
    models: Sequence[TensorSource]
    aliases: Sequence[Mapping[str, str]]  # per model: output name -> name read (tied weights)
    labels: Sequence[str]  # per model: what the user named it (a path, an adapter path)
    model_params: Mapping[str, Any]
    compute_dtype: torch.dtype

    @property
    def ref(self) -> TensorSource:
        """The model copied tensors come from: the base, else the first model."""
        return self.base if self.base is not None else self.models[0]

    @property
    def merged(self) -> list[PlannedTensor]:
        return [t for t in self.tensors if t.action == "merge"]

    def read_name(self, model: int, name: str) -> str:
        """The name model ``model`` stores tensor ``name`` under."""
        return self.aliases[model].get(name, name) if self.aliases else name


class OutputWriter(Protocol):
    """Receives a merge's results. ``write`` gets each merged tensor (or row chunk ``rows``) in the
    compute dtype, on the compute device, in the form the method's ``apply`` returns; ``finish``
    gets the method's model-level outputs once, after the last ``write``, and returns the in-memory
    result (``in_memory``) or extra facts for the merge report (``to_directory``); ``close``
    releases files and is called after ``finish`` and after a failure alike. ``timings`` collects
    seconds spent in the writer's own phases; ``done`` names the merged tensors an interrupted run
    already wrote (``--resume``: the engine does not apply them again); ``scratch_files`` are the
    writer's own bookkeeping files, removed from the directory before it becomes the output."""

    timings: dict[str, float]
    done: frozenset[str]
    scratch_files: tuple[str, ...]

    def write(self, name: str, rows: Rows, out: Any) -> None: ...

    def finish(self, extras: Mapping[str, Any]) -> Any: ...

    def close(self) -> None: ...


class OutputFormat(Protocol):
    """What a method's results become (``MethodSpec.output``)."""

    @property
    def kind(self) -> str: ...  # for messages and plans, e.g. "checkpoint"

    @property
    def resumable(self) -> bool: ...  # a killed ``weightmerge merge --resume`` can continue it

    def planned_bytes(self, job: OutputJob) -> int: ...  # the tensors' bytes on disk (free-space check)

    def in_memory(self, job: OutputJob) -> OutputWriter: ...

    def to_directory(self, job: OutputJob, directory: Path, *, shard_size: int) -> OutputWriter: ...


# ---------------------------------------------------------------------------------------------
# The default: a model checkpoint


class _MemoryCheckpoint:
    def __init__(self, job: OutputJob) -> None:
        self.job = job
        self.timings: dict[str, float] = {}
        self.done: frozenset[str] = frozenset()
        self.scratch_files: tuple[str, ...] = ()
        self.merged: dict[str, torch.Tensor] = {}
        self._dtypes = {t.name: t.out_dtype for t in job.tensors}

    def write(self, name: str, rows: Rows, out: Any) -> None:
        if rows is not None:
            raise ValueError(f"tensor {name!r}: the in-memory output takes whole tensors")
        self.merged[name] = out.to(self._dtypes[name]).cpu()

    def finish(self, extras: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        ref = self.job.ref
        result = {t.name: ref.read(t.name).clone() for t in self.job.tensors if t.action == "copy"}
        result.update(self.merged)
        return {k: result[k] for k in sorted(result)}

    def close(self) -> None:
        pass


JOURNAL = "wm-journal.txt"


class Journal:
    """The sink of a resumable merge: writes go to the shard writer, and the names of tensors
    whose every row is written are appended to ``wm-journal.txt`` in the scratch directory after
    the shards are fsynced (in batches), so a resumed run can trust every name it lists even after
    a power loss. Names are written one per line, JSON-quoted; a torn last line is ignored."""

    def __init__(self, path: Path, writer: Any) -> None:
        self.path, self.writer = path, writer
        # about 32 journal flushes per merge, each between 64 KiB and 256 MiB of output
        self.batch_bytes = min(256 << 20, max(64 << 10, int(writer.total_size) // 32))
        self.pending: list[str] = []
        self.pending_bytes = 0
        self.fd: int | None = None

    def replay(self) -> list[str]:
        """Names recorded by an interrupted run, marked written in the writer (its shards kept)."""
        if not self.path.exists():
            return []
        done = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                name = json.loads(line)
            except ValueError:
                break  # torn write at the kill: everything after it is redone
            if not isinstance(name, str):
                break
            try:
                self.writer.mark_written(name)
            except (KeyError, ValueError):
                continue  # not in this layout, or its shard was not kept: computed again
            done.append(name)
        return done

    def write(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        self.writer.write(name, tensor, rows)
        if self.writer.complete(name):
            self.pending.append(name)
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.batch_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        self.writer.sync()  # the data first, then the names that vouch for it
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(self.fd, "".join(json.dumps(n) + "\n" for n in self.pending).encode())
        os.fsync(self.fd)
        self.pending, self.pending_bytes = [], 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _DirectoryCheckpoint:
    """Sharded safetensors written through a :class:`Journal`, so that ``--resume`` can keep what a
    killed run completed (its shards of the same layout are kept, the journaled tensors skipped)."""

    def __init__(self, job: OutputJob, directory: Path, shard_size: int) -> None:
        from weightmerge.io.writer import ShardedSafetensorsWriter

        self.job, self.directory = job, directory
        self.timings: dict[str, float] = {}
        self.scratch_files: tuple[str, ...] = (JOURNAL,)
        self._dtypes = {t.name: t.out_dtype for t in job.tensors}
        layout = [(t.name, t.shape, t.out_dtype) for t in job.tensors]
        self.sink = ShardedSafetensorsWriter(
            directory, layout, shard_size=shard_size, resume=(directory / JOURNAL).exists()
        )
        self.journal = Journal(directory / JOURNAL, self.sink)
        t0 = time.perf_counter()
        try:
            self.done = frozenset(self.journal.replay())
            for t in job.tensors:
                if t.action == "copy" and t.name not in self.done:
                    self.journal.write(t.name, job.ref.read(t.name).to(t.out_dtype))
        except BaseException:
            self.close()
            raise
        self.timings["copy_s"] = time.perf_counter() - t0

    def write(self, name: str, rows: Rows, out: Any) -> None:
        self.journal.write(name, out.to(self._dtypes[name]).cpu(), rows)

    def finish(self, extras: Mapping[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.journal.close()
        self.sink.finalize()
        self.timings["finalize_s"] = time.perf_counter() - t0
        write_config_json(self.job.ref, self.directory, self.job.tensors)
        return {"resumed_tensors": len(self.done)} if self.done else {}

    def close(self) -> None:
        self.journal.close()
        self.sink.close()


def write_config_json(src: TensorSource, out: Path, tensors: Sequence[PlannedTensor]) -> None:
    """``config.json`` of ``src`` into ``out``, its dtype set to the output's when that is one."""
    if src.config is None:
        return
    config = dict(src.config)
    dtypes = {t.out_dtype for t in tensors if t.out_dtype.is_floating_point}
    if len(dtypes) == 1:
        name = str(next(iter(dtypes))).replace("torch.", "")
        if "dtype" in config or "torch_dtype" not in config:
            config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class CheckpointOutput:
    """Merged tensors in the plan's output dtypes, copied tensors from the reference model."""

    kind: str = "checkpoint"
    resumable: bool = True

    def planned_bytes(self, job: OutputJob) -> int:
        return sum(nbytes(t.shape, t.out_dtype) for t in job.tensors)

    def in_memory(self, job: OutputJob) -> OutputWriter:
        return _MemoryCheckpoint(job)

    def to_directory(self, job: OutputJob, directory: Path, *, shard_size: int) -> OutputWriter:
        return _DirectoryCheckpoint(job, directory, shard_size)


CHECKPOINT = CheckpointOutput()
