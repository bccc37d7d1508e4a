"""Merge checkpoints described by a config into an output directory: the product's main job.

open sources (headers only) -> plan (every user error reported here) -> the method's output
writer (``MethodSpec.output``: a checkpoint, EMR's artifact, ...) -> statistics passes -> apply
pass into the writer -> finish (the writer's files; then tokenizer, model card, resolved config)
-> one atomic rename onto OUT.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from weightmerge.config import MergeConfig, ModelRef
from weightmerge.engine.card import model_card
from weightmerge.engine.plan import MergePlan, build_plan
from weightmerge.engine.stream import stream_merge
from weightmerge.io.base import TensorSource
from weightmerge.io.output import OutputJob

DEFAULT_SHARD_SIZE = 2 * 1000**3


@dataclass
class MergeOptions:
    shard_size: int = DEFAULT_SHARD_SIZE
    max_memory: int | None = None
    force: bool = False
    quiet: bool = False
    threads: int | None = None  # torch intra-op threads (default: all cores)
    prefetch: bool = True
    copy_tokenizer: bool = True
    device: str = "auto"  # where the math runs: auto (a GPU when present), cpu, cuda, cuda:N
    allow_nonfinite: bool = False  # merge NaN/Inf values instead of refusing them
    resume: bool = False  # continue a killed merge from its scratch directory (same config and inputs)
    write_card: bool = True  # README.md (the model card) next to the weights


@dataclass
class MergeReport:
    out: str
    plan: MergePlan
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


def open_ref(ref: ModelRef) -> TensorSource:
    from weightmerge.io.sources import open_source

    if ref.layers:  # mergekit's slices: layer ranges of checkpoints, stacked
        from weightmerge.io.stack import LayerStack

        opened: dict[str, TensorSource] = {}
        for path, _a, _b in ref.layers:
            if path not in opened:
                opened[path] = open_source(path)
        return LayerStack([(opened[p], a, b) for p, a, b in ref.layers], path=str(ref))
    if ref.lora is None:
        return open_source(ref.path)
    return open_source(ref.lora, base=open_source(ref.path))


@dataclass
class OpenedInputs:
    config: MergeConfig
    base: TensorSource | None
    models: list[TensorSource]
    plan: MergePlan

    @property
    def model_params(self) -> Mapping[str, Any]:
        return self.plan.model_params

    @property
    def labels(self) -> list[str]:
        """What the user named each model (the adapter for ``path+lora``)."""
        return [e.model.lora or e.model.path for e in self.config.models]

    def job(self) -> OutputJob:
        return self.plan.output_job(self.base, self.models, labels=self.labels)

    def close(self) -> None:
        for s in ([self.base] if self.base is not None else []) + self.models:
            s.close()
        for key in self.plan.method.aux_inputs:
            for v in self.model_params.get(key) or []:
                if isinstance(v, TensorSource):
                    v.close()


def open_and_plan(cfg: MergeConfig, *, max_memory: int | None = None) -> OpenedInputs:
    """Open every input (headers only) and plan the merge; raises ValueError naming what is wrong."""
    from weightmerge.io.sources import open_source

    spec = cfg.spec
    base = open_ref(cfg.base_model) if cfg.base_model is not None else None
    models = [open_ref(e.model) for e in cfg.models]
    model_params = cfg.resolved_model_params()
    for key in spec.aux_inputs:
        paths = model_params.get(key)
        if paths is None:
            continue
        model_params[key] = [open_source(str(p)) if isinstance(p, (str, os.PathLike)) else p for p in paths]
    plan = build_plan(
        spec,
        base,
        models,
        model_params=model_params,
        tensor_params=cfg.params_by_tensor,
        exclude=cfg.exclude,
        out_dtype=cfg.output_dtype,
        compute_dtype=cfg.compute_dtype,
        max_memory=max_memory,
    )
    return OpenedInputs(cfg, base, models, plan)


def merge_identity(cfg: MergeConfig, opts: MergeOptions, device: str) -> dict[str, Any]:
    """What a merge's output depends on: the resolved config, the options that change the bytes
    written, and every input file's path, size and modification time. ``key`` hashes it all."""
    from weightmerge.version import __version__

    inputs = []
    for p in input_paths(cfg):
        files = [Path(p)] if not os.path.isdir(p) else sorted(q for q in Path(p).iterdir() if q.is_file())
        for f in files:
            st = f.stat()
            inputs.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    ident: dict[str, Any] = {
        "weightmerge": __version__,
        "config_sha256": hashlib.sha256(
            json.dumps(cfg.resolved(), sort_keys=True, default=str).encode()
        ).hexdigest(),
        "options": {
            "shard_size": opts.shard_size,
            "allow_nonfinite": opts.allow_nonfinite,
            "max_memory": opts.max_memory,
            "device": device,
        },
        "inputs": inputs,
    }
    ident["key"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return ident


def input_paths(cfg: MergeConfig) -> list[str]:
    """Every path the merge reads: models, adapters, statistics folders, the tokenizer folder."""
    refs = ([cfg.base_model] if cfg.base_model is not None else []) + [e.model for e in cfg.models]
    paths = [p for r in refs for p in r.paths()]
    model_params = cfg.resolved_model_params()
    for key in cfg.spec.aux_inputs:
        paths += [os.fspath(p) for p in model_params.get(key) or [] if isinstance(p, (str, os.PathLike))]
    if cfg.tokenizer_path is not None:
        paths.append(cfg.tokenizer_path)
    return paths


def _tokenizer_dir(cfg: MergeConfig) -> str | None:
    path = cfg.tokenizer_path
    if path is None and cfg.base_model is not None:
        path = cfg.base_model.path
    if path is None and cfg.models:
        path = cfg.models[0].model.path
    return path if path is not None and os.path.isdir(path) else None


def merge_config(
    cfg: MergeConfig, out: str | os.PathLike[str], options: MergeOptions | None = None
) -> MergeReport:
    from weightmerge.device import resolve_device
    from weightmerge.io.atomic import (
        RESUME_FILE,
        atomic_output_dir,
        check_free_space,
        check_output_clear,
        copy_tokenizer_files,
    )

    opts = options or MergeOptions()
    device = resolve_device(opts.device)  # a bad choice fails before anything is read
    if opts.threads:
        torch.set_num_threads(opts.threads)
    check_output_clear(out, input_paths(cfg))  # before anything is read: never touch an input
    t0 = time.perf_counter()
    inputs = open_and_plan(cfg, max_memory=opts.max_memory)
    plan = inputs.plan
    output = plan.method.output
    timings: dict[str, float] = {"plan_s": time.perf_counter() - t0}
    extras: dict[str, Any] = {"device": str(device)}
    Path(out).absolute().parent.mkdir(parents=True, exist_ok=True)
    if opts.resume and not output.resumable:
        inputs.close()
        raise ValueError(
            f"--resume is not supported for merge_method {plan.method.name} (its output, {output.kind}, "
            "cannot be resumed); rerun without it"
        )
    identity = merge_identity(cfg, opts, str(device))
    try:
        check_free_space(out, output.planned_bytes(inputs.job()))
        with atomic_output_dir(out, force=opts.force, identity=identity, resume=opts.resume) as tmp:
            tmp = Path(tmp)
            writer = output.to_directory(inputs.job(), tmp, shard_size=opts.shard_size)
            try:
                outcome, t = stream_merge(
                    plan,
                    inputs.base,
                    inputs.models,
                    writer=writer,
                    skip_apply=writer.done,
                    seed=cfg.seed,
                    quiet=opts.quiet,
                    prefetch=opts.prefetch,
                    device=device,
                    allow_nonfinite=opts.allow_nonfinite,
                )
                extras.update(outcome.extras)
                extras.update(writer.finish(outcome.extras))
                timings.update(writer.timings)
                timings.update(t)
            finally:
                writer.close()
            tok = _tokenizer_dir(cfg)
            if opts.copy_tokenizer and tok is not None:
                copy_tokenizer_files(tok, tmp)
            resolved = cfg.resolved()
            if cfg.chat_template and not (tmp / "chat_template.jinja").exists():
                resolved["chat_template"] = cfg.chat_template
            (tmp / "weightmerge_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
            for scratch in (*writer.scratch_files, RESUME_FILE):  # bookkeeping of --resume: not output
                (tmp / scratch).unlink(missing_ok=True)
            if opts.write_card:
                (tmp / "README.md").write_text(
                    model_card(
                        method=plan.method,
                        base_model=cfg.display_name(cfg.base_model) if cfg.base_model is not None else None,
                        models=[cfg.display_name(e.model) for e in cfg.models],
                        resolved_config=resolved,
                        extra=list(cfg.notes) + plan.notes,
                    )
                )
    finally:
        inputs.close()
    timings["total_s"] = time.perf_counter() - t0
    return MergeReport(out=os.fspath(out), plan=plan, timings=timings, extras=extras)
