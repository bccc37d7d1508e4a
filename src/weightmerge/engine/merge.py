"""Merge checkpoints described by a config into an output directory: the product's main job.

open sources (headers only) -> plan (every user error reported here) -> statistics passes ->
apply pass with positioned writes -> finalize (index, config.json, tokenizer, model card,
resolved config) -> one atomic rename onto OUT.
"""

from __future__ import annotations

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


@dataclass
class MergeReport:
    out: str
    plan: MergePlan
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


def open_ref(ref: ModelRef) -> TensorSource:
    from weightmerge.io.sources import open_source

    if ref.lora is None:
        return open_source(ref.path)
    return open_source(ref.lora, base=open_source(ref.path))


@dataclass
class OpenedInputs:
    config: MergeConfig
    base: TensorSource | None
    models: list[TensorSource]
    model_params: dict[str, Any]
    plan: MergePlan
    params_by_tensor: dict[str, dict[str, Any]]

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
    spec.check(model_params, len(models))
    plan = build_plan(
        spec,
        base,
        models,
        model_params=model_params,
        exclude=cfg.exclude,
        out_dtype=cfg.output_dtype,
        compute_dtype=cfg.compute_dtype,
        max_memory=max_memory,
    )
    by_tensor = cfg.params_by_tensor([t.name for t in plan.merged])
    for name, p in by_tensor.items():
        for key in spec.aux_inputs:  # statistics are model-level: use the opened sources
            if key in model_params:
                p[key] = model_params[key]
        del name
    return OpenedInputs(cfg, base, models, model_params, plan, by_tensor)


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


def _write_config_json(src: TensorSource, out: Path, plan: MergePlan) -> None:
    if src.config is None:
        return
    config = dict(src.config)
    dtypes = {t.out_dtype for t in plan.tensors if t.out_dtype.is_floating_point}
    if len(dtypes) == 1:
        name = str(next(iter(dtypes))).replace("torch.", "")
        if "dtype" in config or "torch_dtype" not in config:
            config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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
    from weightmerge.io.atomic import atomic_output_dir, check_output_clear, copy_tokenizer_files
    from weightmerge.io.writer import ShardedSafetensorsWriter

    opts = options or MergeOptions()
    device = resolve_device(opts.device)  # a bad choice fails before anything is read
    if opts.threads:
        torch.set_num_threads(opts.threads)
    check_output_clear(out, input_paths(cfg))  # before anything is read: never touch an input
    t0 = time.perf_counter()
    inputs = open_and_plan(cfg, max_memory=opts.max_memory)
    plan = inputs.plan
    timings: dict[str, float] = {"plan_s": time.perf_counter() - t0}
    extras: dict[str, Any] = {"device": str(device)}
    ref = inputs.base if inputs.base is not None else inputs.models[0]
    Path(out).absolute().parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_output_dir(out, force=opts.force) as tmp:
            tmp = Path(tmp)
            if plan.method.name == "emr":
                from weightmerge.emr_artifact import stream_emr_artifact

                outcome, t = stream_emr_artifact(inputs, tmp, opts, device=device)
                timings.update(t)
                extras.update(outcome.extras)
            else:
                layout = [(t.name, t.shape, t.out_dtype) for t in plan.tensors]
                writer = ShardedSafetensorsWriter(tmp, layout, shard_size=opts.shard_size)
                try:
                    outcome, t = stream_merge(
                        plan,
                        inputs.base,
                        inputs.models,
                        params_for=lambda name: inputs.params_by_tensor[name],
                        model_params=inputs.model_params,
                        sink=writer,
                        seed=cfg.seed,
                        quiet=opts.quiet,
                        prefetch=opts.prefetch,
                        device=device,
                        allow_nonfinite=opts.allow_nonfinite,
                    )
                    timings.update(t)
                    t2 = time.perf_counter()
                    writer.finalize()
                    timings["finalize_s"] = time.perf_counter() - t2
                finally:
                    close = getattr(writer, "close", None)
                    if close is not None:
                        close()
                extras.update(outcome.extras)
                _write_config_json(ref, tmp, plan)
            tok = _tokenizer_dir(cfg)
            if opts.copy_tokenizer and tok is not None:
                copy_tokenizer_files(tok, tmp)
            resolved = cfg.resolved()
            if cfg.chat_template and not (tmp / "chat_template.jinja").exists():
                resolved["chat_template"] = cfg.chat_template
            (tmp / "weightmerge_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
            (tmp / "README.md").write_text(
                model_card(
                    method=plan.method,
                    base_model=str(cfg.base_model) if cfg.base_model is not None else None,
                    models=[str(e.model) for e in cfg.models],
                    resolved_config=resolved,
                    extra=list(cfg.notes) + plan.notes,
                )
            )
    finally:
        inputs.close()
    timings["total_s"] = time.perf_counter() - t0
    return MergeReport(out=os.fspath(out), plan=plan, timings=timings, extras=extras)


def plan_config(cfg: MergeConfig, *, max_memory: int | None = None) -> Mapping[str, Any]:
    inputs = open_and_plan(cfg, max_memory=max_memory)
    try:
        return {"plan": inputs.plan, "text": inputs.plan.describe()}
    finally:
        inputs.close()
