"""Coefficient search (docs/search.md) on the built-in benchmark: speed and what it buys.

Two parts, each checking before it reports:

* ``scaling`` -- the same search (PCB, one lambda per task, CMA-ES) with 1, 2 and 4 local worker
  processes and on a local Ray instance: first every run must give the 1-worker run's candidates,
  scores and chosen point (else it stops), then evaluations per second, the per-candidate overhead
  beyond merge + evaluate (1 worker: 1 - sum(merge + evaluate) / wall of the evaluation loop), and
  the load averages before and after each run.
* ``pcb`` -- per seed: PCB at its default (keep_ratio 0.1, lambda 1), the benchmark's PCB grid chosen
  on validation (keep_ratio 0.05/0.1/0.2 x lambda 1.0/1.3), and a per-task lambda search (CMA-ES
  in [0.8, 1.3], the PCB paper's bounds) chosen on validation; every chosen point scored on test.

    .venv/bin/python benchmarks/bench_search.py pcb --benchmark demo --seeds 0,1,2 --budget 24
    .venv/bin/python benchmarks/bench_search.py scaling --benchmark demo --budget 8 --workers 1,2,4 --ray

Results: JSON under ``--out`` (default benchmarks/results/search-<part>.json) and a Markdown table on
stdout for docs/benchmarks.md / docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _search_doc(args: argparse.Namespace, seed: int, **search: Any) -> dict[str, Any]:
    block: dict[str, Any] = {
        "evaluator": {"benchmark": args.benchmark, "seed": seed},
        "objective": "normalized_avg",
        "optimizer": "cma",
        "budget": args.budget,
        "population": args.population,
        "seed": 0,
        "sigma": 0.3,
        "space": [{"param": "lambda", "per_model": True, "low": 0.8, "high": 1.3}],
    }
    if args.cache_dir:
        block["evaluator"]["cache_dir"] = args.cache_dir
    block.update(search)
    return {"merge_method": "pcb", "parameters": {"keep_ratio": 0.1, "lambda": 1.0}, "search": block}


def synthetic_score(state: dict[str, Any], *, split: str, targets: str) -> dict[str, float]:
    """Evaluator of the synthetic problem: minus the squared distance to a stored target."""
    from safetensors.torch import load_file

    t = load_file(targets)
    err = sum(float(((state[k] - t[f"{split}.{k}"]) ** 2).sum()) for k in state)
    return {"neg_sq_error": -err}


def _synthetic_doc(args: argparse.Namespace) -> dict[str, Any]:
    """Base + 4 experts of ``--synthetic`` parameters each (8 layers of 4 square matrices), written
    once under the scratch folder; the target is the base plus 0.9, 1.1, 1.2, 0.8 times the task
    vectors (validation) and that + 0.01 (test)."""
    import torch
    from safetensors.torch import save_file

    root = args.scratch / f"synthetic-{args.synthetic}"
    side = max(8, int((args.synthetic / 32) ** 0.5))
    names = [f"model.layers.{i}.w{j}.weight" for i in range(8) for j in range(4)]
    if not (root / "targets.safetensors").exists():
        g = torch.Generator().manual_seed(0)
        base = {n: torch.randn(side, side, generator=g) for n in names}
        tvs = [{n: 0.01 * torch.randn(side, side, generator=g) for n in names} for _ in range(4)]
        for i, name in enumerate(["base", "e0", "e1", "e2", "e3"]):
            sd = base if i == 0 else {n: base[n] + tvs[i - 1][n] for n in names}
            (root / name).mkdir(parents=True, exist_ok=True)
            save_file(sd, str(root / name / "model.safetensors"))
        val = {
            n: base[n] + sum(w * tv[n] for w, tv in zip((0.9, 1.1, 1.2, 0.8), tvs, strict=True))
            for n in names
        }
        save_file(
            {
                **{f"validation.{n}": v for n, v in val.items()},
                **{f"test.{n}": v + 0.01 for n, v in val.items()},
            },
            str(root / "targets.safetensors"),
        )
    return {
        "merge_method": "pcb",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / f"e{i}")} for i in range(4)],
        "parameters": {"keep_ratio": 0.1, "lambda": 1.0},
        "search": {
            "evaluator": {
                "python": "bench_search:synthetic_score",
                "options": {"targets": str(root / "targets.safetensors")},
            },
            "objective": "neg_sq_error",
            "optimizer": "cma",
            "budget": args.budget,
            "population": args.population,
            "sigma": 0.3,
            "space": [{"param": "lambda", "per_model": True, "low": 0.8, "high": 1.3}],
        },
    }


def _run(doc: dict[str, Any], out: Path, **kw: Any) -> dict[str, Any]:
    from weightmerge.search import parse_search_config
    from weightmerge.search.runner import run_search

    cfg = parse_search_config(doc, base_dir=os.getcwd())
    return run_search(
        cfg, output_dir=out, force=True, log=lambda m: print(m, file=sys.stderr, flush=True), **kw
    )


def _trace(s: dict[str, Any]) -> list[tuple[str, float]]:
    return [(json.dumps(r["point"], sort_keys=True), r["objective"]) for r in s["history"]]


def scaling(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    settings = [(w, None) for w in args.workers] + ([(max(args.workers), "local")] if args.ray else [])
    if args.synthetic:
        doc = _synthetic_doc(args)
    else:
        _run(_search_doc(args, args.seed, budget=1, population=1), args.scratch / "warm")  # experts cached
        doc = _search_doc(args, args.seed)
    reference: dict[str, Any] | None = None
    for workers, ray in settings:
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        s = _run(doc, args.scratch / f"w{workers}-{ray}", workers=workers, ray_address=ray)
        wall = time.perf_counter() - t0
        if reference is None:
            reference = s
        elif _trace(s) != _trace(reference) or s["best"] != reference["best"]:
            raise SystemExit(f"check failed: {workers} workers (ray={ray}) differ from the 1-worker run")
        sec = s["seconds"]
        n = len(s["history"]) + 1  # + the default point
        work = sec["merge"] + sec["evaluate"]
        runs.append(
            {
                "workers": workers,
                "ray": ray,
                "evaluations": n,
                "startup_seconds": sec["startup"],
                "loop_seconds": sec["loop"],
                "evals_per_second": n / sec["loop"],
                "merge_seconds": sec["merge"],
                "evaluate_seconds": sec["evaluate"],
                "overhead": 1 - work / (sec["loop"] * workers),
                "wall_seconds": wall,
                "load_before": load_before,
                "load_after": os.getloadavg(),
            }
        )
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    return {
        "part": "scaling",
        "benchmark": f"synthetic {args.synthetic}" if args.synthetic else args.benchmark,
        "budget": args.budget,
        "population": args.population,
        "cpu_count": os.cpu_count(),
        "runs": runs,
        "same_result": True,
    }


def pcb(args: argparse.Namespace) -> dict[str, Any]:
    per_seed = []
    for seed in args.seeds:
        grid = _run(
            _search_doc(
                args,
                seed,
                optimizer="grid",
                budget=100,
                space=[
                    {"param": "keep_ratio", "values": [0.05, 0.1, 0.2]},
                    {"param": "lambda", "values": [1.0, 1.3]},
                ],
            ),
            args.scratch / f"grid-{seed}",
            workers=args.search_workers,
        )
        search = _run(_search_doc(args, seed), args.scratch / f"search-{seed}", workers=args.search_workers)
        row = {
            "seed": seed,
            "default": search["default"]["test"]["normalized_avg"],
            "default_validation": search["default"]["validation"]["normalized_avg"],
            "grid": grid["best"]["test"]["normalized_avg"],
            "grid_point": grid["best"]["point"],
            "grid_validation": grid["best"]["validation"]["normalized_avg"],
            "search": search["best"]["test"]["normalized_avg"],
            "search_point": search["best"]["point"],
            "search_validation": search["best"]["validation"]["normalized_avg"],
            "search_evaluations": search["evaluations"],
            "search_seconds": search["seconds"]["total"],
        }
        per_seed.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    def agg(key: str) -> dict[str, float]:
        vals = [r[key] for r in per_seed]
        return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}

    return {
        "part": "pcb",
        "benchmark": args.benchmark,
        "budget": args.budget,
        "population": args.population,
        "per_seed": per_seed,
        "summary": {k: agg(k) for k in ("default", "grid", "search")},
        "search_minus_default_points": 100 * (agg("search")["mean"] - agg("default")["mean"]),
    }


def markdown(result: dict[str, Any]) -> str:
    if result["part"] == "scaling":
        lines = [
            "| workers | evaluations | start-up s | loop s | eval/s | merge s | evaluate s | overhead "
            "| load before -> after |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["runs"]:
            who = f"{r['workers']} (Ray local)" if r["ray"] else str(r["workers"])
            lines.append(
                f"| {who} | {r['evaluations']} | {r['startup_seconds']:.1f} | {r['loop_seconds']:.1f} | "
                f"{r['evals_per_second']:.3f} | "
                f"{r['merge_seconds']:.1f} | {r['evaluate_seconds']:.1f} | {100 * r['overhead']:.1f} % | "
                f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f} |"
            )
        return "\n".join(lines)
    lines = [
        "| seed | default (test) | grid (test) | grid point | search (test) | search validation "
        "| default validation |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["per_seed"]:
        lines.append(
            f"| {r['seed']} | {r['default']:.4f} | {r['grid']:.4f} | {r['grid_point']} | {r['search']:.4f} | "
            f"{r['search_validation']:.4f} | {r['default_validation']:.4f} |"
        )
    s = result["summary"]
    lines.append(
        f"| mean ± std | {s['default']['mean']:.4f} ± {s['default']['std']:.4f} | {s['grid']['mean']:.4f} ± "
        f"{s['grid']['std']:.4f} | | {s['search']['mean']:.4f} ± {s['search']['std']:.4f} | | |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["scaling", "pcb"])
    ap.add_argument("--benchmark", default="demo", help="built-in eval config or an eval YAML (its experts)")
    ap.add_argument(
        "--synthetic", type=int, help="scaling: random checkpoints of this many parameters instead"
    )
    ap.add_argument("--train-size", type=int, help="override the config's training examples per task")
    ap.add_argument("--val-size", type=int, help="with --train-size: validation examples per task")
    ap.add_argument("--cache-dir", help="expert cache (default: the eval harness's)")
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--population", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0, help="scaling: the benchmark seed")
    ap.add_argument("--seeds", default="0,1,2", help="pcb: benchmark seeds")
    ap.add_argument("--workers", default="1,2,4", help="scaling: local worker counts")
    ap.add_argument("--search-workers", type=int, default=1, help="pcb: workers of each search")
    ap.add_argument("--ray", action="store_true", help="scaling: also a local Ray instance")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/weightmerge-bench-search"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.train_size:  # the built-in config with fewer training examples per task (cheaper experts)
        import yaml

        from weightmerge.eval.config import builtin_config

        doc = builtin_config(args.benchmark).model_dump(mode="json")
        doc["sizes"]["train"] = args.train_size
        if args.val_size:
            doc["sizes"]["validation"] = args.val_size
        args.scratch.mkdir(parents=True, exist_ok=True)
        path = args.scratch / f"{args.benchmark}-train{args.train_size}-val{args.val_size}.yaml"
        path.write_text(yaml.safe_dump(doc))
        args.benchmark = str(path)
    result = scaling(args) if args.part == "scaling" else pcb(args)
    result["command"] = [sys.executable, *sys.argv]
    result["loadavg_end"] = os.getloadavg()
    out = args.out or Path(__file__).parent / "results" / f"search-{args.part}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
