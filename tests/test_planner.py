"""One planner for in-memory and streamed merges: the same result or the same error, and the
method's plan-time rules reported before any tensor data is read (also by `weightmerge validate`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from weightmerge import merge_state_dicts
from weightmerge.cli import main
from weightmerge.config import load_config
from weightmerge.engine.merge import MergeOptions, merge_config
from weightmerge.engine.plan import build_plan
from weightmerge.io.memory import DictSource
from weightmerge.methods._params import resolve_params
from weightmerge.methods.registry import get_method


def _save(root: Path, name: str, sd: dict[str, torch.Tensor]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    save_file(sd, str(d / "model.safetensors"))
    return d


def _cfg(root: Path, method: str, params: dict, n: int) -> dict:
    return {
        "merge_method": method,
        "base_model": str(root / "base"),
        "models": [{"model": str(root / f"m{i}")} for i in range(n)],
        "parameters": params,
    }


def _both_errors(
    tmp_path: Path, base: dict, models: list[dict], method: str, params: dict
) -> tuple[str, str]:
    """The error messages of the in-memory and the streamed merge of the same input."""
    _save(tmp_path, "base", base)
    for i, m in enumerate(models):
        _save(tmp_path, f"m{i}", m)
    with pytest.raises(ValueError) as mem:
        merge_state_dicts(base, models, method, params)
    with pytest.raises(ValueError) as streamed:
        merge_config(
            load_config(_cfg(tmp_path, method, params, len(models))),
            tmp_path / "out",
            MergeOptions(quiet=True),
        )
    assert not (tmp_path / "out").exists()
    return str(mem.value), str(streamed.value)


def test_tensor_missing_from_one_model_is_the_same_error(tmp_path: Path) -> None:
    """Base has b, model 1 has b, model 2 lacks it: both paths refuse, naming the model and tensor
    (the in-memory path used to keep b at the base value without a word)."""
    base = {"a": torch.zeros(3), "b": torch.zeros(3)}
    models = [{"a": torch.ones(3), "b": torch.ones(3)}, {"a": torch.ones(3)}]
    mem, streamed = _both_errors(tmp_path, base, models, "task_arithmetic", {})
    assert "lacks tensor 'b' that the base model" in mem
    assert "lacks tensor 'b' that the base model" in streamed
    assert "<models[1]>" in mem and str(tmp_path / "m1") in streamed


def test_extra_tensor_and_shape_mismatch_are_the_same_error(tmp_path: Path) -> None:
    base = {"a": torch.zeros(3)}
    mem, streamed = _both_errors(
        tmp_path / "x", base, [{"a": torch.ones(3), "z": torch.ones(1)}], "linear", {}
    )
    assert "has tensor 'z'" in mem and "has tensor 'z'" in streamed
    mem, streamed = _both_errors(tmp_path / "y", base, [{"a": torch.ones(4)}], "linear", {})
    assert "tensor 'a': shape [4]" in mem and "tensor 'a': shape [4]" in streamed


def test_non_floating_buffer_mismatch_is_the_same_error(tmp_path: Path) -> None:
    base = {"a": torch.zeros(3), "ids": torch.arange(3)}
    models = [{"a": torch.ones(3), "ids": torch.arange(3) + 1}]
    mem, streamed = _both_errors(tmp_path, base, models, "linear", {})
    assert "non-floating tensor 'ids' differs" in mem and "non-floating tensor 'ids' differs" in streamed


def test_tied_embedding_is_read_the_same_way(tmp_path: Path) -> None:
    """A model that ties lm_head to its embedding: both paths read the embedding for it."""
    g = torch.Generator().manual_seed(0)
    emb = "model.embed_tokens.weight"
    base = {emb: torch.randn(4, 3, generator=g), "lm_head.weight": torch.randn(4, 3, generator=g)}
    models = [{emb: torch.randn(4, 3, generator=g)}, {k: torch.randn(4, 3, generator=g) for k in base}]
    for name, sd in [("base", base), ("m0", models[0]), ("m1", models[1])]:
        _save(tmp_path, name, sd)
    mem = merge_state_dicts(base, models, "task_arithmetic", {"lambda": 0.5})
    merge_config(
        load_config(_cfg(tmp_path, "task_arithmetic", {"lambda": 0.5}, 2)),
        tmp_path / "out",
        MergeOptions(quiet=True),
    )
    from safetensors.torch import load_file

    streamed = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(mem) == set(streamed) == set(base)
    for k in base:
        assert torch.equal(mem[k], streamed[k]), k
    expected = (
        base["lm_head.weight"]
        + 0.5 * (models[0][emb] - base["lm_head.weight"])
        + 0.5 * (models[1]["lm_head.weight"] - base["lm_head.weight"])
    )
    torch.testing.assert_close(mem["lm_head.weight"], expected)


@pytest.mark.parametrize(
    ("method", "base", "n", "match"),
    [
        ("linear", True, 0, "no models to merge"),
        ("task_arithmetic", False, 2, "needs a base model"),
        ("model_stock", True, 1, "needs at least 2 models"),
        ("slerp", True, 2, "takes at most 1 models"),
    ],
)
def test_input_count_errors_come_from_one_place(method: str, base: bool, n: int, match: str) -> None:
    """The same check (``engine.plan.check_model_counts``) answers the in-memory API and the planner."""
    t = {"a": torch.zeros(3)}
    params = {"t": 0.5} if method == "slerp" else {}
    with pytest.raises(ValueError, match=match):
        merge_state_dicts(t if base else None, [t] * n, method, params)
    spec = get_method(method)
    with pytest.raises(ValueError, match=match):
        build_plan(
            spec,
            DictSource(t) if base else None,
            [DictSource(t)] * n,
            model_params=resolve_params(spec, params, n),
        )


class _NoData(DictSource):
    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        raise AssertionError(f"tensor data of {name!r} read at plan time")


def test_global_ties_with_a_per_tensor_density_is_refused_at_plan_time() -> None:
    spec = get_method("ties")
    shapes = {"model.layers.0.w": (4, 4), "model.layers.1.w": (4, 4)}
    sd = {k: torch.zeros(s) for k, s in shapes.items()}
    model = resolve_params(spec, {"variant": "paper", "density": 0.5}, 2)
    per_tensor = {
        "model.layers.0.w": model,
        "model.layers.1.w": resolve_params(spec, {"variant": "paper", "density": 0.3}, 2),
    }
    with pytest.raises(ValueError, match=r"density varies per tensor \(tensor 'model.layers.1.w'\)"):
        build_plan(
            spec,
            _NoData(sd),
            [_NoData(sd), _NoData(sd)],
            model_params=model,
            tensor_params=lambda names: {k: per_tensor[k] for k in names},
        )
    # per-tensor scope takes a density per tensor
    ok = resolve_params(spec, {"variant": "paper", "scope": "per_tensor", "density": 0.5}, 2)
    plan = build_plan(
        spec, _NoData(sd), [_NoData(sd)] * 2, model_params=ok, tensor_params=lambda n: dict.fromkeys(n, ok)
    )
    assert [t.name for t in plan.merged] == sorted(shapes)


def _write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_validate_and_plan_refuse_global_ties_with_a_density_gradient(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sd = {f"model.layers.{i}.w": torch.zeros(2, 2) for i in range(3)}
    for name in ("base", "m0", "m1"):
        _save(tmp_path, name, sd)
    doc = _cfg(tmp_path, "ties", {"variant": "paper", "density": [0.2, 0.8]}, 2)
    config = _write_yaml(tmp_path / "merge.yaml", doc)
    for cmd in ("validate", "plan"):
        assert main([cmd, str(config)]) == 1
        err = capsys.readouterr().err
        assert "density varies per tensor" in err and "scope: per_tensor" in err, err
    doc["parameters"]["scope"] = "per_tensor"
    assert main(["validate", str(_write_yaml(tmp_path / "ok.yaml", doc))]) == 0
