"""The optimizers, behind one ask/tell interface (none is written here: grid and random draws are
plain enumeration/sampling; CMA-ES is the ``cma`` package; TPE is Optuna's ``TPESampler``).

``ask(n)`` returns up to ``n`` points (``{dimension name: value}``); ``tell(scores)`` gives the
objective (to maximise; NaN = failed) of the points of the last ask, in order. Given the seed and the
same scores, every optimizer asks the same points again: that is how a search resumes (the stored
history is replayed, see ``weightmerge.search.runner``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Protocol

from weightmerge.search.space import Dimension

Point = dict[str, Any]
FAILED_PENALTY = 1e12  # cma minimises -score; a failed candidate gets this


class Optimizer(Protocol):
    population: int

    def ask(self, n: int) -> list[Point]: ...

    def tell(self, scores: Sequence[float]) -> None: ...


def _point(dims: Sequence[Dimension], unit: Sequence[float]) -> Point:
    return {d.name: d.from_unit(u) for d, u in zip(dims, unit, strict=True)}


class GridSearch:
    def __init__(self, dims: Sequence[Dimension], *, population: int) -> None:
        self.population = population
        names = [d.name for d in dims]
        self._points = [
            dict(zip(names, combo, strict=True)) for combo in itertools.product(*(d.grid() for d in dims))
        ]
        self._next = 0

    @property
    def size(self) -> int:
        return len(self._points)

    def ask(self, n: int) -> list[Point]:
        out = self._points[self._next : self._next + n]
        self._next += len(out)
        return out

    def tell(self, scores: Sequence[float]) -> None:
        pass


class RandomSearch:
    def __init__(self, dims: Sequence[Dimension], *, population: int, seed: int) -> None:
        import numpy as np

        self.population = population
        self._dims = list(dims)
        self._rng = np.random.default_rng(seed)

    def ask(self, n: int) -> list[Point]:
        return [_point(self._dims, self._rng.random(len(self._dims)).tolist()) for _ in range(n)]

    def tell(self, scores: Sequence[float]) -> None:
        pass


class CMASearch:
    """CMA-ES (``cma.CMAEvolutionStrategy``) in the unit cube, started at the config's values."""

    def __init__(
        self, dims: Sequence[Dimension], *, x0: Point, sigma: float, population: int | None, seed: int
    ) -> None:
        import cma
        import numpy as np

        self._dims = list(dims)
        start = [d.to_unit(x0[d.name]) for d in dims]
        opts: dict[str, Any] = {"seed": seed + 1, "bounds": [0.0, 1.0], "verbose": -9}
        if population is not None:
            opts["popsize"] = population
        self._np_state = np.random.RandomState(seed + 1).get_state()
        with self._own_rng():
            self._es = cma.CMAEvolutionStrategy(start, sigma, opts)
        self.population = int(self._es.popsize)
        self._pending: list[Any] = []

    def _own_rng(self) -> Any:
        """cma draws from numpy's global generator: keep its state to this optimizer."""
        import contextlib

        import numpy as np

        @contextlib.contextmanager
        def scope() -> Any:
            outer = np.random.get_state()
            np.random.set_state(self._np_state)
            try:
                yield
            finally:
                self._np_state = np.random.get_state()
                np.random.set_state(outer)

        return scope()

    def ask(self, n: int) -> list[Point]:
        with self._own_rng():
            self._pending = list(self._es.ask())
        return [_point(self._dims, x) for x in self._pending[:n]]

    def tell(self, scores: Sequence[float]) -> None:
        if len(scores) < len(self._pending):
            return  # the budget ended mid-generation: nothing more will be asked
        values = [-s if math.isfinite(s) else FAILED_PENALTY for s in scores]
        with self._own_rng():
            self._es.tell(self._pending, values)
        self._pending = []


class TPESearch:
    """Optuna's TPE sampler through its ask/tell interface (maximising)."""

    def __init__(self, dims: Sequence[Dimension], *, population: int, seed: int) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.population = population
        self._dims = list(dims)
        self._study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        self._pending: list[Any] = []

    def _suggest(self, trial: Any, d: Dimension) -> Any:
        if d.values is not None:
            return trial.suggest_categorical(d.name, list(d.values))
        assert d.low is not None and d.high is not None
        if d.integer:
            return trial.suggest_int(d.name, math.ceil(d.low), math.floor(d.high), log=d.log)
        return trial.suggest_float(d.name, d.low, d.high, log=d.log)

    def ask(self, n: int) -> list[Point]:
        self._pending = [self._study.ask() for _ in range(n)]
        return [{d.name: self._suggest(t, d) for d in self._dims} for t in self._pending]

    def tell(self, scores: Sequence[float]) -> None:
        import optuna

        for trial, s in zip(self._pending, scores, strict=True):
            if math.isfinite(s):
                self._study.tell(trial, s)
            else:
                self._study.tell(trial, state=optuna.trial.TrialState.FAIL)
        self._pending = []


def make_optimizer(
    name: str, dims: Sequence[Dimension], *, x0: Point, population: int | None, seed: int, sigma: float
) -> Optimizer:
    pop = population or 8
    if name == "grid":
        return GridSearch(dims, population=pop)
    if name == "random":
        return RandomSearch(dims, population=pop, seed=seed)
    if name == "cma":
        return CMASearch(dims, x0=x0, sigma=sigma, population=population, seed=seed)
    if name == "tpe":
        return TPESearch(dims, population=pop, seed=seed)
    raise ValueError(f"unknown optimizer {name!r}; known: grid, random, cma, tpe")


def require(name: str) -> None:
    """A clear error when the optimizer's package is missing (the ``search`` extra)."""
    module = {"cma": "cma", "tpe": "optuna"}.get(name)
    if module is None:
        return
    try:
        __import__(module)
    except ImportError:
        raise ValueError(
            f"optimizer {name!r} needs the package {module!r}: pip install 'weightmerge[search]'"
        ) from None
