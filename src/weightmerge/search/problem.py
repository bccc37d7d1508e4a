"""What is searched: the merge template (method, default parameters, models) and its dimensions.

``check_config`` validates a search config without reading any tensor; ``build_template`` turns it
into a picklable :class:`Template`; ``load_inputs`` reads the base model and the models once (from
checkpoints, or the built-in benchmark's experts); ``merge_candidate`` merges one point in memory
with :func:`weightmerge.merge_state_dicts`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightmerge.search.config import BenchmarkEvaluatorDoc, DimensionDoc, SearchConfig, SearchConfigError
from weightmerge.search.space import Dimension

if TYPE_CHECKING:
    import torch

# keys of the merge part allowed with the benchmark evaluator (its experts are the models)
_BENCHMARK_MERGE_KEYS = ("merge_method", "parameters", "dtype", "seed", "exclude")


@dataclass(frozen=True)
class Template:
    """A picklable description of the candidates: ``params(point)`` is what ``merge_state_dicts`` gets."""

    method: str
    base_params: dict[str, Any]  # the default point, raw (per-model values as lists)
    model_names: tuple[str, ...]
    dims: tuple[Dimension, ...]
    seed: int = 0
    compute_dtype: str = "float32"
    exclude: tuple[str, ...] = ()
    model_paths: tuple[str, ...] = field(default=())  # file mode: for the best-config YAML

    @property
    def n_models(self) -> int:
        return len(self.model_names)

    def params(self, point: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.base_params.items()}
        for d in self.dims:
            v = point[d.name]
            if d.model is None:
                out[d.param] = v
                continue
            cur = out.get(d.param)
            if not isinstance(cur, list):
                cur = [self._default(d.param) if cur is None else cur] * self.n_models
                out[d.param] = cur
            cur[d.model] = v
        if self.exclude:
            out["exclude"] = list(self.exclude)
        return out

    def _default(self, name: str) -> Any:
        from weightmerge.methods.registry import get_method

        return next(p.default for p in get_method(self.method).params if p.name == name)

    def default_point(self) -> dict[str, Any]:
        """Each dimension's value in the merge part as written (the method default where unset)."""
        out: dict[str, Any] = {}
        for d in self.dims:
            v = self.base_params.get(d.param)
            if isinstance(v, (list, tuple)):
                v = v[d.model if d.model is not None else 0]
            out[d.name] = self._default(d.param) if v is None else v
        return out


def _err(msg: str) -> SearchConfigError:
    return SearchConfigError(msg)


def _benchmark_eval_config(doc: BenchmarkEvaluatorDoc, base_dir: str) -> Any:
    from weightmerge.eval.config import builtin_config
    from weightmerge.eval.config import load_config as load_eval_config

    p = Path(doc.benchmark)
    if not p.is_absolute():
        p = Path(base_dir) / p
    if p.is_file() or doc.benchmark.endswith((".yaml", ".yml")):
        return load_eval_config(p)
    return builtin_config(doc.benchmark)


def benchmark_tasks(cfg: SearchConfig) -> list[str]:
    doc = cfg.search.evaluator
    assert isinstance(doc, BenchmarkEvaluatorDoc)
    ecfg = _benchmark_eval_config(doc, cfg.base_dir)
    if doc.tasks is None:
        return list(ecfg.tasks)
    unknown = [t for t in doc.tasks if t not in ecfg.tasks]
    if unknown:
        raise _err(f"search.evaluator.tasks: {unknown[0]!r} is not a held-in task of {doc.benchmark!r}")
    return list(doc.tasks)


def _model_names(paths: Sequence[str]) -> tuple[str, ...]:
    names = [Path(p.rstrip("/")).name or f"model_{i}" for i, p in enumerate(paths)]
    return tuple(n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names))


def build_template(cfg: SearchConfig) -> Template:
    """Validate the merge part and the dimensions against the method (no tensor is read)."""
    from weightmerge.methods._params import did_you_mean
    from weightmerge.methods.registry import METHODS

    merge = dict(cfg.merge)
    method = merge.get("merge_method")
    if not isinstance(method, str):
        raise _err("merge_method: missing (the method whose parameters are searched)")
    if method not in METHODS:
        raise _err(f"merge_method: unknown method {method!r}{did_you_mean(method, list(METHODS))}")
    paths: tuple[str, ...] = ()
    if cfg.benchmark:
        extra = sorted(set(merge) - set(_BENCHMARK_MERGE_KEYS))
        if extra:
            raise _err(
                f"{extra[0]}: not allowed with the benchmark evaluator (its experts are the models); "
                f"allowed: {list(_BENCHMARK_MERGE_KEYS)}"
            )
        names = tuple(benchmark_tasks(cfg))
        params = dict(merge.get("parameters") or {})
        seed = int(merge.get("seed", 0))
        dtype = str(merge.get("dtype") or "float32")
        exclude = tuple(merge.get("exclude") or ())
    else:
        from weightmerge.config import load_config

        try:
            mcfg = load_config(merge, base_dir=cfg.base_dir)
        except ValueError as err:
            raise _err(str(err)) from None
        set_params = set(mcfg.parameters) | {k for e in mcfg.models for k in e.parameters}
        plain = mcfg.model_params()
        varying = sorted(set_params - set(plain))
        if varying:
            raise _err(
                f"parameters.{varying[0]}: filters and gradients are not searched in memory; "
                "give plain values in a search config"
            )
        params = plain
        paths = tuple(str(e.model) for e in mcfg.models)
        names = _model_names(paths)
        seed = mcfg.seed
        dtype = str(mcfg.compute_dtype).removeprefix("torch.")
        exclude = tuple(mcfg.exclude)
    return make_template(
        method=method,
        params=params,
        names=names,
        space=cfg.search.space,
        optimizer=cfg.search.optimizer,
        seed=seed,
        compute_dtype=dtype,
        exclude=exclude,
        paths=paths,
    )


def make_template(
    *,
    method: str,
    params: Mapping[str, Any],
    names: Sequence[str],
    space: Sequence[DimensionDoc],
    optimizer: str,
    seed: int = 0,
    compute_dtype: str = "float32",
    exclude: Sequence[str] = (),
    paths: Sequence[str] = (),
) -> Template:
    """The dimensions of ``space`` for ``method`` merging models ``names``, checked (corners too)."""
    from weightmerge.methods._params import did_you_mean, resolve_params
    from weightmerge.methods.registry import get_method

    spec = get_method(method)
    names = tuple(names)
    stats = [p.name for p in spec.params if p.kind == "stats"]
    if stats:
        raise _err(f"merge_method: {method!r} needs statistics ({stats[0]}); search does not compute them")
    if spec.name == "emr":
        raise _err("merge_method: emr makes one model per task; search a method that makes one merged model")
    if spec.min_models > len(names):
        raise _err(f"merge_method: {method!r} needs at least {spec.min_models} models, got {len(names)}")
    by_name = {p.name: p for p in spec.params}
    dims: list[Dimension] = []
    for i, d in enumerate(space):
        where = f"search.space[{i}]"
        p = by_name.get(d.param)
        if p is None:
            raise _err(
                f"{where}.param: {method!r} has no parameter {d.param!r}"
                f"{did_you_mean(d.param, list(by_name))}; known: {sorted(by_name)}"
            )
        if (d.per_model or d.model is not None) and not p.per_model:
            raise _err(f"{where}: parameter {d.param!r} of {method!r} has one value for all models")
        if d.values is None and p.kind not in ("float", "int"):
            raise _err(f"{where}: parameter {d.param!r} is a {p.kind}: give values, not low/high")
        if d.model is not None and d.model >= len(names):
            raise _err(f"{where}.model: index {d.model} but only {len(names)} models")
        owners: list[int | None] = list(range(len(names))) if d.per_model else [d.model]
        for m in owners:
            dims.append(
                Dimension(
                    name=d.param if m is None else f"{d.param}[{names[m]}]",
                    param=d.param,
                    model=m,
                    low=d.low,
                    high=d.high,
                    log=d.log,
                    integer=d.integer or p.kind == "int",
                    steps=d.steps,
                    values=tuple(d.values) if d.values is not None else None,
                )
            )
    seen = [(d.param, d.model) for d in dims]
    clash = [
        s
        for s in seen
        if seen.count(s) > 1 or (s[1] is None and any(t[0] == s[0] for t in seen if t[1] is not None))
    ]
    if clash:
        raise _err(f"search.space: parameter {clash[0][0]!r} is searched twice")
    if optimizer == "cma" and any(d.categorical for d in dims):
        raise _err("search.optimizer: cma searches numeric ranges only; use tpe, random or grid for values")
    t = Template(
        method=method,
        base_params=dict(params),
        model_names=names,
        dims=tuple(dims),
        seed=seed,
        compute_dtype=compute_dtype,
        exclude=tuple(exclude),
        model_paths=tuple(paths),
    )
    # every corner of every range (and every choice) must be a valid parameter value
    probes = [t.default_point()]
    for dim in dims:
        for v in dim.grid() if dim.categorical else [dim.from_unit(0.0), dim.from_unit(1.0)]:
            probes.append({**probes[0], dim.name: v})
    for point in probes:
        try:
            spec.check(resolve_params(spec, t.params(point), len(names)), len(names))
        except (TypeError, ValueError) as err:
            raise _err(f"search.space: {err}") from None
    return t


def check_config(cfg: SearchConfig) -> None:
    build_template(cfg)


# ---------------------------------------------------------------------------------------------
# Inputs and merging
# ---------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """The tensors every candidate merges: read once, then shared with the workers."""

    base: Mapping[str, torch.Tensor]
    models: list[dict[str, torch.Tensor]]

    def share_memory(self) -> None:
        for sd in [self.base, *self.models]:
            for t in sd.values():
                t.share_memory_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for sd in [self.base, *self.models] for t in sd.values())


def _read_all(ref: Any) -> dict[str, torch.Tensor]:
    from weightmerge.engine.merge import open_ref

    src = open_ref(ref)
    try:
        names = src.keys()
        return {k: src.read(k).clone() for k in names}
    finally:
        src.close()


def load_file_inputs(cfg: SearchConfig) -> Inputs:
    from weightmerge.config import load_config

    mcfg = load_config(cfg.merge, base_dir=cfg.base_dir)
    if mcfg.base_model is None:
        raise ValueError("base_model: missing (a search merges task vectors of one base model)")
    return Inputs(base=_read_all(mcfg.base_model), models=[_read_all(e.model) for e in mcfg.models])


def merge_candidate(
    template: Template, inputs: Inputs, point: Mapping[str, Any]
) -> Mapping[str, torch.Tensor]:
    """The merged state dict of one point (in memory; never written)."""
    import torch

    from weightmerge.api import merge_state_dicts
    from weightmerge.emr.result import EMRResult

    out = merge_state_dicts(
        inputs.base,
        inputs.models,
        template.method,
        template.params(point),
        seed=template.seed,
        compute_dtype=getattr(torch, template.compute_dtype),
    )
    if isinstance(out, EMRResult):
        raise ValueError("emr makes one model per task; search a method that makes one merged model")
    return out


def env_threads(threads: int) -> None:
    """Limit torch (and OpenMP) to ``threads`` threads in this process."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
