"""``weightmerge search CONFIG``: search merge coefficients on validation data, score the chosen
point on test once, write history.jsonl, history.json, best.yaml and plots (see docs/search.md)."""

from __future__ import annotations

import argparse
import json
import sys


def _run(args: argparse.Namespace) -> int:
    from weightmerge.cli import UserError
    from weightmerge.search.loader import load_search_config
    from weightmerge.search.runner import run_search

    cfg = load_search_config(args.config)
    if args.budget is not None and args.budget < 1:
        raise UserError(f"--budget must be at least 1, got {args.budget}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.budget is not None or args.seed is not None:
        upd = {k: v for k, v in (("budget", args.budget), ("seed", args.seed)) if v is not None}
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update=upd)})
    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    summary = run_search(
        cfg,
        output_dir=args.output_dir,
        resume=args.resume,
        force=args.force,
        workers=args.workers,
        ray_address=args.ray,
        progress=args.progress or (not args.no_progress and sys.stderr.isatty()),
        log=log,
    )
    best = summary["best"]
    obj = summary["objective"]
    print(
        json.dumps(
            {
                "best": best["point"],
                f"validation {obj}": best["validation"].get(obj),
                f"test {obj}": best["test"].get(obj),
                f"default test {obj}": summary["default"]["test"].get(obj),
                "evaluations": summary["evaluations"],
            },
            indent=2,
        )
    )
    for kind, p in summary.get("outputs", {}).items():
        print(f"{kind}: {p}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="search merge coefficients on validation data (grid, random, CMA-ES, TPE), test once",
        description=(
            "Search the parameters named in the config's search: block (docs/search.md): candidates are "
            "merged in memory and scored on validation; the best is scored on test once at the end."
        ),
    )
    p.add_argument("config", help="a merge config with a search: block")
    p.add_argument("--output-dir", help="where history.jsonl, history.json, best.yaml and plots go")
    p.add_argument("--resume", action="store_true", help="continue the search stored in the output directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing history")
    p.add_argument("--workers", type=int, help="parallel worker processes (or Ray actors)")
    p.add_argument("--ray", metavar="ADDRESS", help="evaluate on a Ray cluster (ADDRESS, or 'local')")
    p.add_argument("--budget", type=int, help="evaluations, overriding the config's")
    p.add_argument("--seed", type=int, help="optimizer seed, overriding the config's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--progress", action="store_true", help="a progress bar even when stderr is not a terminal"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no log lines on stderr")
    p.set_defaults(func=_run)
