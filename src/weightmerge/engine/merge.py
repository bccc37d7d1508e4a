"""Merge checkpoints described by a config into an output directory: the product's main job.

open sources (headers only) -> plan (every user error reported here) -> statistics passes ->
apply pass with positioned writes -> finalize (index, config.json, tokenizer, model card,
resolved config) -> one atomic rename onto OUT.
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


JOURNAL = "wm-journal.txt"


class _Journal:
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


def merge_identity(cfg: MergeConfig, opts: MergeOptions, device: str) -> dict[str, Any]:
    """What a merge's output depends on: the resolved config, the options that change the bytes
    written, and every input file's path, size and modification time. ``key`` hashes it all."""
    from weightmerge import __version__

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


def planned_output_bytes(plan: MergePlan) -> int:
    """Bytes the output's tensors take (an EMR artifact: the unified vector plus one bit per
    merged parameter and task), without headers and small files."""
    size = lambda t: t.numel * torch.empty((), dtype=t.out_dtype).element_size()  # noqa: E731
    if plan.method.name == "emr":
        return sum(size(t) for t in plan.merged) + plan.n_models * sum(
            (t.numel + 7) // 8 for t in plan.merged
        )
    return sum(size(t) for t in plan.tensors)


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
    from weightmerge.io.atomic import (
        RESUME_FILE,
        atomic_output_dir,
        check_free_space,
        check_output_clear,
        copy_tokenizer_files,
    )
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
    if opts.resume and plan.method.name == "emr":
        inputs.close()
        raise ValueError(
            "--resume is not supported for merge_method emr (it writes an artifact); rerun without it"
        )
    identity = merge_identity(cfg, opts, str(device))
    try:
        check_free_space(out, planned_output_bytes(plan))
        with atomic_output_dir(out, force=opts.force, identity=identity, resume=opts.resume) as tmp:
            tmp = Path(tmp)
            if plan.method.name == "emr":
                from weightmerge.emr_artifact import stream_emr_artifact

                outcome, t = stream_emr_artifact(inputs, tmp, opts, device=device)
                timings.update(t)
                extras.update(outcome.extras)
            else:
                layout = [(t.name, t.shape, t.out_dtype) for t in plan.tensors]
                writer = ShardedSafetensorsWriter(
                    tmp, layout, shard_size=opts.shard_size, resume=(tmp / JOURNAL).exists()
                )
                journal = _Journal(tmp / JOURNAL, writer)
                done = journal.replay()
                if done:
                    extras["resumed_tensors"] = len(done)
                try:
                    outcome, t = stream_merge(
                        plan,
                        inputs.base,
                        inputs.models,
                        params_for=lambda name: inputs.params_by_tensor[name],
                        model_params=inputs.model_params,
                        sink=journal,
                        skip_apply=frozenset(done),
                        seed=cfg.seed,
                        quiet=opts.quiet,
                        prefetch=opts.prefetch,
                        device=device,
                        allow_nonfinite=opts.allow_nonfinite,
                    )
                    timings.update(t)
                    t2 = time.perf_counter()
                    journal.close()
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
            for scratch in (JOURNAL, RESUME_FILE):  # bookkeeping of --resume: not part of the output
                (tmp / scratch).unlink(missing_ok=True)
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
