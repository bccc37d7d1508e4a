"""The ``<label> (search)`` row of ``weightmerge eval``: a method entry with a ``search:`` block.

    methods:
      - method: pcb
        params: {keep_ratio: 0.1, lambda: 1.0}          # the default row (and the search's start)
        search:                                          # the search block of docs/search.md, without
          space: [{param: lambda, per_model: true, low: 0.8, high: 1.3}]   # evaluator and output_dir
          optimizer: cma
          budget: 40

For each seed the entry's experts are searched on the validation split (objective
``normalized_avg`` unless given), in this process, and the chosen point is scored by the harness like
every other row (test, held-out); the row records the point and the search's evaluations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from weightmerge.search.config import SearchBlock

_NOT_HERE = ("evaluator", "output_dir", "workers")


def entry_block(search: Mapping[str, Any]) -> SearchBlock:
    """The entry's search block, validated (a ValueError naming the key)."""
    from pydantic import ValidationError

    bad = [k for k in _NOT_HERE if k in search]
    if bad:
        raise ValueError(f"{bad[0]}: not used in an eval config (the benchmark's experts are searched here)")
    data = {"objective": "normalized_avg", **search, "evaluator": {"benchmark": "(this eval config)"}}
    try:
        return SearchBlock.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{loc}: {first['msg'].removeprefix('Value error, ')}") from None


def check_entry(method: str, params: Mapping[str, Any], search: Mapping[str, Any], n_models: int) -> None:
    from weightmerge.search.problem import make_template

    block = entry_block(search)
    try:
        make_template(
            method=method,
            params=params,
            names=[f"model_{i}" for i in range(n_models)],
            space=block.space,
            optimizer=block.optimizer,
        )
    except ValueError as err:
        raise ValueError(str(err).removeprefix("search.")) from None


def search_row(ctx: Any, entry: Any, reference: Mapping[str, Any], *, log: Any) -> dict[str, Any]:
    """Search the entry on validation with the seed's experts; the harness's row of the chosen point."""
    from weightmerge.eval import runner
    from weightmerge.search.evaluators import BenchmarkData, BenchmarkFactory
    from weightmerge.search.history import History
    from weightmerge.search.optimizers import GridSearch, make_optimizer, require
    from weightmerge.search.problem import Inputs, make_template
    from weightmerge.search.runner import choose, optimise

    block = entry_block(entry.search)
    require(block.optimizer)
    tasks = list(ctx.held_in)
    template = make_template(
        method=entry.method,
        params=entry.params,
        names=tasks,
        space=block.space,
        optimizer=block.optimizer,
        seed=ctx.seed,
        compute_dtype=entry.dtype,
    )
    data = BenchmarkData(
        family=ctx.encoder,
        tasks=tuple(tasks),
        validation={t: ctx.data[t].validation for t in tasks},
        test={},  # the search never scores test data; the harness scores the chosen point below
        heads={t: ctx.experts[t].head for t in tasks},
        expert_val={t: ctx.experts[t].val_accuracy for t in tasks},
    )
    inputs = Inputs(base=ctx.encoder.base_state, models=[ctx.experts[t].body for t in tasks])
    opt = make_optimizer(
        block.optimizer,
        template.dims,
        x0=template.default_point(),
        population=block.population,
        seed=block.seed,
        sigma=block.sigma,
    )
    budget = min(block.budget, opt.size) if isinstance(opt, GridSearch) else block.budget
    history = History(None, {"dimensions": [d.name for d in template.dims], "optimizer": block.optimizer})
    _, _, seconds = optimise(
        template,
        inputs,
        BenchmarkFactory(data),
        block,
        history,
        opt=opt,
        budget=budget,
        workers=1,
        ray_address=None,
        progress=False,
        log=lambda _m: None,
    )
    best = choose(history)
    params = template.params(best["point"])
    merged, merge_s = runner.merge(ctx, entry.method, params, tasks=tasks, dtype=entry.dtype)
    scores = runner.score_merged(ctx, merged, tasks=tasks, held_out=ctx.held_out, validation=True)
    row = runner.summarise(ctx, scores, reference)
    row.update(method=entry.method, params=params, merge_seconds=merge_s)
    row["search"] = {
        "point": best["point"],
        "index": best["index"],
        "objective": block.objective,
        "validation_objective": best["objective"],
        "optimizer": block.optimizer,
        "evaluations": len(history.candidates),
        "seconds": seconds,
    }
    point = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["point"].items()
    )
    log(f"seed {ctx.seed}: {entry.name} (search): {point}: normalised held-in {row['normalized_avg']:.3f}")
    return row
