"""The search loop: ask a generation, evaluate it (in parallel), tell, save, repeat; then test once.

1. The config's own point (``kind: default``) is scored on validation first: the chosen point is the
   best of it and every candidate, so a search never picks something worse on validation.
2. Generation by generation the optimizer asks up to ``population`` points (fewer in the last one,
   to stay within ``budget``); each is merged in memory and scored on *validation*; every result is
   written to ``history.jsonl`` as it arrives.
3. The best point on validation (first in evaluation order on ties) is scored on *test*, once, and
   the default point too (a reference, not a choice): nothing before this step asks for test data.

Resuming (``resume=True``) replays the stored history through a fresh optimizer: the same seed and
the same scores make it ask the same points, so a killed search continues where it stopped and ends
with the result an uninterrupted run gives (a stored point that does not match is an error).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weightmerge.search.config import (
    BenchmarkEvaluatorDoc,
    LmEvalEvaluatorDoc,
    PythonEvaluatorDoc,
    SearchBlock,
    SearchConfig,
)
from weightmerge.search.history import History
from weightmerge.search.problem import Inputs, Template, build_template, env_threads, merge_candidate
from weightmerge.search.space import point_key

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt_duration(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s // 60:.0f}m{s % 60:02.0f}s"
    return f"{s // 3600:.0f}h{(s % 3600) // 60:02.0f}m"


def _objective(scores: dict[str, float], name: str, *, who: str) -> float:
    if name not in scores:
        raise ValueError(f"objective {name!r} is not among the scores of {who}: {sorted(scores)}")
    v = float(scores[name])
    return v if math.isfinite(v) else math.nan


def prepare(cfg: SearchConfig, *, progress: bool, log: Log) -> tuple[Template, Inputs, Any, Any]:
    """(template, inputs, worker evaluator factory, final evaluator: builds the test-capable one)."""
    template = build_template(cfg)
    doc = cfg.search.evaluator
    if isinstance(doc, BenchmarkEvaluatorDoc):
        from weightmerge.search.evaluators import BenchmarkEvaluator, BenchmarkFactory, prepare_benchmark
        from weightmerge.search.problem import _benchmark_eval_config

        ecfg = _benchmark_eval_config(doc, cfg.base_dir)
        data, base, bodies = prepare_benchmark(
            ecfg,
            seed=doc.seed,
            tasks=template.model_names,
            cache_dir=doc.cache_dir,
            progress=progress,
            log=log,
        )
        inputs = Inputs(base=base, models=list(bodies))
        return (
            template,
            inputs,
            BenchmarkFactory(data),
            lambda: BenchmarkEvaluator(data, expert_bodies=bodies),
        )
    from weightmerge.search.problem import load_file_inputs

    inputs = load_file_inputs(cfg)
    if isinstance(doc, PythonEvaluatorDoc):
        from weightmerge.search.evaluators import CallableEvaluator

        factory: Any = CallableEvaluator(doc.python, dict(doc.options))
        factory.build()  # import errors now, before any work
        return template, inputs, factory, factory.build
    assert isinstance(doc, LmEvalEvaluatorDoc)
    from weightmerge.search.lm_eval import LmEvalFactory

    model_dir = doc.model_dir or _base_dir_of(cfg)
    lm = LmEvalFactory(
        model_dir=str(Path(cfg.base_dir, model_dir)) if not Path(model_dir).is_absolute() else model_dir,
        tasks=tuple(doc.lm_eval),
        test_tasks=tuple(doc.test_tasks),
        include_path=None if doc.include_path is None else str(Path(cfg.base_dir, doc.include_path)),
        include_defaults=doc.include_defaults,
        limit=doc.limit,
        batch_size=doc.batch_size,
    )
    return template, inputs, lm, lm.build


def _base_dir_of(cfg: SearchConfig) -> str:
    from weightmerge.config import load_config

    mcfg = load_config(cfg.merge, base_dir=cfg.base_dir)
    assert mcfg.base_model is not None
    return mcfg.base_model.path


def run_search(
    cfg: SearchConfig,
    *,
    output_dir: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    workers: int | None = None,
    ray_address: str | None = None,
    progress: bool = False,
    log: Log = _stderr,
    stop_after: int | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Run (or resume) a search; returns the summary that ``history.json`` holds.

    ``stop_after`` stops after that many new evaluations without the final test (it simulates a
    killed search; the history is complete up to there)."""
    from weightmerge.search.optimizers import GridSearch, make_optimizer, require

    block = cfg.search
    require(block.optimizer)
    out = Path(output_dir or block.output_dir)
    hist_path = out / "history.jsonl"
    if hist_path.exists() and not resume and not force:
        raise FileExistsError(f"{hist_path} exists: resume it with --resume, or overwrite with --force")
    t_start = time.perf_counter()
    template, inputs, factory, final_evaluator = prepare(cfg, progress=progress, log=log)
    dims = [d.name for d in template.dims]
    header = {"config_hash": cfg.hash(), "dimensions": dims, "optimizer": block.optimizer}
    history = (
        History.resume(hist_path, header) if resume and hist_path.exists() else History(hist_path, header)
    )
    if not resume or not hist_path.exists():
        history.save()
    x0 = template.default_point()
    opt = make_optimizer(
        block.optimizer, template.dims, x0=x0, population=block.population, seed=block.seed, sigma=block.sigma
    )
    budget = block.budget
    if isinstance(opt, GridSearch):
        budget = min(budget, opt.size)
    n_workers = workers or block.workers
    log(
        f"search: {template.method}, {len(dims)} dimension(s) {dims}, {block.optimizer}, budget {budget}, "
        f"population {opt.population}, {n_workers} worker(s)"
        f"{' on Ray ' + ray_address if ray_address else ''}; "
        f"inputs {inputs.nbytes() / 2**20:.1f} MiB"
    )
    stopped, new_evals, loop_seconds = optimise(
        template,
        inputs,
        factory,
        block,
        history,
        opt=opt,
        budget=budget,
        workers=n_workers,
        ray_address=ray_address,
        progress=progress,
        log=log,
        stop_after=stop_after,
    )
    if stopped:
        return {"stopped": True, "evaluations": len(history.candidates)}
    summary = finish(
        cfg,
        template,
        inputs,
        history,
        final_evaluator,
        budget=budget,
        loop_seconds=loop_seconds,
        new_evals=new_evals,
        workers=n_workers,
        ray_address=ray_address,
        log=log,
    )
    summary["seconds"]["total"] = time.perf_counter() - t_start
    if write:
        from weightmerge.search.outputs import write_outputs

        paths = write_outputs(cfg, template, summary, out)
        summary["outputs"] = {k: str(v) for k, v in paths.items()}
    return summary


def optimise(
    template: Template,
    inputs: Inputs,
    factory: Any,
    block: SearchBlock,
    history: History,
    *,
    opt: Any,
    budget: int,
    workers: int,
    ray_address: str | None,
    progress: bool,
    log: Log,
    stop_after: int | None = None,
) -> tuple[bool, int, float]:
    """The default point, then generations until ``budget``: (stopped early, new evaluations, seconds).

    Candidates already in ``history`` are not evaluated again (their stored scores are told)."""
    from tqdm.auto import tqdm

    from weightmerge.search.executors import make_executor

    x0 = template.default_point()
    where = history.path or "the history"
    t_start = time.perf_counter()
    executor = make_executor(
        template, inputs, factory, threads=block.threads, workers=workers, ray_address=ray_address
    )
    history.startup_seconds = time.perf_counter() - t_start
    new_evals = 0
    t_loop = time.perf_counter()
    bar = tqdm(total=budget, desc="search", unit="eval", disable=not progress)
    best: list[float] = [math.nan]

    def record(kind: str, index: int, generation: int, point: dict[str, Any], r: dict[str, Any]) -> None:
        nonlocal new_evals
        obj = _objective(r["scores"], block.objective, who=f"candidate {index}")
        rec = {"kind": kind, "index": index, "generation": generation, "point": point, "objective": obj, **r}
        history.add(rec)
        new_evals += 1
        if math.isfinite(obj) and not obj <= best[0]:
            best[0] = obj
        bar.update(1 if kind == "candidate" else 0)
        bar.set_postfix_str(f"best {best[0]:.4f}")

    try:
        # the config's own point
        if history.default is None:
            default = {**x0}
            items = [(-1, default)]
            executor.run(items, lambda i, r: record("default", -1, -1, default, r))
        best[0] = history.default["objective"] if history.default else math.nan
        for rec in history.records():
            if math.isfinite(rec["objective"]) and not rec["objective"] <= best[0]:
                best[0] = rec["objective"]
        n, gen = 0, 0
        bar.update(len(history.candidates))
        while n < budget:
            if stop_after is not None and new_evals >= stop_after:
                log(f"search: stopped after {new_evals} new evaluations (stop_after)")
                return True, new_evals, time.perf_counter() - t_loop
            points = opt.ask(min(opt.population, budget - n))
            if not points:
                break
            todo = []
            for i, p in enumerate(points):
                stored = history.candidates.get(n + i)
                if stored is None:
                    todo.append((n + i, p))
                elif point_key(stored["point"]) != point_key(p):
                    raise ValueError(
                        f"{where}: candidate {n + i} in the history is {stored['point']}, but the "
                        f"optimizer asks {p} now: the history does not belong to this search; "
                        "start afresh with --force"
                    )
            if stop_after is not None:
                todo = todo[: max(0, stop_after - new_evals)]
            g = gen
            pts = dict(todo)
            executor.run(todo, lambda i, r, g=g, pts=pts: record("candidate", i, g, pts[i], r))
            if stop_after is not None and any(n + i not in history.candidates for i in range(len(points))):
                log(f"search: stopped after {new_evals} new evaluations (stop_after)")
                return True, new_evals, time.perf_counter() - t_loop
            opt.tell([history.candidates[n + i]["objective"] for i in range(len(points))])
            history.save()  # fsynced once per generation
            n += len(points)
            gen += 1
            elapsed = time.perf_counter() - t_loop
            left = budget - n
            fresh = max(1, new_evals)
            eta = elapsed / fresh * left
            log(
                f"search: generation {gen}: {n}/{budget} evaluations, best {best[0]:.4f}, "
                f"ETA {_fmt_duration(eta)}"
            )
    finally:
        bar.close()
        executor.close()
    return False, new_evals, time.perf_counter() - t_loop


def choose(history: History) -> dict[str, Any]:
    """The best record on validation: the default point, then candidates in order; first on ties."""
    best: dict[str, Any] | None = None
    for rec in [*([history.default] if history.default else []), *history.records()]:
        v = rec["objective"]
        if math.isfinite(v) and (best is None or v > best["objective"]):
            best = rec
    if best is None:
        raise ValueError("no candidate was scored (every objective is NaN)")
    return best


def finish(
    cfg: SearchConfig,
    template: Template,
    inputs: Inputs,
    history: History,
    final_evaluator: Callable[[], Any],
    *,
    budget: int,
    loop_seconds: float,
    new_evals: int,
    workers: int,
    ray_address: str | None,
    log: Log,
) -> dict[str, Any]:
    """Score the chosen point (and the default point) on test, once; the summary."""
    env_threads(cfg.search.threads)
    best = choose(history)
    ev = final_evaluator()
    t0 = time.perf_counter()
    best_test = ev.evaluate(merge_candidate(template, inputs, best["point"]), split="test")
    default = history.default
    assert default is not None
    if point_key(default["point"]) == point_key(best["point"]):
        default_test = best_test
    else:
        default_test = ev.evaluate(merge_candidate(template, inputs, default["point"]), split="test")
    test_seconds = time.perf_counter() - t0
    obj = cfg.search.objective
    log(
        f"search: best {best['point']} (candidate {best['index']}): "
        f"validation {obj} {best['objective']:.4f}, "
        f"test {best_test.get(obj, math.nan):.4f}; default: validation {default['objective']:.4f}, "
        f"test {default_test.get(obj, math.nan):.4f}"
    )
    recs = history.records()
    merge_s = sum(r["merge_seconds"] for r in recs)
    eval_s = sum(r["evaluate_seconds"] for r in recs)
    return {
        "method": template.method,
        "objective": obj,
        "optimizer": cfg.search.optimizer,
        "seed": cfg.search.seed,
        "budget": budget,
        "dimensions": [d.name for d in template.dims],
        "best": {
            "index": best["index"],
            "point": best["point"],
            "validation": best["scores"],
            "test": best_test,
            "params": template.params(best["point"]),
        },
        "default": {"point": default["point"], "validation": default["scores"], "test": default_test},
        "evaluations": len(recs),
        "history": recs,
        "config_hash": cfg.hash(),
        "workers": workers,
        "ray": ray_address,
        "seconds": {
            "startup": history.startup_seconds,
            "loop": loop_seconds,
            "new_evaluations": new_evals,
            "merge": merge_s,
            "evaluate": eval_s,
            "test": test_seconds,
        },
    }
