"""EMR's output format (``MethodSpec.output`` of ``emr``; the seam is ``weightmerge.io.output``).

In memory (``merge_state_dicts``): an :class:`~weightmerge.emr.result.EMRResult`.

Into a directory (``weightmerge merge``; the engine owns the atomic output directory, the
tokenizer files, the model card and the resolved config): the artifact's own files, written by
:class:`~weightmerge.emr.writer.EMRArtifactWriter` with ``atomic=False``:

* merged tensors (the plan's ``merge`` entries) -> unified vector + one bit-packed mask per task;
* tensors the plan copies because ``exclude`` matched them -> stored per task, read from each
  expert (cast to the plan's output dtype): each task keeps its own heads;
* other copied tensors (non-floating buffers) -> not stored; they come from the base;
* an expert whose config.json differs from the base's (e.g. another ``num_labels``) -> that
  config is stored for its task and used when materializing it.

Task names are the models' labels' last path components (the adapter's for ``path+lora``);
repeated names get ``-2``, ``-3``, ... in model order. The base identity (sha256 of every base
tensor) costs one read of the base.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightmerge.emr import bits
from weightmerge.emr.result import EMRResult, EMRTensor
from weightmerge.emr.sources import base_identity
from weightmerge.emr.writer import EMRArtifactWriter
from weightmerge.io.base import TensorSource
from weightmerge.io.output import OutputJob, OutputWriter, Rows
from weightmerge.io.safetensors_format import nbytes, numel


def task_names(paths: Sequence[str]) -> list[str]:
    """Unique task names from model paths: the last path component, ``-2``, ``-3`` on repeats."""
    names = [os.path.basename(os.path.normpath(p)) or "task" for p in paths]
    out, seen = [], dict.fromkeys(names, 0)
    for n in names:
        seen[n] += 1
        out.append(n if names.count(n) == 1 or seen[n] == 1 else f"{n}-{seen[n]}")
    while len(set(out)) < len(out):  # "a-2" given as a name too: fall back to positions
        out = [f"{n}-{i + 1}" for i, n in enumerate(names)]
    return out


class _ExpertTensors(Mapping[str, torch.Tensor]):
    """An expert's own tensors, read lazily (one at a time) and cast to the output dtype."""

    def __init__(
        self, src: TensorSource, names: Mapping[str, str], dtypes: Mapping[str, torch.dtype]
    ) -> None:
        self.src, self.read_as, self.dtypes = src, names, dtypes

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.src.read(self.read_as[name]).to(self.dtypes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.read_as))

    def __len__(self) -> int:
        return len(self.read_as)


def _base_of(job: OutputJob) -> TensorSource:
    if job.base is None:
        raise ValueError("an EMR merge needs a base model")
    return job.base


class _MemoryEMR:
    def __init__(self, job: OutputJob) -> None:
        self.job = job
        self.timings: dict[str, float] = {}
        self.done: frozenset[str] = frozenset()
        self.scratch_files: tuple[str, ...] = ()
        self.unified: dict[str, torch.Tensor] = {}
        self.masks: list[dict[str, torch.Tensor]] = [{} for _ in job.models]

    def write(self, name: str, rows: Rows, out: Any) -> None:
        if rows is not None:
            raise ValueError(f"tensor {name!r}: the in-memory output takes whole tensors")
        self.unified[name] = out.unified.cpu()
        cpu_masks = out.masks.cpu()
        for i, m in enumerate(self.masks):
            m[name] = cpu_masks[i]

    def finish(self, extras: Mapping[str, Any]) -> EMRResult:
        base = _base_of(self.job)
        return EMRResult(
            base={k: base.read(k) for k in sorted(base.keys())},
            unified=self.unified,
            masks=self.masks,
            rescalers=[float(r) for r in extras["rescalers"]],
        )

    def close(self) -> None:
        pass


class _DirectoryEMR:
    def __init__(self, job: OutputJob, directory: Path, shard_size: int) -> None:
        base = _base_of(job)
        self.timings: dict[str, float] = {}
        self.done: frozenset[str] = frozenset()
        self.scratch_files: tuple[str, ...] = ()
        t0 = time.perf_counter()
        identity = base_identity(base)
        self.timings["base_identity_s"] = time.perf_counter() - t0
        self.tasks = task_names(job.labels)
        own = {t.name: t.out_dtype for t in job.tensors if t.action == "copy" and t.reason == "excluded"}
        self.per_task = {
            task: _ExpertTensors(src, {k: job.read_name(i, k) for k in own}, own)
            for i, (task, src) in enumerate(zip(self.tasks, job.models, strict=True))
        }
        self.own = bool(own)
        base_config = base.config
        self.configs: dict[str, Mapping[str, Any]] = {
            task: src.config
            for task, src in zip(self.tasks, job.models, strict=True)
            if src.config is not None
            and base_config is not None
            and _model_config(src.config) != _model_config(base_config)
        }
        self.writer = EMRArtifactWriter(
            directory,
            tasks=self.tasks,
            layout=[(t.name, t.shape, t.out_dtype) for t in job.merged],
            base_identity=identity,
            rescale=str(job.model_params.get("rescale", "per_tensor_mean")),
            compute_dtype=job.compute_dtype,
            max_shard_bytes=shard_size,
            atomic=False,
        )

    def write(self, name: str, rows: Rows, out: Any) -> None:
        self.writer.write(name, rows, EMRTensor(unified=out.unified.cpu(), masks=out.masks.cpu()))

    def finish(self, extras: Mapping[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.writer.finalize(
            extras["rescalers"], self.per_task if self.own else None, task_configs=self.configs
        )
        self.timings["finalize_s"] = time.perf_counter() - t0
        return {"tasks": self.tasks}

    def close(self) -> None:
        self.writer.abort()  # nothing to undo once finalized


def _model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config without the keys that differ between identical models (paths, versions)."""
    skip = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}
    return {k: v for k, v in config.items() if k not in skip}


@dataclass(frozen=True)
class EMRArtifactOutput:
    """EMR's output: an :class:`EMRResult` in memory, an artifact directory on disk."""

    kind: str = "emr-artifact"
    resumable: bool = False

    def planned_bytes(self, job: OutputJob) -> int:
        """The unified vector plus one bit per merged parameter and task."""
        merged = job.merged
        unified = sum(nbytes(t.shape, t.out_dtype) for t in merged)
        return unified + len(job.models) * sum(bits.packed_size(numel(t.shape)) for t in merged)

    def in_memory(self, job: OutputJob) -> OutputWriter:
        return _MemoryEMR(job)

    def to_directory(self, job: OutputJob, directory: Path, *, shard_size: int) -> OutputWriter:
        return _DirectoryEMR(job, directory, shard_size)


EMR_ARTIFACT = EMRArtifactOutput()
