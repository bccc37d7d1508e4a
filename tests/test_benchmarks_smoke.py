"""The benchmark scripts (benchmarks/): generated checkpoints are what transformers builds, the
measuring and comparing helpers are right on hand-made cases, and one tiny end-to-end run of
bench_merge.py checks, times and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_compare  # noqa: E402
import bench_measure  # noqa: E402
import make_models  # noqa: E402


def _spec(**kw: object) -> make_models.Spec:
    args: dict[str, object] = dict(preset="tiny", dtype="bfloat16", experts=2, seed=0, shard_bytes=200_000)
    args.update(kw)
    return make_models.Spec(**args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_models.make_models(_spec(), tmp_path_factory.mktemp("models"), quiet=True)


@pytest.mark.slow  # builds a transformers model
def test_generated_checkpoint_is_a_transformers_llama(tiny_models: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    for model in ("base", "expert_1", "expert_2"):
        d = tiny_models / model
        cfg = LlamaConfig.from_pretrained(d)
        with torch.device("meta"):
            ref = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
        ckpt = bench_compare.CheckpointDir(d)
        assert {k: tuple(ckpt[k].shape) for k in ckpt} == ref
        assert {ckpt[k].dtype for k in ckpt} == {torch.bfloat16}
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1  # 200 kB shards: really sharded


def test_param_count_matches_shapes() -> None:
    s = make_models.PRESETS["168m"]
    per_layer = 4 * 768 * 768 + 3 * 768 * 3264 + 2 * 768
    assert make_models.param_count(s) == 12 * per_layer + 2 * 32000 * 768 + 768
    assert 160e6 < make_models.param_count(s) < 170e6


@pytest.mark.slow  # the tiny_models fixture generates checkpoints
def test_task_vectors_are_structured(tiny_models: Path) -> None:
    base = bench_compare.CheckpointDir(tiny_models / "base")
    e1 = bench_compare.CheckpointDir(tiny_models / "expert_1")
    e2 = bench_compare.CheckpointDir(tiny_models / "expert_2")
    name = "model.layers.1.mlp.up_proj.weight"
    d1 = e1[name].float() - base[name].float()
    d2 = e2[name].float() - base[name].float()
    assert 2e-4 < d1.abs().mean() < 5e-3
    assert not torch.equal(d1, d2)
    cos = torch.nn.functional.cosine_similarity(d1.flatten(), d2.flatten(), dim=0)
    assert 0.05 < cos < 0.6  # the shared part: correlated, far from identical
    assert d1.abs().max() > 4e-3  # spikes
    assert (d1 == 0).float().mean() < 0.1  # deltas survive bf16 rounding
    norm = "model.layers.0.input_layernorm.weight"
    dn = e1[norm].float() - base[norm].float()
    assert (dn != 0).float().mean() > 0.5  # norms change too (their bf16 ulp is 2^-7)


@pytest.mark.slow
def test_generation_is_cached_and_deterministic(tiny_models: Path, tmp_path: Path) -> None:
    f = tiny_models / "expert_1" / "model-00001-of-00002.safetensors"
    files = sorted((tiny_models / "expert_1").glob("*.safetensors"))
    assert f in files
    mtime = f.stat().st_mtime_ns
    again = make_models.make_models(_spec(), tiny_models.parent, quiet=True)
    assert again == tiny_models and f.stat().st_mtime_ns == mtime  # reused, not rewritten
    other = make_models.make_models(_spec(), tmp_path, quiet=True)
    for g in files:
        assert (other / "expert_1" / g.name).read_bytes() == g.read_bytes()


def test_ulp_distance_by_hand() -> None:
    one = torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=torch.bfloat16)
    nxt = torch.tensor([1.0078125, -1.0, -0.0, 2.0], dtype=torch.bfloat16)  # bf16: 1 + 2^-7 is next
    d = bench_compare.tensor_diff(one, nxt)
    assert d == {"n_diff": 1, "max_abs": 0.0078125, "max_ulp": 1.0}
    a = torch.tensor([1e-45, -1e-45], dtype=torch.float32)  # smallest subnormals: 2 ulp apart
    assert bench_compare.tensor_diff(a[:1], a[1:])["max_ulp"] == 2.0


def test_tie_explained_flags_only_non_tie_differences() -> None:
    base = {"w": torch.zeros(6)}
    # magnitudes 5,4,3,3,1,0: density 0.5 -> k = 3, threshold 3 (indices 2 and 3 tie)
    experts = [{"w": torch.tensor([5.0, -4.0, 3.0, -3.0, 1.0, 0.0])}]
    hook = bench_compare.tie_explained(base, experts, density=0.5)  # type: ignore[arg-type]
    a = torch.tensor([5.0, -4.0, 3.0, 0.0, 0.0, 0.0])
    b_tie = torch.tensor([5.0, -4.0, 0.0, -3.0, 0.0, 0.0])  # the other tie member kept
    d = bench_compare.tensor_diff(a, b_tie)
    assert hook("w", a, b_tie, d) == {"unexplained": 0.0, "tie_entries": 2.0}
    b_bad = torch.tensor([5.0, 0.0, 3.0, 0.0, 1.0, 0.0])  # differs at 1 and 4: no tie there
    d = bench_compare.tensor_diff(a, b_bad)
    assert hook("w", a, b_bad, d)["unexplained"] == 2.0


def test_run_measured_sees_peak_memory_and_exit_code() -> None:
    code = "b = bytearray(300 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1"
    r = bench_measure.run_measured([sys.executable, "-c", code])
    assert r.rc == 0
    assert r.maxrss_bytes > 300 * 2**20
    assert r.wall_s > 0 and r.cpu_s > 0
    bad = bench_measure.run_measured([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert bad.rc == 3


def test_median() -> None:
    assert bench_measure.median([3.0, 1.0, 2.0]) == 2.0
    assert bench_measure.median([4.0, 1.0, 2.0, 3.0]) == 2.5


def run_bench(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """Run a benchmarks/ script in a fresh process with this venv's tools on PATH; must exit 0."""
    cmd = [sys.executable, str(BENCH / script), *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_bench_merge_end_to_end(tmp_path: Path) -> None:
    """Two methods on the tiny preset, one run each: one against mergekit, one in memory."""
    pytest.importorskip("mergekit")
    out = tmp_path / "r.json"
    proc = run_bench(
        "bench_merge.py",
        *("--preset", "tiny", "--experts", "2", "--runs", "1", "--methods", "linear,ties_global"),
        *("--root", str(tmp_path / "models"), "--work", str(tmp_path / "work"), "--json", str(out)),
    )
    res = json.loads(out.read_text())
    rows = {r["method"]: r for r in res["summary"]["rows"]}
    assert rows["linear"]["check"]["ok"] and rows["linear"]["check"]["reference"] == "mergekit 0.1.5"
    assert rows["linear"]["check"]["n_diff"] == 0
    assert rows["ties_global"]["check"]["ok"]
    assert "in memory" in rows["ties_global"]["check"]["reference"]
    assert rows["linear"]["mergekit_wall_s"] > 0 and rows["linear"]["ours_maxrss_bytes"] > 0
    assert res["summary"]["floor_wall_s"] > 0
    assert res["machine"]["torch"] == torch.__version__
    assert "| linear |" in proc.stdout


@pytest.mark.slow
def test_bench_small_tensors_end_to_end(tmp_path: Path) -> None:
    """Tiny layouts, one round: both checked against the in-memory API, timed, summarised."""
    results = tmp_path / "results"
    proc = run_bench(
        "bench_small_tensors.py",
        *("--many", "200", "--numel", "64", "--experts", "2", "--runs", "1"),
        *("--dir", str(tmp_path / "models"), "--json", str(results)),
    )
    (path,) = results.glob("small-tensors-200x64-e2-*.json")
    res = json.loads(path.read_text())
    assert res["layouts"]["many"]["tensors"] == 200 and res["layouts"]["few"]["tensors"] == 2
    assert res["layouts"]["many"]["numel"] * 200 == res["layouts"]["few"]["numel"] * 2
    for layout in res["layouts"].values():
        assert layout["check"] == {"ok": True, "tensors": layout["tensors"], "differing": 0}
        assert len(layout["runs"]) == 1 and layout["runs"][0]["merge"]["wall_s"] > 0
    assert "ms per extra tensor" in proc.stdout
