"""``weightmerge eval CONFIG``: fine-tune experts, merge them with every configured method, score,
and write report.json, report.md and PNG plots (see docs/evaluation.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from weightmerge.cli import UserError


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds:
        raise UserError("--seeds is empty")
    return seeds


def resolve_config(config: str) -> Any:
    """A config file, or the name of a built-in config (demo, benchmark)."""
    from weightmerge.eval.config import builtin_config, load_config

    if Path(config).is_file() or config.endswith((".yaml", ".yml")):
        return load_config(config)
    return builtin_config(config)


def override(cfg: Any, args: argparse.Namespace) -> Any:
    updates: dict[str, Any] = {}
    if getattr(args, "output_dir", None):
        updates["output_dir"] = str(Path(args.output_dir).resolve())
    if getattr(args, "cache_dir", None):
        updates["cache_dir"] = str(Path(args.cache_dir).expanduser().resolve())
    if getattr(args, "seeds", None):
        updates["seeds"] = parse_seeds(args.seeds)
    if getattr(args, "threads", None):
        updates["threads"] = int(args.threads)
    if getattr(args, "device", None):
        updates["device"] = str(args.device)
    if not updates:
        return cfg
    from weightmerge.eval.config import parse_config

    return parse_config({**cfg.model_dump(mode="json", exclude_defaults=False), **updates})


def run_and_report(cfg: Any, args: argparse.Namespace) -> int:
    from weightmerge.eval.report import console_table, write_outputs
    from weightmerge.eval.runner import run_eval

    progress = not args.no_progress and sys.stderr.isatty()
    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    from weightmerge.eval.tasks import TaskDataUnavailable

    try:
        report = run_eval(cfg, progress=progress or args.progress, log=log, command=list(sys.argv))
    except TaskDataUnavailable as err:  # packaged data not installed: say how to install it
        raise UserError(str(err)) from None
    paths = write_outputs(report, Path(cfg.output_dir))
    print(console_table(report))
    for kind, p in paths.items():
        print(f"{kind}: {p}", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    cfg = override(resolve_config(args.config), args)
    return run_and_report(cfg, args)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", help="where report.json, report.md and the plots go")
    p.add_argument(
        "--cache-dir",
        help="cache of experts and statistics (default ~/.cache/weightmerge or $WEIGHTMERGE_CACHE)",
    )
    p.add_argument("--seeds", help="comma-separated seeds, overriding the config's")
    p.add_argument("--threads", type=int, help="torch threads (default: the config's, 2)")
    p.add_argument(
        "--device", help="fine-tune on this device (cpu, cuda, cuda:N; default: the config's, cpu)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")
    p.add_argument("-q", "--quiet", action="store_true", help="no log lines on stderr")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="benchmark merge methods: fine-tune experts, merge, score held-in/held-out tasks",
        description=(
            "Fine-tune one expert per task from a shared encoder, merge the experts' bodies with each "
            "configured method, score every task with its own head, and write report.json, report.md "
            "and PNG plots. CONFIG is a YAML file or a built-in config name (demo, benchmark)."
        ),
    )
    p.add_argument("config", help="eval config YAML (see docs/evaluation.md) or a built-in name")
    add_common(p)
    p.set_defaults(func=_run)
