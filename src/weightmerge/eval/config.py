"""The evaluation config (``weightmerge eval CONFIG``): YAML validated by pydantic at the boundary.

Example (the full schema; every key but ``tasks`` and ``methods`` has a default)::

    name: my-benchmark
    model: minilm                  # built-in (minilm, tiny-random, efficientnet-lite0/1/2, tiny-cnn-w8)
                                   # or a local HF encoder folder
    models: [efficientnet-lite0, efficientnet-lite2]   # several models (the size axis; overrides model)
    bases: [pretrained, multitask, random]             # the base-quality axis (default [pretrained])
    base_tasks: [glyph_cyrillic, glyph_symbols]        # the multitask base's mixture (disjoint from
                                   # tasks and held_out); images: also the BatchNorm calibration set
    base_sizes: null               # sizes of the base tasks (default: sizes)
    base_training: null            # recipe of the multitask base (default: training)
    base_seed: 0                   # seed of the random and multitask bases (one base per model)
    multitask: true                # also train one model per seed on all held-in tasks (a row)
    image_size: 32                 # vision models: images are resized to image_size^2
    reuse_runs: true               # a finished (model, base, seed) run is cached and not recomputed
    device: cpu                    # fine-tuning on cuda / cuda:N / mps (merges and scores: CPU)
    tasks: [wn_noun_a, fortune_topic, ...]      # held-in: one expert each, merged
    held_out: [vader_words]        # scored, never merged (see docs/evaluation.md)
    seeds: [0, 1, 2]               # each seed: new data splits, new experts
    sizes: {train: 600, validation: 200, test: 400}
    training: {epochs: 2, batch_size: 16, lr: 1.0e-4, head_lr: 2.0e-3, max_length: 64}
    stats: {fisher_examples: 256, gram_examples: 600, batch_size: 16}
    few_shot: 16                   # examples per class of the probe for held-out tasks without a head
    n_experts: [2, 4]              # also merge seeded random subsets of this many experts
    subsets_per_size: 2
    threads: 2                     # torch.set_num_threads
    output_dir: results/my-benchmark
    cache_dir: null                # default ~/.cache/weightmerge (or $WEIGHTMERGE_CACHE)
    methods:
      - method: task_arithmetic    # a name from `weightmerge methods`
        label: TA                  # the row name in reports (default: the method name)
        params: {lambda: 0.3}      # the "default" point (reported as the label)
        grid: {lambda: [0.3, 0.5, 0.7, 1.0]}   # optional: cartesian grid, best on validation
        dtype: float32             # compute dtype of the merge (float64 for ill-conditioned RegMean)

Statistics parameters (``fisher``, ``gram``) are computed by the harness and must not be given.
Errors are :class:`EvalConfigError` (a ValueError) naming the file and the offending key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from weightmerge.config.errors import ConfigError
from weightmerge.methods._params import did_you_mean, resolve_params
from weightmerge.methods.registry import METHODS

Scalar = bool | int | float | str


# The one config error type (merge and eval configs): one line, FILE: LOCATION: MESSAGE.
EvalConfigError = ConfigError


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sizes(_Doc):
    train: int = Field(default=600, ge=1)
    validation: int = Field(default=200, ge=1)
    test: int = Field(default=400, ge=1)


class Training(_Doc):
    epochs: int = Field(default=2, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    head_lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    max_length: int = Field(default=64, ge=2)
    evals_per_epoch: int = Field(default=2, ge=1)
    patience: int = Field(default=2, ge=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    bucket: int = Field(default=8, ge=1)


class Stats(_Doc):
    fisher_examples: int = Field(default=256, ge=1)
    gram_examples: int = Field(default=600, ge=1)
    batch_size: int = Field(default=16, ge=1)


class MethodEntry(_Doc):
    method: str
    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    dtype: Literal["float32", "float64"] = "float32"  # compute dtype of the merge
    search: dict[str, Any] | None = None  # a "(search)" row: docs/search.md (weightmerge.search.eval_hook)

    @property
    def name(self) -> str:
        return self.label or self.method

    @field_validator("grid")
    @classmethod
    def _grid_lists(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for k, values in v.items():
            if not values:
                raise ValueError(f"grid of {k!r} is empty")
        return v


Base = Literal["pretrained", "multitask", "random"]


class EvalConfig(_Doc):
    name: str = "eval"
    model: str = "minilm"
    models: list[str] = Field(default_factory=list)  # the size axis; empty: [model]
    bases: list[Base] = Field(default_factory=lambda: list[Base](["pretrained"]))
    base_tasks: list[str] = Field(default_factory=list)  # the multitask base's mixture
    base_sizes: Sizes | None = None  # sizes of the base tasks' splits (default: sizes)
    base_training: Training | None = None  # recipe of the multitask base (default: training)
    base_seed: int = 0
    multitask: bool = False  # the multitask baseline row (one model on all held-in tasks)
    image_size: int = Field(default=32, ge=8, le=512)
    reuse_runs: bool = True  # load a (model, base, seed) run from the cache when its inputs are unchanged
    device: str = "cpu"  # where fine-tuning runs: cpu, cuda, cuda:N (merging and scoring stay on the CPU)
    tasks: list[str] = Field(min_length=1)
    held_out: list[str] = Field(default_factory=list)
    methods: list[MethodEntry] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    sizes: Sizes = Field(default_factory=Sizes)
    training: Training = Field(default_factory=Training)
    stats: Stats = Field(default_factory=Stats)
    few_shot: int = Field(default=16, ge=1)
    n_experts: list[int] = Field(default_factory=list)
    subsets_per_size: int = Field(default=1, ge=1)
    threads: int = Field(default=2, ge=1)
    output_dir: str = "weightmerge-eval"
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        for key, names in (("tasks", self.tasks), ("held_out", self.held_out)):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{key}: task {dup[0]!r} listed twice")
        both = sorted(set(self.tasks) & set(self.held_out))
        if both:
            raise ValueError(f"task {both[0]!r} is both held-in (tasks) and held-out")
        shared = sorted(set(self.base_tasks) & (set(self.tasks) | set(self.held_out)))
        if shared:
            raise ValueError(
                f"base_tasks: task {shared[0]!r} is also held-in or held-out; the multitask base must be "
                "trained on tasks disjoint from both"
            )
        axes: tuple[tuple[str, list[str]], ...] = (
            ("models", self.models),
            ("bases", list(self.bases)),
            ("base_tasks", self.base_tasks),
        )
        for key, names in axes:
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{key}: {dup[0]!r} listed twice")
        if "multitask" in self.bases and not self.base_tasks:
            raise ValueError("bases: the 'multitask' base needs base_tasks (the mixture it is trained on)")
        if self.device != "cpu" and not self.device.startswith(("cuda", "mps")):
            raise ValueError(f"device: {self.device!r} is not cpu, cuda, cuda:N or mps")
        if not self.bases:
            raise ValueError("bases: give at least one of pretrained, multitask, random")
        labels = [m.name for m in self.methods]
        dup = sorted({n for n in labels if labels.count(n) > 1})
        if dup:
            raise ValueError(f"methods: two entries are labelled {dup[0]!r}; give each a distinct label")
        for reserved in ("individual", "base", "multitask"):
            if reserved in labels:
                raise ValueError(f"methods: label {reserved!r} is reserved for a reference row")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: a seed is listed twice")
        for k in self.n_experts:
            if not 1 <= k <= len(self.tasks):
                raise ValueError(
                    f"n_experts: {k} is not between 1 and the number of tasks ({len(self.tasks)})"
                )
        return self


def model_list(cfg: EvalConfig) -> list[str]:
    """The models of a run: ``models`` when given, else ``[model]``."""
    return list(cfg.models) or [cfg.model]


def grid_points(entry: MethodEntry) -> list[dict[str, Any]]:
    """The default point first, then every point of the cartesian grid (deduplicated, in order)."""
    points = [dict(entry.params)]
    keys = list(entry.grid)
    for values in itertools.product(*(entry.grid[k] for k in keys)):
        points.append({**entry.params, **dict(zip(keys, values, strict=True))})
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for p in points:
        k = params_key(p)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _check_method(entry: MethodEntry, index: int, n_models: int, smallest: int) -> None:
    where = f"methods[{index}]"
    spec = METHODS.get(entry.method)
    if spec is None:
        raise EvalConfigError(
            f"{where}.method: unknown merge method {entry.method!r}"
            f"{did_you_mean(entry.method, list(METHODS))}; see `weightmerge methods`"
        )
    stats = {p.name for p in spec.params if p.kind == "stats"}
    for key in [*entry.params, *entry.grid]:
        if key in stats:
            raise EvalConfigError(
                f"{where}: parameter {key!r} of {entry.method!r} is computed by the harness from each "
                "task's training data; remove it"
            )
    placeholders: dict[str, list[dict[str, Any]]] = {k: [{} for _ in range(n_models)] for k in stats}
    for point in grid_points(entry):
        try:
            resolved = resolve_params(spec, {**point, **placeholders}, n_models)
            spec.check(resolved, n_models)
        except (TypeError, ValueError) as err:
            raise EvalConfigError(f"{where}: {err}") from None
    if entry.search is not None:
        from weightmerge.search.eval_hook import check_entry

        try:
            check_entry(entry.method, entry.params, entry.search, n_models)
        except ValueError as err:
            raise EvalConfigError(f"{where}.search.{err}") from None
    if spec.min_models > smallest or (spec.max_models is not None and spec.max_models < n_models):
        most = "any number of" if spec.max_models is None else f"at most {spec.max_models}"
        raise EvalConfigError(
            f"{where}: method {entry.method!r} merges at least {spec.min_models} and {most} models; "
            f"this config merges {smallest} to {n_models} experts"
        )


def parse_config(data: Any, *, source: str | None = None) -> EvalConfig:
    """Validate a parsed YAML document (see the module docstring)."""
    prefix = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise EvalConfigError(f"{prefix}an eval config is a mapping (tasks:, methods:, ...)")
    try:
        cfg = EvalConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            hint = did_you_mean(str(first["loc"][-1]), list(EvalConfig.model_fields))
            msg = f"unknown key{hint if len(first['loc']) == 1 else ''}"
        raise EvalConfigError(f"{prefix}{loc + ': ' if loc else ''}{msg}") from None
    smallest = min([len(cfg.tasks), *cfg.n_experts])
    for i, entry in enumerate(cfg.methods):
        try:
            _check_method(entry, i, len(cfg.tasks), smallest)
        except EvalConfigError as err:
            raise EvalConfigError(f"{prefix}{err}") from None
    return cfg


def load_config(path: str | os.PathLike[str]) -> EvalConfig:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"eval config not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise EvalConfigError(f"{path}: not valid YAML: {err}") from None
    cfg = parse_config(data, source=str(path))
    base = p.parent
    updates: dict[str, Any] = {}
    if not Path(cfg.output_dir).is_absolute():
        updates["output_dir"] = str((base / cfg.output_dir).resolve())
    if cfg.cache_dir is not None and not Path(cfg.cache_dir).expanduser().is_absolute():
        updates["cache_dir"] = str((base / cfg.cache_dir).resolve())
    return cfg.model_copy(update=updates) if updates else cfg


def builtin_config(name: str) -> EvalConfig:
    """A config shipped in ``weightmerge/eval/configs/<name>.yaml`` (output dir left relative)."""
    here = Path(__file__).parent / "configs" / f"{name}.yaml"
    if not here.is_file():
        known = sorted(p.stem for p in here.parent.glob("*.yaml"))
        raise EvalConfigError(f"no built-in eval config {name!r}; known: {known}")
    return parse_config(yaml.safe_load(here.read_text(encoding="utf-8")), source=str(here))


def config_hash(cfg: EvalConfig) -> str:
    """sha256 of the config's canonical JSON, without where outputs and caches go."""
    data = cfg.model_dump(mode="json", exclude={"output_dir", "cache_dir"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
