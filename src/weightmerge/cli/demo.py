"""``weightmerge demo``: the built-in 4-task benchmark (a few minutes on 2 CPU cores); prints the
table and writes the report. ``--full`` runs the 8-task, 3-seed benchmark of docs/results.md."""

from __future__ import annotations

import argparse

from weightmerge.cli.eval import add_common, override, run_and_report


def _run(args: argparse.Namespace) -> int:
    from weightmerge.eval.config import builtin_config

    cfg = builtin_config("benchmark" if args.full else "demo")
    return run_and_report(override(cfg, args), args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in merge benchmark (4 tasks) and print the table",
        description=(
            "Fine-tune 4 experts of all-MiniLM-L6-v2 on built-in tasks (cached), merge them with "
            "Task Arithmetic, TIES, PCB, EMR, ... and print their scores. Needs the eval extra and the "
            "Debian data packages (scripts/setup.sh installs both)."
        ),
    )
    p.add_argument("--full", action="store_true", help="the 8-task, 3-seed benchmark (about an hour)")
    add_common(p)
    p.set_defaults(func=_run)
