"""Candidates evaluated in local worker processes and on a local Ray instance (loopback) give the
same search as one process: same candidates, same scores, same chosen point."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import search_helpers as h
from conftest import require
from weightmerge.search import parse_search_config
from weightmerge.search.runner import run_search

require("cma")
pytestmark = pytest.mark.slow  # worker start-up imports torch (~5-15 s per run on 2 busy cores)


def _trace(summary: dict) -> list[tuple[str, float]]:
    return [(json.dumps(r["point"], sort_keys=True), r["objective"]) for r in summary["history"]]


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = h.make_checkpoints(tmp_path_factory.mktemp("parallel"))
    cfg = parse_search_config(h.search_config(root, budget=8, population=4, output_dir=str(root / "serial")))
    return root, run_search(cfg, log=lambda _m: None, force=True, write=False)


def test_local_workers_equal_one_process(serial: tuple[Path, dict]) -> None:
    root, one = serial
    cfg = parse_search_config(h.search_config(root, budget=8, population=4, output_dir=str(root / "pool")))
    two = run_search(cfg, log=lambda _m: None, force=True, workers=2, write=False)
    assert _trace(two) == _trace(one)
    assert two["best"] == one["best"]
    here = f":{os.getpid()}"
    assert not any(r["worker"].endswith(here) for r in two["history"])  # evaluated in the workers


def test_ray_local_instance_equals_one_process(serial: tuple[Path, dict]) -> None:
    require("ray")
    root, one = serial
    cfg = parse_search_config(h.search_config(root, budget=8, population=4, output_dir=str(root / "ray")))
    on_ray = run_search(cfg, log=lambda _m: None, force=True, workers=2, ray_address="local", write=False)
    assert _trace(on_ray) == _trace(one)
    assert on_ray["best"] == one["best"]
    assert on_ray["ray"] == "local"
