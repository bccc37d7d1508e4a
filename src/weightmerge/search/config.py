"""The search config: a merge config (docs/config.md) plus a ``search:`` block (docs/search.md).

Example::

    merge_method: pcb
    base_model: models/base            # absent with the benchmark evaluator (its experts are merged)
    models: [{model: models/a}, {model: models/b}]
    parameters: {keep_ratio: 0.1, lambda: 1.0}    # the default point; searched values replace it
    search:
      evaluator: {python: "my_pkg.scores:accuracy"}     # or {benchmark: demo, seed: 0}, {lm_eval: ...}
      objective: accuracy              # the score to maximise (a key the evaluator returns)
      optimizer: cma                   # grid | random | cma | tpe
      budget: 40                       # evaluations
      population: 8                    # candidates per generation (evaluated in parallel)
      seed: 0
      space:
        - {param: lambda, per_model: true, low: 0.8, high: 1.3}   # one dimension per model
        - {param: keep_ratio, low: 0.05, high: 0.4, log: true}
        - {param: inter, values: [A, B]}                          # categorical (grid, random, tpe)

Errors are :class:`SearchConfigError` (a ValueError) naming the file and the key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

OPTIMIZERS = ("grid", "random", "cma", "tpe")


class SearchConfigError(ValueError):
    """A search config the user must fix (one line: FILE: LOCATION: MESSAGE)."""


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DimensionDoc(_Doc):
    """One searched parameter: a numeric range (``low``/``high``) or a list of ``values``."""

    param: str
    per_model: bool = False  # one dimension per merged model
    model: int | None = Field(default=None, ge=0)  # only this model's value (index into models)
    low: float | None = None
    high: float | None = None
    log: bool = False  # search log(value) (low > 0)
    integer: bool = False  # round to an integer
    steps: int | None = Field(default=None, ge=2)  # grid: this many evenly spaced values in [low, high]
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> DimensionDoc:
        ranged = self.low is not None or self.high is not None
        if self.values is not None:
            if ranged or self.steps is not None or self.log:
                raise ValueError(f"parameter {self.param!r}: give either values or low/high, not both")
            if not self.values:
                raise ValueError(f"parameter {self.param!r}: values is empty")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"parameter {self.param!r}: give low and high (or values)")
            if not self.low < self.high:
                raise ValueError(
                    f"parameter {self.param!r}: low ({self.low}) must be below high ({self.high})"
                )
            if self.log and self.low <= 0:
                raise ValueError(f"parameter {self.param!r}: log scale needs low > 0")
        if self.per_model and self.model is not None:
            raise ValueError(f"parameter {self.param!r}: per_model and model exclude each other")
        return self


class BenchmarkEvaluatorDoc(_Doc):
    """Score on the built-in benchmark: its experts (of ``seed``) are the merged models."""

    benchmark: str  # built-in eval config name (demo, benchmark, ...) or an eval config YAML path
    seed: int = 0
    cache_dir: str | None = None
    tasks: list[str] | None = None  # a subset of the benchmark's held-in tasks


class PythonEvaluatorDoc(_Doc):
    """Score with ``module:function(state_dict, *, split, **options) -> {name: score}``."""

    python: str
    options: dict[str, Any] = Field(default_factory=dict)


class LmEvalEvaluatorDoc(_Doc):
    """lm-evaluation-harness tasks on the merged causal LM (the optional ``lm_eval`` extra)."""

    lm_eval: list[str]  # tasks scored during the search (validation)
    test_tasks: list[str]  # the same tasks on their test data: scored once, at the end
    include_path: str | None = None  # folder of local task YAMLs
    include_defaults: bool = True  # also index lm_eval's own tasks (slow: thousands of YAML files)
    limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)
    model_dir: str | None = None  # config/tokenizer folder (default: base_model)


EvaluatorDoc = BenchmarkEvaluatorDoc | PythonEvaluatorDoc | LmEvalEvaluatorDoc


class SearchBlock(_Doc):
    space: list[DimensionDoc] = Field(min_length=1)
    evaluator: EvaluatorDoc
    objective: str
    optimizer: Literal["grid", "random", "cma", "tpe"] = "cma"
    budget: int = Field(default=50, ge=1)
    population: int | None = Field(default=None, ge=1)  # default: cma's own, else 8
    seed: int = 0
    sigma: float = Field(default=0.25, gt=0, le=1)  # cma: initial step, in units of each range
    workers: int = Field(default=1, ge=1)  # local worker processes
    threads: int = Field(default=1, ge=1)  # torch threads per evaluation
    output_dir: str = "weightmerge-search"


class SearchConfig(_Doc):
    """The merge part (kept as written: ``merge``) and the validated ``search`` block."""

    merge: dict[str, Any]
    search: SearchBlock
    base_dir: str  # merge paths are relative to it
    source: str | None = None

    @property
    def benchmark(self) -> bool:
        return isinstance(self.search.evaluator, BenchmarkEvaluatorDoc)

    def hash(self) -> str:
        """sha256 of what determines the candidates (not where outputs go, the worker count or the
        budget: a finished search can be resumed with a larger budget)."""
        data = {
            "merge": self.merge,
            "search": self.search.model_dump(mode="json", exclude={"output_dir", "workers", "budget"}),
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _where(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"search.{loc}: {msg}" if loc else f"search: {msg}"


def _evaluator(raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise SearchConfigError("search.evaluator: a mapping with one of the keys benchmark, python, lm_eval")
    kinds = [k for k in ("benchmark", "python", "lm_eval") if k in raw]
    if len(kinds) != 1:
        raise SearchConfigError(
            "search.evaluator: give exactly one of benchmark (built-in benchmark), python "
            "(module:function) or lm_eval (tasks)"
        )
    cls: dict[str, type[BaseModel]] = {
        "benchmark": BenchmarkEvaluatorDoc,
        "python": PythonEvaluatorDoc,
        "lm_eval": LmEvalEvaluatorDoc,
    }
    try:
        return cls[kinds[0]].model_validate(raw)
    except ValidationError as err:
        raise SearchConfigError(_where(err).replace("search.", "search.evaluator.", 1)) from None
