"""``weightmerge demo``: the built-in 4-task benchmark (a few minutes on 2 CPU cores); prints the
table and writes the report. ``--full`` runs the 8-task, 3-seed benchmark of docs/results.md.

Before torch loads, the demo chooses how to run for the machine it finds: OpenMP threads that
sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``; spinning threads make fine-tuning several
times slower on a busy machine) and as many torch threads as there are idle cores (at least 1, at
most the config's). Either choice is the user's when set (the variable, ``--threads``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from weightmerge.cli.eval import add_common, override, run_and_report


def choose_threads(requested: int, *, load: float, cores: int) -> int:
    """Torch threads for a CPU job on ``cores`` cores with load average ``load``: the idle cores,
    at least 1 and at most ``requested``."""
    idle = int(cores - load + 0.5)
    return max(1, min(requested, idle))


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _say(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    from weightmerge._deferred import loaded
    from weightmerge.eval.cache import default_cache_dir
    from weightmerge.eval.config import builtin_config

    cfg = override(builtin_config("benchmark" if args.full else "demo"), args)
    quiet = args.quiet
    if "OMP_WAIT_POLICY" not in os.environ and not loaded("torch"):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read once, when torch's OpenMP runtime starts
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    if not args.threads:
        threads = choose_threads(cfg.threads, load=load, cores=cores)
        if threads != cfg.threads:
            args.threads = threads
            cfg = override(cfg, args)
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    if not quiet:
        _say(
            f"{cores} cores, load {load:.1f}: {cfg.threads} torch thread{'s' if cfg.threads != 1 else ''}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} (--threads and the "
            "variable choose otherwise)"
        )
        size = _tree_bytes(cache) if cache.is_dir() else 0
        _say(
            f"outputs go to {Path(cfg.output_dir).resolve()}/; experts and statistics are cached in "
            f"{cache} ({size / 1e6:.0f} MB now, about 350 MB after a first demo; delete it to free the "
            "space)"
        )
    return run_and_report(cfg, args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in merge benchmark (4 tasks) and print the table",
        description=(
            "Fine-tune 4 experts of all-MiniLM-L6-v2 on built-in tasks (cached), merge them with "
            "Task Arithmetic, TIES, PCB, EMR, ... and print their scores. Needs the eval extra and the "
            "Debian data packages (scripts/setup.sh installs both). Writes ./weightmerge-demo/ and "
            "caches under ~/.cache/weightmerge (or $WEIGHTMERGE_CACHE)."
        ),
    )
    p.add_argument("--full", action="store_true", help="the 8-task, 3-seed benchmark (about an hour)")
    add_common(p)
    p.set_defaults(func=_run)
