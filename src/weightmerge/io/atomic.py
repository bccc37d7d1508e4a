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
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

TMP_TAG = "wm-tmp"
NEW_TAG = "wm-new"  # a scratch directory being set up (renamed to TMP_TAG once its identity is in)
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
    """Remove scratch directories of ``out`` left by dead processes; returns what was removed.
    A set-aside old output (``wm-old``) is never removed: it may be the only copy of the user's
    previous output (a crash between the two renames of a non-exchanging replace)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:{TMP_TAG}|{NEW_TAG})-(\d+)-[0-9a-f]+$")
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
            f"output {out} appeared while writing; not replacing it (--force, or force=True, replaces it)"
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


RESUME_FILE = "wm-resume.json"


@contextlib.contextmanager
def atomic_output_dir(
    out: str | os.PathLike[str],
    *,
    force: bool,
    identity: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block succeeds (see the module
    docstring). ``FileExistsError`` up front when ``out`` exists and not ``force``.

    ``identity`` (JSON-able, with a ``key``) is recorded in the scratch directory as
    ``RESUME_FILE``; with ``resume`` a scratch directory of a dead run whose identity has the same
    key is taken over instead of starting afresh (one of another identity is refused, naming what
    differs). The caller removes ``RESUME_FILE`` and its own journal before the block ends."""
    out = Path(out).absolute()
    if os.path.lexists(out) and not force:
        raise FileExistsError(f"output {out} already exists (--force, or force=True, replaces it)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"parent directory of output {out} does not exist")
    with output_lock(out):
        tmp = _claim_scratch(out, identity) if resume and identity is not None else None
        remove_stale(out)
        if tmp is None:
            # set up under another name and renamed: a scratch directory is never seen (by a later
            # --resume) without its identity, even when this process is killed right here
            new = _scratch_name(out, NEW_TAG)
            new.mkdir()
            if identity is not None:
                (new / RESUME_FILE).write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n")
            tmp = _scratch_name(out, TMP_TAG)
            os.rename(new, tmp)
        try:
            yield tmp
            _fsync_tree(tmp)
            _install(tmp, out, force=force)
            fsync_dir(out.parent)
        except BaseException:
            _remove(tmp)
            raise


def _claim_scratch(out: Path, identity: Mapping[str, Any]) -> Path | None:
    """The scratch directory of a dead run of the same identity, renamed to this process's name
    (so no other run takes it as stale); None when there is none. A dead run's scratch directory
    of another identity is refused with what differs."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.{TMP_TAG}-(\d+)-[0-9a-f]+$")
    refused: list[str] = []
    if not out.parent.is_dir():
        return None
    for entry in sorted(out.parent.iterdir()):
        m = pattern.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            recorded = json.loads((entry / RESUME_FILE).read_text())
        except (OSError, ValueError):
            refused.append(f"{entry} records no identity")
            continue
        if isinstance(recorded, dict) and recorded.get("key") == identity.get("key"):
            mine = _scratch_name(out, TMP_TAG)
            os.rename(entry, mine)
            return mine
        refused.append(f"{entry}: {_identity_difference(recorded, identity)}")
    if refused:
        raise ValueError(
            f"cannot resume output {out}: the interrupted run's scratch directory belongs to another "
            f"merge ({refused[0]}); run without --resume to start afresh"
        )
    return None


def _identity_difference(recorded: Any, identity: Mapping[str, Any]) -> str:
    if not isinstance(recorded, dict):
        return "unreadable identity"
    for key in sorted(set(recorded) | set(identity)):
        if key == "key":
            continue
        a, b = recorded.get(key), identity.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            for x, y in zip(a, b, strict=False):
                if x != y:
                    return f"{key} differ: recorded {str(x)[:200]}, now {str(y)[:200]}"
            return f"{key} differ: {len(a)} recorded, {len(b)} now"
        return f"{key} differs: recorded {str(a)[:200]}, now {str(b)[:200]}"
    return "its identity key differs"


def _fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root`` and the directories themselves, so that after the
    rename the small files (config, card, tokenizer) are as durable as the weights."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.isfile(p) and not os.path.islink(p):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(dirpath))


def check_free_space(out: str | os.PathLike[str], need: int) -> None:
    """Refuse, before any work, an output whose file system has less free space than ``need``
    bytes (the planned output size) plus a small margin; the disk would fill up mid-write."""
    parent = Path(out).absolute().parent
    try:
        st = os.statvfs(parent)
    except OSError:
        return  # nothing to measure (e.g. the parent is created later): the writes will tell
    if st.f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, f"cannot write output {out}: {parent} is on a read-only file system")
    free = st.f_bavail * st.f_frsize
    margin = 64 << 10
    if free < need + margin:
        raise OSError(
            errno.ENOSPC,
            f"not enough space for output {out}: it needs about {_size(need)}, "
            f"{parent} has {_size(free)} free",
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


LOCK_TAG = "wm-lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on output ``out`` (``flock`` on ``.<name>.wm-lock`` next to it; the
    kernel drops it when the process dies): a second merge to the same OUT is refused at once,
    before any work, instead of learning at the end that OUT appeared meanwhile."""
    import fcntl

    out = Path(out).absolute()
    path = out.parent / f".{out.name}.{LOCK_TAG}"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise FileExistsError(
                f"another weightmerge process (pid {holder or '?'}) is writing output {out}; "
                "wait for it or choose another output"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the file may have been unlinked by its previous holder between open and flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


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
    TOKENIZER_GLOBS, TOKENIZER_DIRS); returns the names copied. A missing ``src`` copies nothing.

    Model folders are untrusted: a symlink is copied (as the file it names) only when it stays
    inside the folder (or the Hugging Face cache's blobs); links leading elsewhere, links to
    directories and special files are skipped with a warning on stderr, never followed."""
    from weightmerge.io._common import inside_model, model_roots, warn

    src_p, dst_p = Path(src), Path(dst)
    if not src_p.is_dir():
        return []
    names = {n for n in TOKENIZER_FILES if os.path.lexists(src_p / n)}
    for pattern in TOKENIZER_GLOBS:
        names.update(p.name for p in src_p.glob(pattern))
    copied = []
    for name in sorted(names):
        if inside_model(src_p / name, src_p):
            shutil.copyfile(src_p / name, dst_p / name)
            copied.append(name)
    roots = model_roots(src_p)
    for name in TOKENIZER_DIRS:
        d = src_p / name
        if not d.is_dir():
            continue
        if d.is_symlink():
            warn(f"not copying {d}: a link to a directory ({d.resolve()}) is never followed")
            continue
        _copy_tree_inside(d, dst_p / name, roots)
        copied.append(name)
    return copied


def _copy_tree_inside(src: Path, dst: Path, roots: Sequence[Path]) -> None:
    """Copy the regular files under ``src`` (and links to files inside ``roots``); links to
    directories and anything else are skipped with a warning."""
    from weightmerge.io._common import warn

    dst.mkdir(exist_ok=True)
    for entry in sorted(src.iterdir()):
        if entry.is_symlink():
            target = entry.resolve()
            if entry.is_dir() or not target.is_file() or not any(target.is_relative_to(r) for r in roots):
                warn(f"not copying {entry}: a link to {target}, outside the model folder or not a file")
                continue
            shutil.copyfile(entry, dst / entry.name)
        elif entry.is_dir():
            _copy_tree_inside(entry, dst / entry.name, roots)
        elif entry.is_file():
            shutil.copyfile(entry, dst / entry.name)
