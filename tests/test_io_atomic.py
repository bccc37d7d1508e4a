"""Atomic output directories (success, failure, force swap, SIGKILL and re-run) and tokenizer
file copying."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from weightmerge.io import atomic
from weightmerge.io.atomic import atomic_output_dir, copy_tokenizer_files, remove_stale


def _siblings(parent: Path) -> list[str]:
    """Entries next to the output, without the lock file a SIGKILLed run leaves (its lock is gone)."""
    return sorted(p.name for p in parent.iterdir() if not p.name.endswith(".wm-lock"))


def test_success_renames_into_place(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_output_dir(out, force=False) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.wm-tmp-")
        assert not out.exists()
        (tmp / "a.txt").write_text("x")
    assert (out / "a.txt").read_text() == "x"
    assert _siblings(tmp_path) == ["out"]


def test_exception_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(out, force=False) as tmp:
        (tmp / "a.txt").write_text("x")
        raise RuntimeError("boom")
    assert _siblings(tmp_path) == []


def test_existing_output_refused_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"), atomic_output_dir(out, force=False):
        pytest.fail("body must not run")
    assert (out / "keep").read_text() == "old"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_force_replaces_only_on_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(RuntimeError), atomic_output_dir(out, force=True) as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError("fail")
    assert _siblings(out) == ["keep"] and _siblings(tmp_path) == ["out"]
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new").write_text("new")
        assert (out / "keep").exists()  # old output untouched until the end
    assert _siblings(out) == ["new"]
    assert _siblings(tmp_path) == ["out"]


def test_missing_parent_is_an_error(tmp_path: Path) -> None:
    with (
        pytest.raises(FileNotFoundError, match="parent directory"),
        atomic_output_dir(tmp_path / "no" / "out", force=False),
    ):
        pass


@pytest.mark.slow  # a child merge, killed, then run again
def test_sigkilled_run_leaves_no_output_and_rerun_succeeds(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import sys, time
        from weightmerge.io.atomic import atomic_output_dir
        with atomic_output_dir({str(out)!r}, force=False) as tmp:
            (tmp / "part").write_text("half")
            print("ready", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    leftovers = _siblings(tmp_path)
    assert not out.exists()
    assert len(leftovers) == 1 and leftovers[0].startswith(f".out.wm-tmp-{proc.pid}-")
    with atomic_output_dir(out, force=False) as tmp:
        (tmp / "done").write_text("ok")
    assert (out / "done").read_text() == "ok"
    assert _siblings(tmp_path) == ["out"]  # the killed run's scratch dir was cleaned up


def test_remove_stale_spares_live_pids(tmp_path: Path) -> None:
    out = tmp_path / "out"
    parent_pid = os.getppid()  # alive for the whole test
    live = tmp_path / f".out.wm-tmp-{parent_pid}-00ff"
    live.mkdir()
    other = tmp_path / ".other.wm-tmp-1-00ff"  # another output's scratch: not ours to judge
    other.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.wm-tmp-{dead.pid}-0a0b"
    stale.mkdir()
    old = tmp_path / f".out.wm-old-{dead.pid}-0a0b"  # a set-aside old output: never deleted
    old.mkdir()
    assert remove_stale(out) == [stale]
    assert live.exists() and other.exists() and not stale.exists() and old.exists()


def test_copy_tokenizer_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    wanted = [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
    ]
    for name in [*wanted, "model.safetensors", "config.json", "README.md"]:
        (src / name).write_text(name)
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool.jinja").write_text("t")
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = copy_tokenizer_files(src, dst)
    assert sorted(copied) == sorted([*wanted, "additional_chat_templates"])
    assert sorted(p.name for p in dst.iterdir()) == sorted([*wanted, "additional_chat_templates"])
    assert (dst / "merges.txt").read_text() == "merges.txt"
    assert (dst / "additional_chat_templates" / "tool.jinja").read_text() == "t"
    assert copy_tokenizer_files(tmp_path / "missing", dst) == []
