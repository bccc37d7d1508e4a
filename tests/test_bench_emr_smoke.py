"""benchmarks/bench_emr.py --quick on the tiny preset: the EMR artifact is checked against the
in-memory API (task_state_dict, materialize, A -> B -> A switching) and measured, in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow  # a child process builds checkpoints, merges, materializes and switches
def test_bench_emr_quick(tmp_path: Path) -> None:
    out = tmp_path / "emr.json"
    cmd = [
        sys.executable,
        str(BENCH / "bench_emr.py"),
        "--quick",
        "--root",
        str(tmp_path / "models"),
        "--work",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and res["config"]["preset"] == "tiny" and res["config"]["quick"]
    tasks = res["config"]["tasks"]
    assert len(tasks) == 2

    chk = res["checks"]["reconstruction"]
    assert chk["ok"] and chk["verify"]["ok"] and chk["rescalers"]["ok"] and chk["tasks"]["ok"]
    assert not chk["unified_rounded"]  # float32: the exact in-memory task_state_dict is the reference
    assert [r["task"] for r in chk["per_task"]] == tasks
    for row in chk["per_task"]:
        for what in ("task_state_dict", "materialized"):
            assert row[what]["ok"] and row[what]["n_diff"] == 0 and row[what]["n_elements"] > 0, row
    assert sorted(r["materialized"]["via"] for r in chk["per_task"]) == ["api", "cli"]

    sw = res["checks"]["switch"]
    assert sw["ok"] and sw["aba_ok"] and sw["all_steps_ok"]
    assert sw["sequence"] == " -> ".join([tasks[0], tasks[1], tasks[0]])
    assert len(sw["switch_s"]) == 2 and all(t > 0 for t in sw["switch_s"])

    sz = res["sizes"]
    assert sz["by_kind"]["unified"] >= sz["theoretical"]["unified_bytes"] > 0
    assert sz["by_kind"]["masks"] >= sz["theoretical"]["masks_bytes"] > 0
    assert 0 < sz["ratio_vs_experts"] < 1
    assert all(1 <= b < 1.5 for b in sz["mask_bits_per_param"])  # 1 bit + the safetensors header

    tm = res["timing"]
    assert tm["merge"]["n"] == 1 and tm["merge"]["wall_s"] > 0 and tm["merge"]["maxrss_bytes"] > 0
    assert tm["materialize"]["n"] == 1 and tm["materialize"]["source"] == "chk"
    assert "| check | result |" in proc.stdout and "all checks passed" in proc.stdout
