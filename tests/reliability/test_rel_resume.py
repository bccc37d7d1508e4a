"""--resume: a merge killed with SIGKILL at a random point continues from its scratch directory and
writes exactly the bytes of an uninterrupted run; a scratch directory of another config or of
changed inputs is refused."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from rel_fixtures import WM, run_cli, save_model, state_dict, write_cfg

SHAPES = {f"layers.{k:02d}.w": (256, 192) for k in range(24)} | {
    f"layers.{k:02d}.b": (192,) for k in range(24)
}


def files_digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def make(tmp_path: Path, method: str, params: dict) -> tuple[Path, Path]:
    base = save_model(tmp_path / "m" / "base", state_dict(0, shapes=SHAPES), shards=3)
    experts = [
        save_model(tmp_path / "m" / f"e{i}", state_dict(i + 1, shapes=SHAPES), shards=2) for i in range(3)
    ]
    return base, write_cfg(tmp_path / "c.yaml", method, base, experts, params)


def _journal_lines(parent: Path, out: Path) -> int:
    for n in os.listdir(parent):
        if n.startswith(f".{out.name}.wm-tmp-"):
            try:
                return len((parent / n / "wm-journal.txt").read_text().splitlines())
            except FileNotFoundError:
                return 0
    return -1  # no scratch directory yet


def kill_midway(cfg: Path, out: Path, journal_lines: int) -> None:
    """SIGKILL the merge once its journal lists at least ``journal_lines`` tensors (0: as soon as
    its scratch directory exists, before any tensor is known complete)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([*WM, "merge", str(cfg), str(out), "-q", "--shard-size", "100KB"], env=env)
    deadline = time.monotonic() + 120
    while _journal_lines(out.parent, out) < journal_lines:
        assert p.poll() is None, "the merge ended before the kill point"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()


@pytest.mark.slow
def test_killed_merge_resumes_bit_identical(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """dare_ties: statistics (the rescale sums) before the apply pass, and random drops."""
    _base, cfg = make(tmp_path, "dare_ties", {"weight": 0.4, "density": 0.5})
    rc, err = run_cli(["merge", str(cfg), str(tmp_path / "ref"), "-q", "--shard-size", "100KB"], capsys)
    assert rc == 0, err
    want = files_digest(tmp_path / "ref")
    assert len([n for n in want if n.endswith(".safetensors")]) > 3
    for k, lines in enumerate([0, 12]):  # before any tensor is known complete; midway
        out = tmp_path / f"out{k}"
        kill_midway(cfg, out, lines)
        scratch = [n for n in os.listdir(tmp_path) if n.startswith(f".out{k}.wm-tmp-")]
        assert not out.exists() and len(scratch) == 1
        rc, err = run_cli(["merge", str(cfg), str(out), "--shard-size", "100KB", "--resume"], capsys)
        assert rc == 0, err
        assert ("resumed" in err) == (lines > 0), err
        assert files_digest(out) == want
        assert not [n for n in os.listdir(tmp_path) if n.startswith(f".out{k}.wm-tmp-")]


def test_scratch_of_changed_inputs_or_config_is_refused(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    _base, cfg = make(tmp_path, "task_arithmetic", {"weight": 0.5})
    out = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    scratch = tmp_path / f".out.wm-tmp-{dead.pid}-00aa"  # what a killed run leaves
    scratch.mkdir()
    (scratch / "wm-resume.json").write_text('{"key": "other", "config_sha256": "x", "inputs": []}')
    rc, err = run_cli(["merge", str(cfg), str(out), "-q", "--resume"], capsys)
    assert rc == 1 and "belongs to another merge" in err and "config_sha256 differs" in err, err
    assert scratch.exists() and not out.exists()
    rc, err = run_cli(["merge", str(cfg), str(out), "-q"], capsys)  # without --resume: starts afresh
    assert rc == 0, err
    assert not scratch.exists()


def test_resume_refuses_a_scratch_whose_input_changed(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base, cfg = make(tmp_path, "task_arithmetic", {"weight": 0.5})
    kill_midway(cfg, tmp_path / "out", 0.0)
    f = base / "model-00001-of-00003.safetensors"
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))  # same bytes, another modification time
    rc, err = run_cli(
        ["merge", str(cfg), str(tmp_path / "out"), "-q", "--shard-size", "100KB", "--resume"], capsys
    )
    assert rc == 1 and "inputs differ" in err and "model-00001-of-00003" in err, err


def test_resume_without_an_interrupted_run_starts_afresh(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    _base, cfg = make(tmp_path, "task_arithmetic", {"weight": 0.5})
    rc, err = run_cli(["merge", str(cfg), str(tmp_path / "out"), "-q", "--resume"], capsys)
    assert rc == 0, err
    assert not {"wm-journal.txt", "wm-resume.json"} & set(os.listdir(tmp_path / "out"))


def test_torn_journal_and_unknown_names_are_recomputed(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A journal cut mid-line (a kill during its append) and a name not in the layout: the resumed
    run keeps the names before the tear and computes the rest again; same bytes as a clean run."""
    import json

    import weightmerge.io.atomic as atomic
    import weightmerge.io.output as output_mod

    _base, cfg = make(tmp_path, "task_arithmetic", {"weight": 0.5})
    argv = ["merge", str(cfg), "", "-q", "--shard-size", "100KB"]
    rc, err = run_cli([*argv[:2], str(tmp_path / "ref"), *argv[3:]], capsys)
    assert rc == 0, err
    want = files_digest(tmp_path / "ref")

    class Killed(BaseException):
        pass

    real_flush = output_mod.Journal.flush
    flushes = {"n": 0}

    def flush_then_die(self) -> None:  # type: ignore[no-untyped-def]
        real_flush(self)
        flushes["n"] += 1
        if flushes["n"] == 3:
            raise Killed

    monkeypatch.setattr(output_mod.Journal, "flush", flush_then_die)
    monkeypatch.setattr(atomic, "_remove", lambda path: None)  # leave the scratch as a kill would
    with pytest.raises(Killed):
        run_cli([*argv[:2], str(tmp_path / "out"), *argv[3:]], capsys)
    monkeypatch.undo()
    (scratch,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.wm-tmp-")]
    dead = subprocess.Popen(["true"])
    dead.wait()
    moved = tmp_path / f".out.wm-tmp-{dead.pid}-00ff"  # as if its process had died
    scratch.rename(moved)
    journal = moved / "wm-journal.txt"
    kept = journal.read_text().splitlines()
    assert len(kept) >= 3
    journal.write_text("\n".join(kept[:2]) + "\n" + json.dumps("no.such.tensor") + "\n" + kept[2][:5])
    rc, err = run_cli(["merge", str(cfg), str(tmp_path / "out"), "--shard-size", "100KB", "--resume"], capsys)
    assert rc == 0, err
    assert "resumed: 2 tensors" in err, err
    assert files_digest(tmp_path / "out") == want
