"""Medium: many inputs. 30 experts of 40 shards each (1240 files) merge under ``ulimit -n 1024``
(open shard files are bounded by an LRU), and 50 experts merge; both equal the in-memory API."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch
from rel_fixtures import run_child, save_model, write_cfg
from safetensors.torch import load_file

from weightmerge.api import merge_state_dicts


def _family(root: Path, n: int, n_tensors: int, shards: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(3)
    base = {f"t{k:03d}.weight": torch.randn(4, 3, generator=g) for k in range(n_tensors)}
    save_model(root / "base", base, shards=shards)
    experts = []
    for i in range(n):
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_model(root / f"e{i:02d}", sd, shards=shards)
        experts.append(sd)
    return base, experts


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


@pytest.mark.slow
def test_30_experts_of_40_shards_under_ulimit_1024(tmp_path: Path) -> None:
    base, experts = _family(tmp_path / "m", 30, 40, 40)
    cfg = write_cfg(
        tmp_path / "c.yaml",
        "task_arithmetic",
        tmp_path / "m" / "base",
        [tmp_path / "m" / f"e{i:02d}" for i in range(30)],
        {"weight": 0.1},
    )
    r = run_child(["merge", str(cfg), str(tmp_path / "out"), "-q"], preexec_fn=_limit_fds, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = merge_state_dicts(base, experts, "task_arithmetic", {"weight": 0.1})
    assert isinstance(want, dict) and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_50_experts(tmp_path: Path) -> None:
    base, experts = _family(tmp_path / "m", 50, 6, 1)
    cfg = write_cfg(
        tmp_path / "c.yaml",
        "ties",
        tmp_path / "m" / "base",
        [tmp_path / "m" / f"e{i:02d}" for i in range(50)],
        {"weight": 0.02, "density": 0.5},
    )
    from weightmerge.cli import main

    assert main(["merge", str(cfg), str(tmp_path / "out"), "-q"]) == 0
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = merge_state_dicts(base, experts, "ties", {"weight": 0.02, "density": 0.5})
    assert isinstance(want, dict) and all(torch.equal(got[k], want[k]) for k in want)


def test_fd_pool_stays_bounded(tmp_path: Path) -> None:
    from weightmerge.io.safetensors_io import FD_POOL, SafetensorsFile

    sds = []
    files = []
    for i in range(FD_POOL.capacity + 20):
        sd = {"w": torch.full((2, 2), float(i))}
        save_model(tmp_path / f"f{i}", sd, config=None)
        files.append(SafetensorsFile(str(tmp_path / f"f{i}" / "model.safetensors")))
        sds.append(sd)
    for _ in range(2):
        for f, sd in zip(files, sds, strict=True):
            assert torch.equal(f.read("w"), sd["w"])
            assert FD_POOL.count() <= FD_POOL.capacity
    for f in files:
        f.close()
    assert FD_POOL.count() == 0
