"""``weightmerge merge`` with ``merge_method: emr``: stream the merge into an EMR artifact.

The engine (``engine.merge.merge_config``) owns the atomic output directory, the tokenizer files,
the model card and the resolved config; this writes the artifact's own files into it
(``weightmerge.emr.EMRArtifactWriter`` with ``atomic=False``):

* merged tensors (the plan's ``merge`` entries) -> unified vector + one bit-packed mask per task;
* tensors the plan copies because ``exclude`` matched them -> stored per task, read from each
  expert (cast to the plan's output dtype): each task keeps its own heads;
* other copied tensors (non-floating buffers) -> not stored; they come from the base;
* an expert whose config.json differs from the base's (e.g. another ``num_labels``) -> that
  config is stored for its task and used when materializing it.

Task names are the models' directory names (the adapter's for ``path+lora``); repeated names get
``-2``, ``-3``, ... in model order. The base identity (sha256 of every base tensor) costs one read
of the base.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from weightmerge.emr import EMRArtifactWriter, base_identity
from weightmerge.engine.driver import MergeOutcome
from weightmerge.engine.stream import stream_merge
from weightmerge.io.base import TensorSource

if TYPE_CHECKING:
    from weightmerge.engine.merge import MergeOptions, OpenedInputs


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


class _Discard:
    """Sink for the plan's copied tensors: the artifact takes them from the base or the experts."""

    def write(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        pass


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


def stream_emr_artifact(
    inputs: OpenedInputs, out: Path, opts: MergeOptions, *, device: torch.device | None = None
) -> tuple[MergeOutcome, dict[str, float]]:
    """Merge ``inputs`` with EMR into the artifact directory ``out`` (existing, empty)."""
    plan, cfg = inputs.plan, inputs.config
    if inputs.base is None:
        raise ValueError("merge_method emr needs a base_model")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    identity = base_identity(inputs.base)
    timings["base_identity_s"] = time.perf_counter() - t0
    tasks = task_names([e.model.lora or e.model.path for e in cfg.models])
    layout = [(t.name, t.shape, t.out_dtype) for t in plan.merged]
    own = {t.name: t.out_dtype for t in plan.tensors if t.action == "copy" and t.reason == "excluded"}
    per_task = {
        task: _ExpertTensors(src, {k: (plan.aliases[i] if plan.aliases else {}).get(k, k) for k in own}, own)
        for i, (task, src) in enumerate(zip(tasks, inputs.models, strict=True))
    }
    base_config = inputs.base.config
    configs: dict[str, Mapping[str, Any]] = {
        task: src.config
        for task, src in zip(tasks, inputs.models, strict=True)
        if src.config is not None
        and base_config is not None
        and _model_config(src.config) != _model_config(base_config)
    }
    with EMRArtifactWriter(
        out,
        tasks=tasks,
        layout=layout,
        base_identity=identity,
        rescale=str(inputs.model_params.get("rescale", "per_tensor_mean")),
        compute_dtype=plan.compute_dtype,
        max_shard_bytes=opts.shard_size,
        atomic=False,
    ) as writer:
        outcome, t = stream_merge(
            plan,
            inputs.base,
            inputs.models,
            params_for=lambda name: inputs.params_by_tensor[name],
            model_params=inputs.model_params,
            sink=_Discard(),
            emr_sink=writer.write,
            seed=cfg.seed,
            quiet=opts.quiet,
            prefetch=opts.prefetch,
            device=device,
        )
        timings.update(t)
        t1 = time.perf_counter()
        writer.finalize(outcome.extras["rescalers"], per_task if own else None, task_configs=configs)
        timings["finalize_s"] = time.perf_counter() - t1
    outcome.extras["tasks"] = tasks
    return outcome, timings


def _model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config without the keys that differ between identical models (paths, versions)."""
    skip = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}
    return {k: v for k, v in config.items() if k not in skip}
