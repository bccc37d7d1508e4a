"""The streaming engine equals the in-memory API bit for bit, for every method and input layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_fixtures import LAYOUTS, make_family
from weightmerge import merge_state_dicts
from weightmerge.cli import main
from weightmerge.config import load_config
from weightmerge.engine.merge import MergeOptions, merge_config

N = 3

# (method, params) merged through both paths; params as YAML global parameters.
CASES: list[tuple[str, dict]] = [
    ("linear", {"weight": 1.0}),
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.2, "variant": "paper"}),
    ("ties", {"density": 0.3, "scope": "global"}),
    ("dare_linear", {"density": 0.6}),
    ("dare_ties", {"density": 0.5, "rescale": "inverse_keep"}),
    ("pcb", {"keep_ratio": 0.2}),
    ("pcb", {"keep_ratio": 0.2, "scope": "per_tensor", "inter": "C"}),
    ("pcb", {"keep_ratio": 0.3, "dare_drop_rate": 0.3}),
]


def load_output(out: Path) -> dict[str, torch.Tensor]:
    index = out / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(out / f)))
        return sd
    return load_file(str(out / "model.safetensors"))


def run_case(tmp: Path, method: str, params: dict, layouts, dtype=torch.float32, **opts) -> tuple:
    base_dir, dirs, base, experts = make_family(tmp / "in", N, layouts=layouts, dtype=dtype)
    cfg = load_config(
        {
            "merge_method": method,
            "base_model": str(base_dir),
            "models": [{"model": str(d)} for d in dirs],
            "parameters": params,
            "seed": 7,
        }
    )
    out = tmp / "out"
    merge_config(cfg, out, MergeOptions(quiet=True, **opts))
    expected = merge_state_dicts(base, experts, method, params, seed=7)
    return load_output(out), expected, out


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        assert torch.equal(got[k], expected[k]), (
            f"{k}: max diff {(got[k].float() - expected[k].float()).abs().max()}"
        )


@pytest.mark.parametrize(("method", "params"), CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_stream_equals_in_memory_every_method(tmp_path: Path, method: str, params: dict) -> None:
    got, expected, _ = run_case(tmp_path, method, params, ("sharded", "single", "bin", "sharded_bin"))
    assert_same(got, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stream_equals_in_memory_each_layout(tmp_path: Path, layout: str) -> None:
    got, expected, _ = run_case(
        tmp_path, "ties", {"density": 0.2, "variant": "paper"}, (layout,), torch.bfloat16
    )
    assert_same(got, expected)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {"lambda": 0.5}),
        ("ties", {"density": 0.2, "variant": "paper"}),
        ("pcb", {"keep_ratio": 0.1}),
        ("dare_ties", {"density": 0.5, "rescale": "inverse_keep"}),
    ],
)
def test_row_chunked_stream_equals_in_memory(tmp_path: Path, method: str, params: dict) -> None:
    """A memory budget small enough to split every large tensor into row chunks."""
    from weightmerge.engine import plan as plan_mod

    budget = plan_mod.FIXED_OVERHEAD_BYTES + 96 * 32 * 4 * (N + plan_mod.EXTRA_BUFFERS) // 3
    got, expected, _ = run_case(tmp_path, method, params, ("single",), max_memory=budget)
    assert_same(got, expected)


@pytest.mark.parametrize(("method", "params"), CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_cache_chunked_stream_equals_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, params: dict
) -> None:
    """Element-wise methods are split into cache-sized row chunks without any --max-memory; with a
    tiny chunk size every 2-D tensor is split (and ragged last chunks occur), bits unchanged."""
    from weightmerge.engine import plan as plan_mod
    from weightmerge.methods.registry import get_method

    monkeypatch.setattr(plan_mod, "CACHE_CHUNK_ELEMENTS", 160)
    got, expected, _ = run_case(tmp_path, method, params, ("single",))
    assert_same(got, expected)
    base_dir = tmp_path / "in"
    spec = get_method(method)
    cfg = load_config(
        {
            "merge_method": method,
            "base_model": str(base_dir / "base"),
            "models": [{"model": str(p)} for p in sorted(base_dir.glob("expert*"))],
            "parameters": params,
        }
    )
    from weightmerge.engine.merge import open_and_plan

    opened = open_and_plan(cfg)
    try:
        chunked = [t for t in opened.plan.merged if t.chunk_rows is not None]
        if spec.is_row_chunkable(opened.model_params):
            assert chunked, "an element-wise method must be row-chunked"
            assert any(t.shape[0] % t.chunk_rows for t in chunked), "no ragged last chunk exercised"
        else:
            assert not chunked
    finally:
        opened.close()


def test_small_shards_and_sidecar_files(tmp_path: Path) -> None:
    got, expected, out = run_case(
        tmp_path, "task_arithmetic", {"lambda": 0.5}, ("single",), shard_size=20_000
    )
    assert_same(got, expected)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "config.json").exists() and (out / "README.md").exists()
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and "arxiv.org/abs/2212.04089" in card
    again = load_config(str(out / "weightmerge_config.yaml"))
    assert again.merge_method == "task_arithmetic"


def test_fisher_and_regmean_stream_from_statistics_files(tmp_path: Path) -> None:
    base_dir, dirs, base, experts = make_family(tmp_path / "in", N, layouts=("single",))
    g = torch.Generator().manual_seed(3)
    fishers = [{k: torch.rand(v.shape, generator=g) + 0.1 for k, v in e.items()} for e in experts]
    grams = []
    for _e in experts:
        gram = {}
        for k, v in base.items():
            if k.endswith(".weight") and v.dim() == 2 and "embed" not in k:
                a = torch.randn(v.shape[1] * 2, v.shape[1], generator=g)
                gram[k[: -len(".weight")]] = a.T @ a / a.shape[0]
        grams.append(gram)
    for i in range(N):
        save_file(fishers[i], str(tmp_path / f"fisher{i}.safetensors"))
        save_file(grams[i], str(tmp_path / f"gram{i}.safetensors"))
    for method, key, stats in (("fisher", "fisher", fishers), ("regmean", "gram", grams)):
        cfg = load_config(
            {
                "merge_method": method,
                "base_model": str(base_dir),
                "models": [
                    {"model": str(d), "parameters": {key: str(tmp_path / f"{key}{i}.safetensors")}}
                    for i, d in enumerate(dirs)
                ],
            }
        )
        out = tmp_path / f"out-{method}"
        merge_config(cfg, out, MergeOptions(quiet=True))
        expected = merge_state_dicts(base, experts, method, {key: stats})
        assert_same(load_output(out), expected)


def test_cli_merge_plan_and_refuses_existing_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base_dir, dirs, _, _ = make_family(tmp_path / "in", 2, layouts=("single",))
    cfg = tmp_path / "cfg.yaml"
    models = "\n".join(f"  - model: {d}" for d in dirs)
    cfg.write_text(
        f"merge_method: ties\nbase_model: {base_dir}\nmodels:\n{models}\nparameters:\n  density: 0.5\n"
    )
    assert main(["plan", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "estimated peak memory" in text and "ties" in text
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 0
    assert (out / "model.safetensors").exists()
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["merge", str(cfg), str(out), "--quiet", "--force"]) == 0


def test_plan_reports_shape_mismatch_naming_file_and_tensor(tmp_path: Path) -> None:
    base_dir, dirs, _, experts = make_family(tmp_path / "in", 2, layouts=("single",))
    bad = dict(experts[1])
    bad["model.norm.weight"] = torch.ones(7)
    save_file(bad, str(dirs[1] / "model.safetensors"))
    cfg = load_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base_dir),
            "models": [{"model": str(d)} for d in dirs],
        }
    )
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*expert1"):
        merge_config(cfg, tmp_path / "out", MergeOptions(quiet=True))
    assert not (tmp_path / "out").exists()


def test_tied_embeddings_model_loads_with_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    base_dir, dirs, base, experts = make_family(
        tmp_path / "in", 2, layouts=("single",), tie_word_embeddings=True
    )
    cfg = load_config(
        {
            "merge_method": "ties",
            "base_model": str(base_dir),
            "models": [{"model": str(d)} for d in dirs],
            "parameters": {"density": 0.5},
        }
    )
    out = tmp_path / "out"
    merge_config(cfg, out, MergeOptions(quiet=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    merged = merge_state_dicts(base, experts, "ties", {"density": 0.5})
    assert "lm_head.weight" not in load_output(out)
    assert torch.equal(model.lm_head.weight, merged["model.embed_tokens.weight"])


@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.4}), ("pcb", {"keep_ratio": 0.2})])
def test_cli_merge_loads_with_transformers_and_gives_the_in_memory_logits(
    tmp_path: Path, method: str, params: dict
) -> None:
    """End to end: a tiny random Llama (built from a transformers config) merged by the CLI from
    mixed layouts; the output loads with AutoModelForCausalLM and gives exactly the logits of a
    model holding the in-memory merged state dict."""
    transformers = pytest.importorskip("transformers")
    from ckpt_fixtures import tiny_llama_config

    base_dir, dirs, base, experts = make_family(tmp_path / "in", N, layouts=("sharded", "bin", "single"))
    cfg = tmp_path / "cfg.yaml"
    models = "\n".join(f"  - model: {d}" for d in dirs)
    lines = "\n".join(f"  {k}: {v}" for k, v in params.items())
    cfg.write_text(
        f"merge_method: {method}\nbase_model: {base_dir}\nmodels:\n{models}\nparameters:\n{lines}\n"
    )
    out = tmp_path / "out"
    assert main(["merge", str(cfg), str(out), "-q", "--shard-size", "40KB"]) == 0
    assert (out / "model.safetensors.index.json").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    reference = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    merged = merge_state_dicts(base, experts, method, params)
    assert isinstance(merged, dict)
    reference.load_state_dict(merged)
    ids = torch.tensor([[1, 5, 9, 3, 40, 77]])
    with torch.no_grad():
        got, want = loaded(ids).logits, reference(ids).logits
    assert torch.equal(got, want)
    assert not torch.equal(want, transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))(ids).logits)
