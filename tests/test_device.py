"""Where the arithmetic runs (``--device`` / ``device=``): resolution, errors before any work, and,
on a machine with a CUDA GPU, GPU results against the CPU's (skipped where torch sees no GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckpt_fixtures import make_family
from weightmerge import merge_state_dicts
from weightmerge.cli import main
from weightmerge.device import resolve_device
from weightmerge.emr.result import EMRResult

CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()


def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_is_the_cpu_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    no_cuda(monkeypatch)
    assert resolve_device("auto") == CPU
    assert resolve_device(" Auto ") == CPU
    assert resolve_device(None) == CPU


def test_auto_is_the_gpu_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(None) == torch.device("cuda")


def test_explicit_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 1)  # an explicit cpu stays the cpu
    assert resolve_device("cpu") == CPU
    assert resolve_device("CPU") == CPU
    assert resolve_device(CPU) == CPU


@pytest.mark.parametrize("name", ["gpu", "tpu", "", "cuda:x"])
def test_unknown_device_names(name: str) -> None:
    with pytest.raises(ValueError, match="is not one of auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_devices_torch_knows_but_we_do_not_support() -> None:
    with pytest.raises(ValueError, match="'meta' is not supported"):
        resolve_device("meta")


def test_cuda_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    no_cuda(monkeypatch)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        resolve_device("cuda")


def test_cuda_index_out_of_range(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"2 CUDA device\(s\), indices 0..1"):
        resolve_device("cuda:2")


def _small(seed: int = 0, n: int = 3) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (12, 10), "a.bias": (12,), "b.weight": (7, 12), "s": ()}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, models


def test_api_on_the_cpu_is_the_default() -> None:
    base, models = _small()
    for method, params in [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5})]:
        a = merge_state_dicts(base, models, method, params, seed=3)
        b = merge_state_dicts(base, models, method, params, seed=3, device="cpu")
        assert isinstance(a, dict) and isinstance(b, dict)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_api_refuses_cuda_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    no_cuda(monkeypatch)
    base, models = _small()
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        merge_state_dicts(base, models, "task_arithmetic", device="cuda")


def test_cli_refuses_cuda_without_a_gpu_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_cuda(monkeypatch)
    base_dir, dirs, _, _ = make_family(tmp_path / "in", 2, layouts=("single",))
    cfg = tmp_path / "cfg.yaml"
    models = "\n".join(f"  - model: {d}" for d in dirs)
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base_dir}\nmodels:\n{models}\n")
    out = tmp_path / "out"
    capsys.readouterr()  # what building the fixture printed
    assert main(["merge", str(cfg), str(out), "--device", "cuda", "-q"]) == 1
    err = capsys.readouterr().err
    assert "torch sees no CUDA GPU" in err and err.count("\n") == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "-q"]) == 0  # the same config runs
    assert (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists()


# --- on a CUDA machine: GPU results against the CPU's --------------------------------------------

GPU_CASES: list[tuple[str, dict]] = [
    ("linear", {}),
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.2, "variant": "paper", "scope": "global"}),
    ("dare_linear", {"density": 0.6}),
    ("dare_ties", {"density": 0.5, "rescale": "inverse_keep"}),
    ("pcb", {"keep_ratio": 0.2}),
    ("pcb", {"keep_ratio": 0.3, "dare_drop_rate": 0.3, "scope": "per_tensor"}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
    ("model_stock", {}),
    ("karcher", {}),
]
GPU_IDS = [f"{m}-{i}" for i, (m, _) in enumerate(GPU_CASES)]


@pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA GPU on this machine")
@pytest.mark.parametrize(
    ("method", "params"), GPU_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(GPU_CASES)]
)
def test_gpu_matches_the_cpu(method: str, params: dict) -> None:
    base, models = _small(seed=5)
    cpu = merge_state_dicts(base, models, method, params, seed=1, device="cpu")
    gpu = merge_state_dicts(base, models, method, params, seed=1, device="cuda")
    assert isinstance(cpu, dict) and isinstance(gpu, dict) and sorted(cpu) == sorted(gpu)
    for k in cpu:
        assert gpu[k].device == CPU and gpu[k].dtype == cpu[k].dtype
        # element-wise steps are exact IEEE operations on both; reductions may round differently
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA GPU on this machine")
@pytest.mark.parametrize("rescale", ["per_tensor_mean", "global"])
def test_gpu_emr_matches_the_cpu(rescale: str) -> None:
    base, models = _small(seed=6)
    cpu = merge_state_dicts(base, models, "emr", {"rescale": rescale}, device="cpu")
    gpu = merge_state_dicts(base, models, "emr", {"rescale": rescale}, device="cuda")
    assert isinstance(cpu, EMRResult) and isinstance(gpu, EMRResult)
    for k in cpu.unified:
        assert torch.equal(gpu.unified[k], cpu.unified[k])
        assert all(torch.equal(g[k], c[k]) for g, c in zip(gpu.masks, cpu.masks, strict=True))
    assert gpu.rescalers == pytest.approx(cpu.rescalers, rel=1e-6)
