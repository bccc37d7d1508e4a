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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from weightmerge.io.base import TensorSource

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
    seconds spent in the writer's own phases."""

    timings: dict[str, float]

    def write(self, name: str, rows: Rows, out: Any) -> None: ...

    def finish(self, extras: Mapping[str, Any]) -> Any: ...

    def close(self) -> None: ...


class OutputFormat(Protocol):
    """What a method's results become (``MethodSpec.output``)."""

    @property
    def kind(self) -> str: ...  # for messages and plans, e.g. "checkpoint"

    def in_memory(self, job: OutputJob) -> OutputWriter: ...

    def to_directory(self, job: OutputJob, directory: Path, *, shard_size: int) -> OutputWriter: ...


# ---------------------------------------------------------------------------------------------
# The default: a model checkpoint


class _MemoryCheckpoint:
    def __init__(self, job: OutputJob) -> None:
        self.job = job
        self.timings: dict[str, float] = {}
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


class _DirectoryCheckpoint:
    def __init__(self, job: OutputJob, directory: Path, shard_size: int) -> None:
        from weightmerge.io.writer import ShardedSafetensorsWriter

        self.job, self.directory = job, directory
        self.timings: dict[str, float] = {}
        self._dtypes = {t.name: t.out_dtype for t in job.tensors}
        layout = [(t.name, t.shape, t.out_dtype) for t in job.tensors]
        self.sink = ShardedSafetensorsWriter(directory, layout, shard_size=shard_size)
        t0 = time.perf_counter()
        try:
            for t in job.tensors:
                if t.action == "copy":
                    self.sink.write(t.name, job.ref.read(t.name).to(t.out_dtype))
        except BaseException:
            self.sink.close()
            raise
        self.timings["copy_s"] = time.perf_counter() - t0

    def write(self, name: str, rows: Rows, out: Any) -> None:
        self.sink.write(name, out.to(self._dtypes[name]).cpu(), rows)

    def finish(self, extras: Mapping[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.sink.finalize()
        self.timings["finalize_s"] = time.perf_counter() - t0
        write_config_json(self.job.ref, self.directory, self.job.tensors)
        return {}

    def close(self) -> None:
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

    def in_memory(self, job: OutputJob) -> OutputWriter:
        return _MemoryCheckpoint(job)

    def to_directory(self, job: OutputJob, directory: Path, *, shard_size: int) -> OutputWriter:
        return _DirectoryCheckpoint(job, directory, shard_size)


CHECKPOINT = CheckpointOutput()
