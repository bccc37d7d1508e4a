"""Low: the environment fails. Disk full (checked before writing, and a real ENOSPC mid-write),
read-only output, a concurrent merge to the same OUT, SIGTERM/SIGHUP, a set-aside old output,
unsafe pickles, small files fsynced before the rename, messages naming the right model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rel_fixtures import WM, family, one_line_error, run_cli, save_model, state_dict, write_cfg


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, readonly: bool = False) -> Iterator[Path]:
    """A real small file system (needs root, as in CI's container); skips where mounting is not allowed."""
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    try:
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def big_family(root: Path, n: int = 2) -> tuple[Path, list[Path]]:
    shapes = {f"l{k}.w": (256, 256) for k in range(8)}
    base = save_model(root / "base", state_dict(0, shapes=shapes))
    return base, [save_model(root / f"e{i}", state_dict(i + 1, shapes=shapes)) for i in range(n)]


def test_disk_full_is_found_before_writing(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base, experts = big_family(tmp_path / "m")  # output: 2 MiB of weights
    cfg = write_cfg(tmp_path / "c.yaml", "task_arithmetic", base, experts, {"weight": 0.5})
    with tmpfs(tmp_path / "small", "1m") as mnt:
        t0 = time.perf_counter()
        rc, err = run_cli(["merge", str(cfg), str(mnt / "out"), "-q"], capsys)
        assert rc == 1 and one_line_error(err) and "not enough space" in err, err
        assert time.perf_counter() - t0 < 30
        assert os.listdir(mnt) == []


def test_disk_full_mid_write_is_one_line_and_leaves_nothing(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import weightmerge.io.atomic as atomic

    monkeypatch.setattr(atomic, "check_free_space", lambda out, need: None)  # let the writes hit ENOSPC
    base, experts = big_family(tmp_path / "m")
    cfg = write_cfg(tmp_path / "c.yaml", "task_arithmetic", base, experts, {"weight": 0.5})
    with tmpfs(tmp_path / "small", "1m") as mnt:
        rc, err = run_cli(["merge", str(cfg), str(mnt / "out"), "-q"], capsys)
        assert rc == 1 and one_line_error(err) and "No space left" in err, err
        assert os.listdir(mnt) == []


def test_read_only_output_is_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base, experts = family(tmp_path / "m", 2)
    cfg = write_cfg(tmp_path / "c.yaml", "task_arithmetic", base, experts, {"weight": 0.5})
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as mnt:
        rc, err = run_cli(["merge", str(cfg), str(mnt / "out"), "-q"], capsys)
        assert rc == 1 and one_line_error(err) and "read-only file system" in err.lower(), err


def test_concurrent_merge_to_the_same_output_is_refused_at_once(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from weightmerge.io.atomic import output_lock

    base, experts = family(tmp_path / "m", 2)
    cfg = write_cfg(tmp_path / "c.yaml", "task_arithmetic", base, experts, {"weight": 0.5})
    out = tmp_path / "out"
    with output_lock(out):  # another merge is writing OUT
        rc, err = run_cli(["merge", str(cfg), str(out), "-q", "--force"], capsys)
        assert rc == 1 and "another weightmerge process" in err and str(os.getpid()) in err, err
    assert not out.exists()
    rc, err = run_cli(["merge", str(cfg), str(out), "-q"], capsys)  # the lock is gone with its holder
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "m", "out"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signals_remove_the_scratch_directory(tmp_path: Path, sig: int) -> None:
    shapes = {f"l{k}.w": (512, 512) for k in range(16)}
    base = save_model(tmp_path / "m" / "base", state_dict(0, shapes=shapes))
    experts = [save_model(tmp_path / "m" / f"e{i}", state_dict(i + 1, shapes=shapes)) for i in range(3)]
    cfg = write_cfg(tmp_path / "c.yaml", "ties", base, experts, {"weight": 0.3, "density": 0.5})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        [*WM, "merge", str(cfg), str(tmp_path / "out"), "-q"], env=env, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while not any(".wm-tmp-" in n for n in os.listdir(tmp_path)):
        assert p.poll() is None and time.monotonic() < deadline, "merge ended before it could be signalled"
        time.sleep(0.01)
    p.send_signal(sig)
    _out, err = p.communicate(timeout=60)
    assert p.returncode in (128 + sig, 130), (p.returncode, err)
    assert b"Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["c.yaml", "m"]


def test_set_aside_old_output_is_never_deleted(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base, experts = family(tmp_path / "m", 2)
    cfg = write_cfg(tmp_path / "c.yaml", "task_arithmetic", base, experts, {"weight": 0.5})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".out.wm-old-{dead.pid}-0a0b"  # a crash between the two renames of --force
    old.mkdir()
    (old / "model.safetensors").write_text("the user's previous output")
    stale = tmp_path / f".out.wm-tmp-{dead.pid}-0c0d"
    stale.mkdir()
    rc, err = run_cli(["merge", str(cfg), str(tmp_path / "out"), "-q"], capsys)
    assert rc == 0, err
    assert (old / "model.safetensors").read_text() == "the user's previous output"
    assert not stale.exists()


def test_unsafe_pickle_keeps_its_reason_and_runs_nothing(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.zeros(2), "x": Evil()}, tmp_path / "evil.bin")  # saving runs nothing
    base, experts = family(tmp_path / "m", 2)
    (experts[1] / "model.safetensors").unlink()
    os.replace(tmp_path / "evil.bin", experts[1] / "pytorch_model.bin")
    cfg = write_cfg(tmp_path / "c.yaml", "task_arithmetic", base, experts, {"weight": 0.5})
    rc, err = run_cli(["merge", str(cfg), str(tmp_path / "out"), "-q"], capsys)
    assert rc == 1 and one_line_error(err), err
    assert "refusing to load" in err and "GLOBAL posix.system" in err, err
    assert not marker.exists()


def test_small_files_are_fsynced_before_the_rename(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    base, experts = family(tmp_path / "m", 2)
    (base / "tokenizer.json").write_text("{}")
    cfg = write_cfg(tmp_path / "c.yaml", "task_arithmetic", base, experts, {"weight": 0.5})
    rc, err = run_cli(["merge", str(cfg), str(tmp_path / "out"), "-q"], capsys)
    assert rc == 0, err
    names = {Path(p).name for p in synced if ".wm-tmp-" in p}
    assert {
        "config.json",
        "README.md",
        "weightmerge_config.yaml",
        "tokenizer.json",
        "model.safetensors",
    } <= names


def test_mismatch_names_the_model_that_differs(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base, experts = family(tmp_path / "m", 3)
    sd = state_dict(3)
    sd["layers.0.w"] = sd["layers.0.w"].to(torch.int32)
    save_model(experts[2], sd)
    cfg = write_cfg(tmp_path / "c.yaml", "task_arithmetic", base, experts, {"weight": 0.5})
    rc, err = run_cli(["merge", str(cfg), str(tmp_path / "out"), "-q"], capsys)
    assert rc == 1 and "expert2" in err and "expert0" not in err and "expert1" not in err, err


def test_deeply_nested_model_config_is_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base, experts = family(tmp_path / "m", 2)
    (experts[0] / "config.json").write_text("[" * 200000 + "]" * 200000)
    cfg = write_cfg(tmp_path / "c.yaml", "task_arithmetic", base, experts, {"weight": 0.5})
    rc, err = run_cli(["merge", str(cfg), str(tmp_path / "out"), "-q"], capsys)
    assert rc == 1 and one_line_error(err) and "nested too deeply" in err, err


def test_alias_bomb_config_is_refused_small_and_fast(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for c in "bcdefghi":
        lines.append(f"{c}: &{c} [" + ",".join(["*" + prev] * 9) + "]")
        prev = c
    lines += ["merge_method: linear", "base_model: *i", "models: [{model: x}]"]
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    assert cfg.stat().st_size < 600
    t0 = time.perf_counter()
    rc, err = run_cli(["validate", str(cfg)], capsys)
    assert rc == 1 and one_line_error(err) and "expands to more than" in err, err
    assert len(err) < 400 and time.perf_counter() - t0 < 10


def test_large_value_in_config_error_is_quoted_as_an_excerpt(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        json.dumps({"merge_method": "linear", "base_model": [["x" * 500] * 20] * 20, "models": []})
    )
    rc, err = run_cli(["validate", str(cfg)], capsys)
    assert rc == 1 and one_line_error(err) and len(err) < 2200, len(err)
