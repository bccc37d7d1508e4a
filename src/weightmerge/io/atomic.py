"""Atomic output directories, and copying tokenizer files next to merged weights.

``atomic_output_dir(out, force=...)`` yields a fresh temporary directory next to ``out`` (same
filesystem): ``.<name>.wm-tmp-<pid>-<random>``. On success it is renamed onto ``out``; on an
exception it is removed. An existing ``out`` is refused up front unless ``force``; with ``force``
the new directory is swapped in with one atomic ``renameat2(RENAME_EXCHANGE)`` where Linux offers
it, otherwise the old directory is first renamed aside (``.<name>.wm-old-<pid>-<random>``), the
new one renamed in, and only then the old one deleted (a crash in between leaves the old output
aside, never deleted). A run killed with SIGKILL leaves its temporary directory behind; the next
run for the same ``out`` removes every such directory whose pid is no longer alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

TMP_TAG = "wm-tmp"
OLD_TAG = "wm-old"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_GLOBS = ("vocab.*", "*.tiktoken")
TOKENIZER_DIRS = ("additional_chat_templates",)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _scratch_name(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale(out: Path) -> list[Path]:
    """Remove scratch directories of ``out`` left by dead processes; returns what was removed."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:{TMP_TAG}|{OLD_TAG})-(\d+)-[0-9a-f]+$")
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _remove(entry)
            removed.append(entry)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # kernel or filesystem without RENAME_EXCHANGE
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _install(tmp: Path, out: Path, *, force: bool) -> None:
    if not os.path.lexists(out):
        os.rename(tmp, out)  # fails (ENOTEMPTY/EEXIST) rather than clobber a non-empty dir made meanwhile
        return
    if not force:
        raise FileExistsError(
            f"output {out} appeared while writing; not replacing it (pass force to replace)"
        )
    if out.is_dir() and not out.is_symlink() and _exchange(tmp, out):
        _remove(tmp)  # now holds the old output
        return
    old = _scratch_name(out, OLD_TAG)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike[str], *, force: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block succeeds (see the module
    docstring). ``FileExistsError`` up front when ``out`` exists and not ``force``."""
    out = Path(out).absolute()
    if os.path.lexists(out) and not force:
        raise FileExistsError(f"output {out} already exists (pass force to replace it)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"parent directory of output {out} does not exist")
    remove_stale(out)
    tmp = _scratch_name(out, TMP_TAG)
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        _install(tmp, out, force=force)
        fsync_dir(out.parent)
    except BaseException:
        _remove(tmp)
        raise


def _resolved_inputs(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` resolved (symlinks followed), plus, for a directory, each of its entries resolved:
    a model folder whose weight file is a link into OUT overlaps OUT as much as the folder itself."""
    p = Path(path)
    out = [p.resolve()]
    if p.is_dir():
        with contextlib.suppress(OSError):
            out += [e.resolve() for e in p.iterdir() if e.is_symlink()]
    return out


def check_output_clear(out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse an output path that equals, lies inside or contains any input (paths resolved,
    symlinks followed), before anything is read or written: replacing OUT (``--force``) or
    writing next to it must never touch an input. Raises ``ValueError`` naming both paths."""
    target = Path(out).resolve()
    for inp in inputs:
        for r in _resolved_inputs(inp):
            if r == target:
                what = "is"
            elif r.is_relative_to(target):
                what = "would replace the folder holding"
            elif target.is_relative_to(r):
                what = "lies inside"
            else:
                continue
            shown = f"input {inp}" + ("" if Path(inp).resolve() == r else f" (via {r})")
            raise ValueError(f"output {out} {what} {shown}; choose an output outside every input")


def copy_tokenizer_files(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[str]:
    """Copy the tokenizer files of directory ``src`` into ``dst`` (names in TOKENIZER_FILES,
    TOKENIZER_GLOBS, TOKENIZER_DIRS); returns the names copied. A missing ``src`` copies nothing."""
    src_p, dst_p = Path(src), Path(dst)
    if not src_p.is_dir():
        return []
    names = {n for n in TOKENIZER_FILES if (src_p / n).is_file()}
    for pattern in TOKENIZER_GLOBS:
        names.update(p.name for p in src_p.glob(pattern) if p.is_file())
    copied = []
    for name in sorted(names):
        shutil.copy2(src_p / name, dst_p / name)
        copied.append(name)
    for name in TOKENIZER_DIRS:
        if (src_p / name).is_dir():
            shutil.copytree(src_p / name, dst_p / name, dirs_exist_ok=True)
            copied.append(name)
    return copied
