"""The ``weightmerge`` command line: a thin layer over the library, testable in-process via main(argv)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from weightmerge.version import __version__

# One module per subcommand; each defines register(subparsers) and sets args.func(args) -> int.
SUBCOMMANDS = ("methods", "merge", "plan", "inspect", "validate", "eval", "demo", "emr", "search")


class UserError(Exception):
    """An error the user can fix: printed as one line, no traceback (unless -v)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightmerge",
        description="Merge fine-tuned checkpoints of one base model into one model, without training.",
    )
    parser.add_argument("--version", action="version", version=f"weightmerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"weightmerge.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"weightmerge.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("weightmerge: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        if args.verbose:
            raise
        print(f"weightmerge: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
