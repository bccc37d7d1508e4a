"""The benchmark runner: experts -> merges -> scores, for every seed; then the report.

For each seed: build the tasks (seeded splits), fine-tune or load one expert per held-in task,
then for every method entry and every point of its grid merge the experts' bodies in memory
(``weightmerge.merge_state_dicts``) and score the merged body with each task's own head.

Scores (all accuracies on the test split unless said otherwise):

* held-in: accuracy of (merged body, head of task t) on task t; normalised = that / the expert's
  own test accuracy; averaged over the tasks. The reference rows are ``individual`` (each expert
  on its own task: normalised 1 by definition) and ``base`` (the base body with each expert's
  head: what any merge tends to as its scale goes to 0).
* held-out task with ``head = t`` (it reuses task t's label space): accuracy of (merged body,
  head of t). Its base reference is the base body with a head *fitted on frozen base features* on
  task t's training split (logistic regression): the base model's best head for that label space
  without fine-tuning; the base body with the expert's own head is reported too.
* held-out task without a head: a few-shot linear probe (``few_shot`` examples per class of its
  training split, seeded) on frozen mean-pooled features of the body; base reference = the same
  probe on the base body.
* held-out normalised = accuracy / base reference, averaged over held-out tasks.
* EMR is scored per task with its reconstruction ``task_state_dict(i)``: held-in task t and a
  held-out task reusing t's head use task t's model; few-shot held-out tasks have no task model
  and are not scored for EMR (nor for ``individual``).

Grids: every point is scored on validation; the ``<label> (tuned)`` row is the point with the
best mean normalised *validation* held-in score (first in grid order on ties), scored on test
and held-out (test scores of the other grid points are never computed: the test split chooses
nothing). Number of experts: for each size k in ``n_experts`` below the number of tasks,
``subsets_per_size`` seeded random subsets of k experts are merged with each entry's default
point and scored on their own tasks.
"""

from __future__ import annotations

import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from weightmerge.api import merge_state_dicts
from weightmerge.emr.result import EMRResult
from weightmerge.eval import stats as stats_lib
from weightmerge.eval.cache import default_cache_dir
from weightmerge.eval.config import EvalConfig, MethodEntry, config_hash, grid_points, params_key
from weightmerge.eval.evaluate import few_shot_index, fit_probe, head_accuracy, labels_of, pooled_features
from weightmerge.eval.family import ExpertFamily, n_parameters
from weightmerge.eval.model import load_body_state, load_encoder
from weightmerge.eval.train import (
    Expert,
    MultitaskModel,
    TrainSettings,
    derive_seed,
    load_or_train,
    load_or_train_multitask,
)
from weightmerge.methods.registry import get_method
from weightmerge.version import __version__

StateDict = Mapping[str, torch.Tensor]
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Per-seed context
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    train: Any  # a prepared split (weightmerge.eval.family.Split)
    validation: Any
    test: Any
    n_classes: int
    head: str | None  # held-out: the held-in task whose head it reuses


@dataclass
class SeedContext:
    seed: int
    config: EvalConfig
    encoder: ExpertFamily  # the family (text encoder or vision model) with this cell's base
    cache_dir: Path
    held_in: list[str]
    held_out: list[str]
    data: dict[str, Splits]
    fingerprints: dict[str, str]
    experts: dict[str, Expert] = field(default_factory=dict)
    body: Any = None  # one reusable body module
    loaded: Any = None  # identity of the state dict currently in ``body``
    stats: dict[tuple[str, str], dict[str, torch.Tensor]] = field(default_factory=dict)
    stats_cached: dict[str, bool] = field(default_factory=dict)
    base_refs: dict[str, float] = field(default_factory=dict)
    expert_test: dict[str, float] = field(default_factory=dict)  # each expert on its own test split
    probe_index: dict[str, list[int]] = field(default_factory=dict)
    progress: bool = True
    multitask: MultitaskModel | None = None  # the multitask baseline (cfg.multitask)

    def load(self, state: StateDict) -> None:
        if self.loaded is not state:
            load_body_state(self.body, state)
            self.loaded = state

    def features(self, state: StateDict, task: str, split: str) -> torch.Tensor:
        self.load(state)
        return pooled_features(self.body, getattr(self.data[task], split))


def _build_tasks(cfg: EvalConfig, seed: int) -> dict[str, Any]:
    from weightmerge.eval import tasks as task_lib

    known = task_lib.available_tasks()
    out: dict[str, Any] = {}
    for name in [*cfg.tasks, *cfg.held_out]:
        if name not in known:
            from weightmerge.methods._params import did_you_mean

            raise ValueError(f"unknown task {name!r}{did_you_mean(name, known)}; available: {sorted(known)}")
        out[name] = task_lib.build_task(
            name, seed=seed, n_train=cfg.sizes.train, n_val=cfg.sizes.validation, n_test=cfg.sizes.test
        )
    for name in cfg.held_out:
        head = out[name].head
        if head is None:
            continue
        if head not in cfg.tasks:
            raise ValueError(
                f"held-out task {name!r} reuses the head of task {head!r}, which is not a held-in task; "
                f"add {head!r} to tasks"
            )
        if len(out[name].label_names) != len(out[head].label_names):
            raise ValueError(
                f"held-out task {name!r} has {len(out[name].label_names)} labels but the head of "
                f"{head!r} has {len(out[head].label_names)}"
            )
    return out


def _train_settings(cfg: EvalConfig) -> TrainSettings:
    return TrainSettings(**cfg.training.model_dump())


def prepare_seed(
    cfg: EvalConfig, encoder: ExpertFamily, seed: int, *, cache_dir: Path, progress: bool, log: Log
) -> SeedContext:
    """Build tasks, prepare them for the family (tokenise, resize), fine-tune or load the experts
    (and the multitask model when ``cfg.multitask``)."""
    tasks = _build_tasks(cfg, seed)
    max_len = cfg.training.max_length
    data = {
        name: Splits(
            train=encoder.prepare(t.train, max_length=max_len),
            validation=encoder.prepare(t.validation, max_length=max_len),
            test=encoder.prepare(t.test, max_length=max_len),
            n_classes=len(t.label_names),
            head=t.head,
        )
        for name, t in tasks.items()
    }
    ctx = SeedContext(
        seed=seed,
        config=cfg,
        encoder=encoder,
        cache_dir=cache_dir,
        held_in=list(cfg.tasks),
        held_out=list(cfg.held_out),
        data=data,
        fingerprints={name: t.fingerprint() for name, t in tasks.items()},
        progress=progress,
    )
    settings = _train_settings(cfg)
    bar = tqdm(ctx.held_in, desc=f"seed {seed}: experts", disable=not progress, unit="expert")
    for name in bar:
        d = data[name]
        expert = load_or_train(
            encoder,
            task=name,
            task_fingerprint=ctx.fingerprints[name],
            n_classes=d.n_classes,
            train=d.train,
            validation=d.validation,
            settings=settings,
            seed=derive_seed(seed, name),
            cache_dir=cache_dir,
            progress=progress,
            device=cfg.device,
        )
        ctx.experts[name] = expert
        how = "cached" if expert.cached else f"trained in {expert.seconds:.1f} s"
        log(f"seed {seed}: expert {name}: validation accuracy {expert.val_accuracy:.3f} ({how})")
    if cfg.multitask:
        ctx.multitask = load_or_train_multitask(
            encoder,
            tasks={t: (data[t].n_classes, data[t].train, data[t].validation) for t in ctx.held_in},
            fingerprints=ctx.fingerprints,
            settings=settings,
            seed=derive_seed(seed, "multitask"),
            cache_dir=cache_dir,
            progress=progress,
            device=cfg.device,
        )
        mt = ctx.multitask
        how = "cached" if mt.cached else f"trained in {mt.seconds:.1f} s"
        log(f"seed {seed}: multitask model: mean validation accuracy {mt.val_accuracy:.3f} ({how})")
    ctx.body = encoder.new_body()
    for name in ctx.held_out:
        if data[name].head is None:
            ctx.probe_index[name] = few_shot_index(
                data[name].train.labels, shots=cfg.few_shot, seed=derive_seed(seed, name, "few-shot")
            )
    return ctx


def statistics(ctx: SeedContext, kind: str, task: str) -> dict[str, torch.Tensor]:
    """Fisher (``kind="fisher"``) or Gram matrices (``"gram"``) of one expert, cached."""
    key = (kind, task)
    if key not in ctx.stats:
        e = ctx.experts[task]
        cfg = ctx.config.stats
        ctx.stats[key], cached = stats_lib.load_or_compute(
            kind,
            encoder=ctx.encoder,
            body=e.body,
            head=e.head,
            data=ctx.data[task].train,
            settings=stats_lib.StatsSettings(**cfg.model_dump()),
            expert_key=e.key,
            directory=e.directory,
            progress=ctx.progress,
        )
        ctx.stats_cached[f"{kind}:{task}"] = cached
    return ctx.stats[key]


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Accuracies of one model (or family of per-task models) on the seed's tasks."""

    test: dict[str, float]
    validation: dict[str, float] = field(default_factory=dict)
    held_out: dict[str, float | None] = field(default_factory=dict)


def _probe_accuracy(ctx: SeedContext, state: StateDict, task: str) -> float:
    d = ctx.data[task]
    index = ctx.probe_index[task]
    feats = ctx.features(state, task, "train")[torch.tensor(index)]
    labels = labels_of(d.train)[torch.tensor(index)]
    head = fit_probe(feats, labels, n_classes=d.n_classes)
    return head_accuracy(head, ctx.features(state, task, "test"), labels_of(d.test))


def score(
    ctx: SeedContext,
    state_for: Callable[[str | None], StateDict | None],
    *,
    tasks: Sequence[str],
    held_out: Sequence[str],
    validation: bool,
    test: bool = True,
    head_for: Callable[[str], Mapping[str, torch.Tensor]] | None = None,
) -> Scores:
    """Score the body ``state_for(t)`` on held-in tasks ``tasks`` with each task's own head (test
    and/or validation split); held-out tasks (test split) reusing head t use ``state_for(t)``,
    few-shot ones ``state_for(None)`` (None = not applicable). Heads: each expert's own, or
    ``head_for(t)`` (the multitask model's)."""
    heads = head_for or (lambda t: ctx.experts[t].head)
    out = Scores(test={})
    for t in tasks:
        state = state_for(t)
        assert state is not None
        head = heads(t)
        if test:
            out.test[t] = head_accuracy(head, ctx.features(state, t, "test"), labels_of(ctx.data[t].test))
        if validation:
            out.validation[t] = head_accuracy(
                head, ctx.features(state, t, "validation"), labels_of(ctx.data[t].validation)
            )
    for h in held_out:
        owner = ctx.data[h].head
        state = state_for(owner)
        if state is None:
            out.held_out[h] = None
        elif owner is not None:
            head = heads(owner)
            out.held_out[h] = head_accuracy(head, ctx.features(state, h, "test"), labels_of(ctx.data[h].test))
        else:
            out.held_out[h] = _probe_accuracy(ctx, state, h)
    return out


def evaluate_state(
    ctx: SeedContext, state: StateDict, *, split: str = "validation", tasks: Sequence[str] | None = None
) -> dict[str, Any]:
    """Score one merged body on held-in ``tasks`` (default: all) of a prepared seed, each task with
    its expert's head: ``{"normalized_avg", "avg", "accuracy": {task: acc}, "normalized": {task:
    acc / the expert's accuracy on the same split}}``. ``split`` is "validation" (for choosing
    coefficients) or "test" (for reporting the chosen point). The entry point for coefficient
    search (docs/evaluation.md, "From Python").
    """
    if split not in ("validation", "test"):
        raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
    names = list(tasks) if tasks is not None else list(ctx.held_in)
    unknown = [t for t in names if t not in ctx.experts]
    if unknown:
        raise ValueError(f"no expert for task(s) {unknown}; held-in tasks are {ctx.held_in}")
    scores = score(ctx, lambda _t: state, tasks=names, held_out=(), validation=split == "validation",
                   test=split == "test")  # fmt: skip
    acc = scores.validation if split == "validation" else scores.test
    if split == "validation":
        ref = {t: ctx.experts[t].val_accuracy for t in names}
    else:
        missing = [t for t in names if t not in ctx.expert_test]
        if missing:
            experts = score(ctx, lambda t: None if t is None else ctx.experts[t].body, tasks=missing,
                            held_out=(), validation=False)  # fmt: skip
            ctx.expert_test.update(experts.test)
        ref = {t: ctx.expert_test[t] for t in names}
    norm = {t: _ratio(acc[t], ref[t]) for t in names}
    return {"normalized_avg": _mean(list(norm.values())), "avg": _mean(list(acc.values())), "accuracy": acc,
            "normalized": norm}  # fmt: skip


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarise(ctx: SeedContext, scores: Scores, reference: Mapping[str, Scores]) -> dict[str, Any]:
    """Per-task and averaged raw and normalised numbers of one scored model."""
    experts = reference["individual"]
    row: dict[str, Any] = {}
    if scores.test:
        norm = {t: _ratio(a, experts.test[t]) for t, a in scores.test.items()}
        row.update(
            held_in=dict(scores.test),
            avg=_mean(list(scores.test.values())),
            normalized=norm,
            normalized_avg=_mean(list(norm.values())),
        )
    if scores.validation:
        vnorm = {t: _ratio(a, ctx.experts[t].val_accuracy) for t, a in scores.validation.items()}
        row["validation"] = dict(scores.validation)
        row["validation_normalized_avg"] = _mean(list(vnorm.values()))
    if scores.held_out:
        ho_norm = {h: _ratio(a, ctx.base_refs.get(h)) for h, a in scores.held_out.items()}
        row["held_out"] = dict(scores.held_out)
        row["held_out_normalized"] = ho_norm
        row["held_out_normalized_avg"] = _mean(list(ho_norm.values()))
    return row


def reference_rows(ctx: SeedContext) -> tuple[dict[str, Scores], dict[str, Any]]:
    """Scores of the individual experts and of the base body (+ held-out base references)."""
    base = ctx.encoder.base_state
    experts = score(
        ctx,
        lambda t: None if t is None else ctx.experts[t].body,
        tasks=ctx.held_in,
        held_out=ctx.held_out,
        validation=False,
    )
    ctx.expert_test = dict(experts.test)
    base_scores = score(ctx, lambda _t: base, tasks=ctx.held_in, held_out=ctx.held_out, validation=False)
    refs = {"individual": experts, "base": base_scores}
    if ctx.multitask is not None:
        mt = ctx.multitask
        refs["multitask"] = score(
            ctx,
            lambda _t: mt.body,
            tasks=ctx.held_in,
            held_out=ctx.held_out,
            validation=False,
            head_for=lambda t: mt.heads[t],
        )
    details: dict[str, Any] = {}
    for h in ctx.held_out:
        owner = ctx.data[h].head
        if owner is None:
            ctx.base_refs[h] = _probe_accuracy(ctx, base, h)
            details[h] = {"kind": "few_shot_probe", "shots": ctx.config.few_shot, "base": ctx.base_refs[h]}
            continue
        d = ctx.data[owner]
        probe = fit_probe(ctx.features(base, owner, "train"), labels_of(d.train), n_classes=d.n_classes)
        ctx.base_refs[h] = head_accuracy(probe, ctx.features(base, h, "test"), labels_of(ctx.data[h].test))
        details[h] = {
            "kind": "reused_head",
            "head": owner,
            "base": ctx.base_refs[h],
            "base_with_expert_head": base_scores.held_out[h],
            "expert": experts.held_out[h],
        }
    return refs, details


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------


def merge_params(
    ctx: SeedContext, method: str, params: Mapping[str, Any], tasks: Sequence[str]
) -> dict[str, Any]:
    """User params plus the statistics the method needs (one entry per merged expert)."""
    spec = get_method(method)
    full = dict(params)
    for key in spec.aux_inputs:
        kind = {"fisher": "fisher", "gram": "gram"}.get(key)
        if kind is None:
            raise ValueError(f"method {method!r} needs statistics {key!r}, which the harness cannot compute")
        full[key] = [statistics(ctx, kind, t) for t in tasks]
    return full


Merged = Mapping[str, torch.Tensor] | EMRResult


def merge(
    ctx: SeedContext, method: str, params: Mapping[str, Any], *, tasks: Sequence[str], dtype: str = "float32"
) -> tuple[Merged, float]:
    """Merge the bodies of the experts of ``tasks``; (result, seconds of the merge itself)."""
    full = merge_params(ctx, method, params, tasks)
    t0 = time.perf_counter()
    merged = merge_state_dicts(
        ctx.encoder.base_state,
        [ctx.experts[t].body for t in tasks],
        method,
        full,
        seed=ctx.seed,
        compute_dtype=getattr(torch, dtype),
    )
    return merged, time.perf_counter() - t0


def score_merged(
    ctx: SeedContext,
    merged: Merged,
    *,
    tasks: Sequence[str],
    held_out: Sequence[str],
    validation: bool,
    test: bool = True,
) -> Scores:
    """Score a merge of the experts of ``tasks`` (EMR: task i with its reconstruction i)."""
    if isinstance(merged, EMRResult):
        emr = merged
        per_task: dict[str, StateDict] = {}
        index = {t: i for i, t in enumerate(tasks)}

        def state_for(t: str | None) -> StateDict | None:
            if t is None or t not in index:
                return None
            if t not in per_task:
                per_task.clear()  # one reconstruction alive at a time
                per_task[t] = emr.task_state_dict(index[t])
            return per_task[t]

        return score(ctx, state_for, tasks=tasks, held_out=held_out, validation=validation, test=test)
    body = merged
    return score(ctx, lambda _t: body, tasks=tasks, held_out=held_out, validation=validation, test=test)


def merge_and_score(
    ctx: SeedContext,
    method: str,
    params: Mapping[str, Any],
    *,
    tasks: Sequence[str],
    held_out: Sequence[str],
    validation: bool,
    test: bool = True,
    dtype: str = "float32",
) -> tuple[Scores, float]:
    """Merge the experts of ``tasks`` and score the result; (scores, merge seconds)."""
    merged, seconds = merge(ctx, method, params, tasks=tasks, dtype=dtype)
    scores = score_merged(ctx, merged, tasks=tasks, held_out=held_out, validation=validation, test=test)
    return scores, seconds


def _subsets(tasks: Sequence[str], k: int, count: int, seed: int) -> list[list[str]]:
    """``count`` distinct seeded subsets of size k (fewer when fewer exist), in task order."""
    rng = random.Random(derive_seed(seed, "subsets", k))
    found: list[list[str]] = []
    seen: set[tuple[int, ...]] = set()
    for _ in range(50 * count):
        if len(found) == count:
            break
        pick = tuple(sorted(rng.sample(range(len(tasks)), k)))
        if pick not in seen:
            seen.add(pick)
            found.append([tasks[i] for i in pick])
    return found


def run_entry(
    ctx: SeedContext, entry: MethodEntry, reference: Mapping[str, Scores], bar: Any
) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]]:
    """(default row, tuned row or None, grid rows) of one method entry.

    The default point is scored on test and held-out (and validation when there is a grid). Other
    grid points are scored on validation only; the best one (by normalised validation held-in,
    first on ties) is then scored on test and held-out, from the merge kept in memory.
    """
    points = grid_points(entry)
    grid_rows: list[dict[str, Any]] = []
    best: tuple[float, int, Merged | None] = (-math.inf, -1, None)
    default_row: dict[str, Any] = {}
    for i, point in enumerate(points):
        bar.set_postfix_str(f"{entry.name} {params_key(point)}")
        t0 = time.perf_counter()
        merged, merge_s = merge(ctx, entry.method, point, tasks=ctx.held_in, dtype=entry.dtype)
        first = i == 0
        scores = score_merged(
            ctx,
            merged,
            tasks=ctx.held_in,
            held_out=ctx.held_out if first else (),
            validation=bool(entry.grid),
            test=first,
        )
        row = summarise(ctx, scores, reference)
        row.update(method=entry.method, params=point, merge_seconds=merge_s)
        row["seconds"] = time.perf_counter() - t0
        bar.update(1)
        if first:
            default_row = row
        if entry.grid:
            grid_rows.append(row)
            v = row["validation_normalized_avg"]
            if v is not None and v > best[0]:
                best = (v, i, merged)
        del merged
    if not entry.grid:
        return default_row, None, grid_rows
    _, index, kept = best
    if index <= 0 or kept is None:  # the default point is the best (or nothing was scored)
        tuned = dict(default_row)
    else:
        t0 = time.perf_counter()
        scores = score_merged(ctx, kept, tasks=ctx.held_in, held_out=ctx.held_out, validation=False)
        tuned = {**grid_rows[index], **summarise(ctx, scores, reference)}
        tuned["seconds"] = grid_rows[index]["seconds"] + time.perf_counter() - t0
    tuned["selected_by"] = "validation normalised held-in"
    tuned["grid_index"] = max(index, 0)
    return default_row, tuned, grid_rows


def run_seed(ctx: SeedContext, *, log: Log) -> dict[str, Any]:
    """Every number for one seed."""
    cfg = ctx.config
    t_start = time.perf_counter()
    reference, held_out_details = reference_rows(ctx)
    rows: dict[str, Any] = {name: summarise(ctx, s, reference) for name, s in reference.items()}
    grids: dict[str, Any] = {}
    total = sum(len(grid_points(e)) for e in cfg.methods)
    bar = tqdm(total=total, desc=f"seed {ctx.seed}: merge + evaluate", disable=not ctx.progress, unit="merge")
    for entry in cfg.methods:
        default_row, tuned, grid_rows = run_entry(ctx, entry, reference, bar)
        rows[entry.name] = default_row
        if tuned is not None:
            rows[f"{entry.name} (tuned)"] = tuned
            grids[entry.name] = grid_rows
        if entry.search is not None:  # weightmerge.search.eval_hook: chosen on validation, scored here
            from weightmerge.search.eval_hook import search_row

            rows[f"{entry.name} (search)"] = search_row(ctx, entry, reference, log=log)
        msg = f"seed {ctx.seed}: {entry.name}: avg {default_row['avg']:.3f}, normalised held-in "
        msg += f"{default_row['normalized_avg']:.3f}"
        if tuned is not None:
            msg += f"; tuned {tuned['params']}: {tuned['normalized_avg']:.3f}"
        log(msg)
    bar.close()
    sweep = run_sweep(ctx, rows)
    return {
        "seed": ctx.seed,
        "task_fingerprints": ctx.fingerprints,
        "experts": {
            t: {
                "val_accuracy": e.val_accuracy,
                "test_accuracy": reference["individual"].test[t],
                "history": [list(h) for h in e.history],
                "train_seconds": e.seconds,
                "cached": e.cached,
                "key": e.key,
            }
            for t, e in ctx.experts.items()
        },
        "held_out_references": held_out_details,
        "rows": rows,
        "grids": grids,
        "sweep": sweep,
        "stats_cached": dict(ctx.stats_cached),
        "multitask": None
        if ctx.multitask is None
        else {
            "val_accuracy": ctx.multitask.val_accuracy,
            "steps": ctx.multitask.steps,
            "train_seconds": ctx.multitask.seconds,
            "cached": ctx.multitask.cached,
            "history": [list(h) for h in ctx.multitask.history],
        },
        "seconds": {"merge_and_evaluate": time.perf_counter() - t_start},
    }


def run_sweep(ctx: SeedContext, rows: Mapping[str, Any]) -> dict[str, Any]:
    """Normalised held-in score vs number of merged experts (each entry's default point)."""
    cfg = ctx.config
    n = len(ctx.held_in)
    out: dict[str, Any] = {}
    sizes = sorted({k for k in cfg.n_experts if k < n})
    if not sizes:
        return out
    work = [
        (entry, k, subset)
        for k in sizes
        for subset in _subsets(ctx.held_in, k, cfg.subsets_per_size, ctx.seed)
        for entry in cfg.methods
    ]
    bar = tqdm(work, desc=f"seed {ctx.seed}: experts sweep", disable=not ctx.progress, unit="merge")
    for entry, k, subset in bar:
        bar.set_postfix_str(f"{entry.name} k={k}")
        scores, _ = merge_and_score(
            ctx,
            entry.method,
            grid_points(entry)[0],
            tasks=subset,
            held_out=(),
            validation=False,
            dtype=entry.dtype,
        )
        norm = _mean([_ratio(scores.test[t], ctx.expert_test[t]) for t in subset])
        out.setdefault(entry.name, {}).setdefault(str(k), []).append(
            {"tasks": subset, "normalized_avg": norm}
        )
    for entry in cfg.methods:
        out.setdefault(entry.name, {})[str(n)] = [
            {"tasks": list(ctx.held_in), "normalized_avg": rows[entry.name]["normalized_avg"]}
        ]
    return out


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------


def manifest(
    cfg: EvalConfig, families: Sequence[ExpertFamily], *, started: float, command: Sequence[str] | None
) -> dict[str, Any]:
    try:
        import transformers

        tf_version: str | None = transformers.__version__
    except ImportError:  # vision-only runs do not need it
        tf_version = None
    models = [
        {"name": f.name, "path": str(getattr(f, "path", f.name)), "fingerprint": f.fingerprint}
        for f in families
    ]
    return {
        "weightmerge": __version__,
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg),
        "seeds": list(cfg.seeds),
        "model": models[0] if len(models) == 1 else models,
        "command": list(command) if command is not None else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
    }


def contention_hint() -> str | None:
    """A hint when the CPU is oversubscribed and OpenMP threads would spin (several times slower)."""
    if "OMP_WAIT_POLICY" in os.environ or not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores + 0.5:
        return None
    return (
        f"note: the machine is busy (load {load:.1f} on {cores} cores); torch's OpenMP threads spin "
        "while they wait, which can make fine-tuning several times slower: set OMP_WAIT_POLICY=PASSIVE "
        "in the environment or use --threads 1"
    )


# Bump when a change to the runner changes a cell's numbers (part of every cached run's key).
RUN_VERSION = 1


def load_family(model: str, *, cache_dir: Path, image_size: int) -> ExpertFamily:
    """A text encoder (`weightmerge.eval.model`) or a vision model (`weightmerge.eval.vision`)."""
    from weightmerge.eval.vision import is_vision_model, load_vision_family

    if is_vision_model(model):
        return load_vision_family(model, image_size=image_size)
    return load_encoder(model, cache_dir=cache_dir)


def _base_splits(
    cfg: EvalConfig, family: ExpertFamily
) -> tuple[dict[str, tuple[int, Any, Any]], dict[str, str]]:
    """The base tasks (seed ``base_seed``) prepared for the family: ({task: (classes, train,
    validation)}, {task: fingerprint})."""
    from weightmerge.eval import tasks as task_lib

    sizes = cfg.base_sizes or cfg.sizes
    out: dict[str, tuple[int, Any, Any]] = {}
    fps: dict[str, str] = {}
    for name in cfg.base_tasks:
        t = task_lib.build_task(
            name, seed=cfg.base_seed, n_train=sizes.train, n_val=sizes.validation, n_test=sizes.test
        )
        ml = cfg.training.max_length
        out[name] = (
            len(t.label_names),
            family.prepare(t.train, max_length=ml),
            family.prepare(t.validation, max_length=ml),
        )
        fps[name] = t.fingerprint()
    return out, fps


def make_base(
    cfg: EvalConfig, pretrained: ExpertFamily, base: str, *, cache_dir: Path, progress: bool, log: Log
) -> ExpertFamily:
    """The family with one of the bases of a scale study:

    * ``pretrained``: the model as loaded (images: with its own BatchNorm statistics);
    * ``random``: the architecture's own random initialisation, seeded with ``base_seed`` (images:
      BatchNorm statistics estimated on the base tasks' training images, which are 0/1 otherwise);
    * ``multitask``: the pretrained model further trained on the mixture of ``base_tasks`` (one
      head per task, the expert recipe or ``base_training``, seed ``base_seed``), the analogue of
      instruction tuning; cached like an expert.
    """
    if base == "pretrained":
        return pretrained
    base_data: dict[str, tuple[int, Any, Any]] = {}
    fps: dict[str, str] = {}
    if cfg.base_tasks:
        base_data, fps = _base_splits(cfg, pretrained)
    tag = ",".join(f"{t}:{fps[t][:16]}" for t in sorted(fps))
    if base == "random":
        state = pretrained.random_state(seed=cfg.base_seed)
        calib = [train for _, train, _ in base_data.values()] if pretrained.modality == "image" else []
        return pretrained.with_base(
            base="random", state=state, tag=f"random:{cfg.base_seed}[{tag}]", calibration=calib
        )
    start = pretrained
    settings = TrainSettings(**(cfg.base_training or cfg.training).model_dump())
    mt = load_or_train_multitask(
        start,
        tasks=base_data,
        fingerprints=fps,
        settings=settings,
        seed=cfg.base_seed,
        cache_dir=cache_dir,
        progress=progress,
        device=cfg.device,
        label="base",
    )
    how = "cached" if mt.cached else f"trained in {mt.seconds:.1f} s"
    log(
        f"{pretrained.name}: multitask base on {sorted(base_data)}: mean validation accuracy "
        f"{mt.val_accuracy:.3f} ({how})"
    )
    return start.with_base(base="multitask", state=mt.body, tag=f"multitask:{mt.key}")


def _run_key(cfg: EvalConfig, family: ExpertFamily, seed: int) -> str:
    from weightmerge.eval import cache as cache_lib

    data = cfg.model_dump(
        mode="json",
        exclude={
            "output_dir",
            "cache_dir",
            "models",
            "model",
            "bases",
            "seeds",
            "threads",
            "name",
            "reuse_runs",
        },
    )
    return cache_lib.content_key(
        {"kind": "run", "version": RUN_VERSION, "config": data, "model": family.fingerprint, "seed": seed}
    )


def check_device(device: str) -> None:
    """Fail before any work when the fine-tuning device is not there."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available (torch {torch.__version__}); use cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps': Apple's Metal backend is not available; use cpu")


def run_cell(
    cfg: EvalConfig, family: ExpertFamily, *, cache: Path, progress: bool, log: Log
) -> list[dict[str, Any]]:
    """Every seed of one (model, base) cell; each seed's result is cached (resumable)."""
    from weightmerge.eval import cache as cache_lib

    per_seed = []
    for seed in cfg.seeds:
        path = cache / "runs" / f"{family.name}-{family.base}-{seed}-{_run_key(cfg, family, seed)[:20]}.json"
        if cfg.reuse_runs and path.exists():
            result = cache_lib.load_json(path)
            result["cached_run"] = True
            log(f"{family.name} / {family.base} / seed {seed}: cached run")
            per_seed.append(result)
            continue
        ts = time.perf_counter()
        ctx = prepare_seed(cfg, family, seed, cache_dir=cache, progress=progress, log=log)
        prepared = time.perf_counter() - ts
        result = run_seed(ctx, log=log)
        result["seconds"]["experts"] = prepared
        result["seconds"]["total"] = time.perf_counter() - ts
        cache_lib.save_json(path, result)
        result["cached_run"] = False
        per_seed.append(result)
    return per_seed


def run_eval(
    cfg: EvalConfig,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Log = _stderr,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the whole benchmark or study and return the report dict (``weightmerge.eval.report``):
    one *cell* per (model, base); with a single cell, ``per_seed`` and ``summary`` are its own."""
    from weightmerge.eval.config import model_list
    from weightmerge.eval.report import aggregate, flat_rows

    started = time.time()
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    hint = contention_hint()
    if hint:
        log(hint)
    check_device(cfg.device)
    cache = Path(cache_dir or cfg.cache_dir or default_cache_dir()).expanduser()
    cells = []
    families = []
    for model in model_list(cfg):
        pretrained = load_family(model, cache_dir=cache, image_size=cfg.image_size)
        families.append(pretrained)
        for base in cfg.bases:
            tc = time.perf_counter()
            family = make_base(cfg, pretrained, base, cache_dir=cache, progress=progress, log=log)
            per_seed = run_cell(cfg, family, cache=cache, progress=progress, log=log)
            cells.append(
                {
                    "model": model,
                    "base": base,
                    "n_parameters": n_parameters(family.base_state),
                    "family": family.describe(),
                    "fingerprint": family.fingerprint,
                    "per_seed": per_seed,
                    "summary": aggregate(cfg, per_seed),
                    "seconds": time.perf_counter() - tc,
                }
            )
    man = manifest(cfg, families, started=started, command=command)
    man["seconds"] = time.perf_counter() - t0
    man["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    man["cache_dir"] = str(cache)
    report: dict[str, Any] = {"manifest": man, "cells": cells, "rows": flat_rows(cells)}
    if len(cells) == 1:
        report["per_seed"] = cells[0]["per_seed"]
        report["summary"] = cells[0]["summary"]
    return report
