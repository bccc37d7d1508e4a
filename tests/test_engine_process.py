"""Whole-process properties of `weightmerge merge`: bounded peak RSS, atomicity under SIGKILL, and
the same tensors as mergekit-yaml for mergekit's own configs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ckpt_fixtures import fast_family
from conftest import require
from test_engine_stream import load_output

WM = [sys.executable, "-m", "weightmerge"]


def write_cfg(
    path: Path, method: str, base: Path | None, models: list[Path], params: dict, **extra: object
) -> Path:
    doc = {
        "merge_method": method,
        "models": [{"model": str(m)} for m in models],
        "parameters": params,
        **extra,
    }
    if base is not None:
        doc["base_model"] = str(base)
    path.write_text(yaml.safe_dump(doc))
    return path


def peak_rss_of(cmd: list[str]) -> int:
    """Peak RSS (bytes) of a fresh child process running cmd."""
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


@pytest.mark.slow
def test_peak_rss_is_independent_of_model_size(tmp_path: Path) -> None:
    """Same largest tensor, 1 layer vs 24 layers (~17x more data): the peak RSS of the big merge
    stays within (n + 4) x the largest tensor in float32 of the small one's, far below its size."""
    n = 3
    kw = dict(
        hidden_size=512, intermediate_size=1024, vocab_size=1024, num_attention_heads=8, num_key_value_heads=8
    )
    peaks = {}
    sizes = {}
    for label, layers in (("small", 1), ("big", 24)):
        base, models = fast_family(tmp_path / label, n, num_hidden_layers=layers, **kw)
        cfg = write_cfg(
            tmp_path / f"{label}.yaml", "ties", base, models, {"density": 0.2, "variant": "paper"}
        )
        # the lower of two runs: a loaded machine's page-cache state can add resident file pages
        peaks[label] = min(
            peak_rss_of([*WM, "merge", str(cfg), str(tmp_path / f"out-{label}-{k}"), "--quiet"])
            for k in range(2)
        )
        sizes[label] = sum(f.stat().st_size for d in [base, *models] for f in d.iterdir())
    largest = 1024 * 512 * 4  # float32 bytes of the largest tensor (embeddings, MLP)
    contract = peaks["small"] + (n + 4) * largest + 48 * 2**20  # + allocator slack
    assert sizes["big"] > 15 * sizes["small"]
    assert peaks["big"] <= contract, (peaks, sizes)


@pytest.mark.slow
def test_killed_merge_leaves_no_output_and_rerun_succeeds(tmp_path: Path) -> None:
    base, models = fast_family(
        tmp_path / "in", 3, num_hidden_layers=12, hidden_size=256, intermediate_size=768, vocab_size=2048
    )
    cfg = write_cfg(tmp_path / "cfg.yaml", "pcb", base, models, {"keep_ratio": 0.2})
    out = tmp_path / "out"
    proc = subprocess.Popen([*WM, "merge", str(cfg), str(out), "--quiet", "--shard-size", "1MB"])
    deadline = time.time() + 60
    scratch: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        scratch = [
            p for p in tmp_path.iterdir() if p.name.startswith(".out") and any(p.glob("*.safetensors"))
        ]
        if scratch:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "merge finished before it could be killed: make the model bigger"
    assert scratch, "no scratch output appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    subprocess.run([*WM, "merge", str(cfg), str(out), "--quiet", "--shard-size", "1MB"], check=True)
    assert (out / "model.safetensors.index.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


MERGEKIT_CASES = [
    ("linear", {"weight": 1.0}, {}),
    ("task_arithmetic", {"weight": 0.5, "lambda": 0.8}, {}),
    ("ties", {"weight": 1.0, "density": 0.3}, {}),
    ("dare_ties", {"weight": 1.0, "density": 1.0}, {}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "params", "extra"), MERGEKIT_CASES, ids=[c[0] for c in MERGEKIT_CASES])
def test_same_tensors_as_mergekit_yaml(tmp_path: Path, method: str, params: dict, extra: dict) -> None:
    require("mergekit")
    exe = Path(sys.executable).parent / "mergekit-yaml"
    if not exe.exists():
        pytest.fail(
            "mergekit-yaml is not installed next to this python (scripts/setup.sh --test installs it)"
        )
    base, models = fast_family(
        tmp_path / "in",
        3,
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        vocab_size=256,
        layout="single",
    )
    # mergekit computes in the input dtype unless told otherwise: float32 inputs and dtype float32
    # make both sides compute in float32.
    # mergekit's linear also averages an unlisted base_model in; ours does not, so give it none.
    cfg = write_cfg(
        tmp_path / "cfg.yaml", method, None if method == "linear" else base, models, params, dtype="float32"
    )
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    subprocess.run([*WM, "merge", str(cfg), str(ours), "--quiet"], check=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(
        [str(exe), str(cfg), str(theirs), "--no-copy-tokenizer", "--quiet", "--random-seed", "0"],
        check=True,
        env=env,
        capture_output=True,
    )
    a, b = load_output(ours), load_output(theirs)
    assert sorted(a) == sorted(b)
    worst = 0.0
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        diff = (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
        scale = b[k].double().abs().max().item() if b[k].numel() else 0.0
        worst = max(worst, diff / max(scale, 1e-30))
    # Bit-identical for ties/task_arithmetic/dare; linear sums in another order (1 ulp).
    limit = 0.0 if method != "linear" else 2.0**-22
    assert worst <= limit, f"{method}: worst relative difference {worst:.3g}"
