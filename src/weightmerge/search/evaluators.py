"""Evaluators: score a merged state dict on one split, ``evaluate(state, split=...) -> {name: score}``.

The search asks only for ``split="validation"``; the chosen point is scored once with
``split="test"`` at the end (docs/search.md, *No leakage*). Evaluators are built from picklable
factories, so every worker process (or Ray actor) builds its own once.

* :class:`CallableEvaluator` -- a user's ``module:function(state_dict, *, split, **options)``.
* :class:`BenchmarkEvaluator` -- the built-in benchmark's held-in tasks: each expert's own head on
  the merged body (an adapter over ``weightmerge.eval``: pooled features, head accuracy).
* :class:`LmEvalEvaluator` -- lm-evaluation-harness tasks on the merged causal LM (``lm_eval`` extra).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

SPLITS = ("validation", "test")


class Evaluator(Protocol):
    def evaluate(self, state: Mapping[str, torch.Tensor], *, split: str) -> dict[str, float]: ...


class EvaluatorFactory(Protocol):
    def build(self) -> Evaluator: ...


def check_scores(scores: Any, *, who: str) -> dict[str, float]:
    """The scores as {name: float}; a clear error naming ``who`` otherwise."""
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError(f"evaluator {who} must return a non-empty mapping name -> number, got {scores!r}")
    out: dict[str, float] = {}
    for k, v in scores.items():
        if not isinstance(k, str):
            raise TypeError(f"evaluator {who}: score name {k!r} is not a string")
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"evaluator {who}: score {k!r} is {v!r}, not a number") from None
    return out


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ---------------------------------------------------------------------------------------------
# A user's callable
# ---------------------------------------------------------------------------------------------


def import_callable(target: str) -> Callable[..., Any]:
    """``package.module:function`` -> the function (an error naming what is missing)."""
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"evaluator {target!r}: write it as module:function (e.g. my_pkg.scores:accuracy)")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as err:
        raise ValueError(f"evaluator {target!r}: cannot import module {mod_name!r}: {err}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"evaluator {target!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"evaluator {target!r}: {attr!r} is not callable")
    return obj


@dataclass(frozen=True)
class CallableEvaluator:
    target: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> CallableEvaluator:
        import_callable(self.target)
        return self

    def evaluate(self, state: Mapping[str, torch.Tensor], *, split: str) -> dict[str, float]:
        _check_split(split)
        fn = import_callable(self.target)
        return check_scores(fn(state, split=split, **dict(self.options)), who=self.target)


# ---------------------------------------------------------------------------------------------
# The built-in benchmark (adapter over weightmerge.eval)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkData:
    """What scoring needs, picklable: the expert family (the loaded encoder: ``new_body()`` builds a
    body; its base weights are the search's base tensors, in shared memory once the search shares
    them), each task's prepared validation and test splits, each expert's head and validation
    accuracy (normalisation on validation)."""

    family: Any
    tasks: tuple[str, ...]
    validation: Mapping[str, Any]  # task -> weightmerge.eval.model.Encoded
    test: Mapping[str, Any]
    heads: Mapping[str, Mapping[str, torch.Tensor]]
    expert_val: Mapping[str, float]


class BenchmarkEvaluator:
    """Held-in accuracy of the merged body with each task's own head; ``normalized_avg`` is the mean
    over tasks of accuracy / the expert's accuracy on the same split (docs/evaluation.md). The test
    references (each expert on its own test split) need the experts' bodies: only the process that
    scores the chosen point on test has them."""

    def __init__(self, data: BenchmarkData, *, expert_bodies: Sequence[Mapping[str, Any]] | None = None):
        self.data = data
        self.body = data.family.new_body()
        self._experts = list(expert_bodies) if expert_bodies is not None else None
        self._expert_test: dict[str, float] | None = None

    def _accuracies(
        self, state: Mapping[str, torch.Tensor], split: str, tasks: Sequence[str] | None = None
    ) -> dict[str, float]:
        from weightmerge.eval.evaluate import head_accuracy, labels_of, pooled_features
        from weightmerge.eval.model import load_body_state

        load_body_state(self.body, state)
        enc = self.data.validation if split == "validation" else self.data.test
        return {
            t: head_accuracy(self.data.heads[t], pooled_features(self.body, enc[t]), labels_of(enc[t]))
            for t in (self.data.tasks if tasks is None else tasks)
        }

    def evaluate(self, state: Mapping[str, torch.Tensor], *, split: str) -> dict[str, float]:
        _check_split(split)
        if split == "validation":
            ref = dict(self.data.expert_val)
        else:
            if self._experts is None:
                raise RuntimeError("test scores are computed only at the end, by the main process")
            if self._expert_test is None:
                self._expert_test = {}
                for t, body in zip(self.data.tasks, self._experts, strict=True):
                    self._expert_test[t] = self._accuracies(body, "test", [t])[t]
            ref = self._expert_test
        acc = self._accuracies(state, split)
        norm = {t: acc[t] / ref[t] if ref[t] > 0 else math.nan for t in self.data.tasks}
        out = {
            "normalized_avg": sum(norm.values()) / len(norm),
            "avg": sum(acc.values()) / len(acc),
        }
        out.update({f"acc[{t}]": a for t, a in acc.items()})
        out.update({f"normalized[{t}]": n for t, n in norm.items()})
        return out


@dataclass(frozen=True)
class BenchmarkFactory:
    data: BenchmarkData

    def build(self) -> BenchmarkEvaluator:
        return BenchmarkEvaluator(self.data)


def prepare_benchmark(
    ecfg: Any,
    *,
    seed: int,
    tasks: Sequence[str],
    cache_dir: str | None,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[BenchmarkData, Any, list[Any]]:
    """Train or load the benchmark's experts for ``seed``; (data, base body state, expert bodies)."""
    from pathlib import Path

    from weightmerge.eval import runner
    from weightmerge.eval.cache import default_cache_dir
    from weightmerge.eval.model import load_encoder

    cache = Path(cache_dir or ecfg.cache_dir or default_cache_dir()).expanduser()
    sub = ecfg.model_copy(update={"tasks": list(tasks), "held_out": [], "n_experts": []})
    if hasattr(runner, "load_family"):  # the harness with expert families (text and vision)
        encoder = runner.load_family(sub.model, cache_dir=cache, image_size=sub.image_size)
    else:
        encoder = load_encoder(sub.model, cache_dir=cache)
    ctx = runner.prepare_seed(sub, encoder, seed, cache_dir=cache, progress=progress, log=log)
    data = BenchmarkData(
        family=encoder,
        tasks=tuple(tasks),
        validation={t: ctx.data[t].validation for t in tasks},
        test={t: ctx.data[t].test for t in tasks},
        heads={t: ctx.experts[t].head for t in tasks},
        expert_val={t: ctx.experts[t].val_accuracy for t in tasks},
    )
    # the family's own base tensors (not a copy): sharing the search's inputs shares them too
    return data, encoder.base_state, [ctx.experts[t].body for t in tasks]
