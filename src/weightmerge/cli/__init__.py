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
    from weightmerge._deferred import defer

    defer()  # torch, numba, transformers: imported where tensor data is first touched, not before
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = _terminate_on_signals()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("weightmerge: interrupted", file=sys.stderr)
        return 130
    except Terminated as err:
        print(f"weightmerge: terminated by {err.name}; scratch files removed", file=sys.stderr)
        return 128 + err.signum
    except (UserError, ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        if args.verbose:
            raise
        print(f"weightmerge: error: {err}", file=sys.stderr)
        return 1
    except (OSError, RecursionError, MemoryError) as err:  # disk full, read-only, too many files, ...
        if args.verbose:
            raise
        print(f"weightmerge: error: {_os_error(err)}", file=sys.stderr)
        return 1
    finally:
        _restore_signals(previous)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so scratch directories are removed."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)


def _terminate_on_signals() -> dict[int, object]:
    """In the main thread: SIGTERM and SIGHUP raise ``Terminated`` (the default would kill the
    process on the spot and leave a full-size scratch directory behind)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    previous: dict[int, object] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_signals(previous: dict[int, object]) -> None:
    import signal

    for sig, h in previous.items():
        signal.signal(sig, h)  # type: ignore[arg-type]


def _os_error(err: BaseException) -> str:
    """One line for an environment error: the system's words, the file, and a hint where one helps."""
    import errno

    if isinstance(err, RecursionError):
        return "input nested too deeply (corrupted JSON or YAML?)"
    if isinstance(err, MemoryError):
        return "out of memory (try --max-memory)"
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.strerror and text.startswith(f"[Errno {err.errno}] "):
        text = text.removeprefix(f"[Errno {err.errno}] ")
    if len(text) > 500:
        text = text[:497] + "..."
    hints = {
        errno.ENOSPC: "free some space or choose another output",
        errno.EROFS: "the output's file system is read-only: choose another output",
        errno.EMFILE: "too many open files: raise `ulimit -n`",
        errno.EACCES: "permission denied",
        errno.EDQUOT: "disk quota exceeded",
    }
    hint = hints.get(getattr(err, "errno", None) or -1)
    return f"{text} ({hint})" if hint and hint not in text else text


def mergekit_yaml(argv: Sequence[str] | None = None) -> int:
    """``weightmerge-yaml CONFIG OUT [mergekit flags]``: ``weightmerge merge`` under a name and
    argument order that scripts written for ``mergekit-yaml`` expect."""
    return main(["merge", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
