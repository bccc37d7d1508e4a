"""Reduced end-to-end run of the evaluation harness (tiny random BERT, synthetic tasks, tiny sizes)
through the CLI, and the pipeline's invariants:

* identical experts merge to the expert (same scores);
* EMR's task reconstruction with a single merged task equals the expert;
* the individual experts' normalised held-in score is exactly 1;
* report.json, report.md and the PNG plots are written;
* a second run reuses the cache (trains nothing, recomputes no statistics, same numbers).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
from weightmerge import merge_state_dicts
from weightmerge.cli import main
from weightmerge.emr.result import EMRResult
from weightmerge.eval.config import parse_config
from weightmerge.eval.model import load_encoder
from weightmerge.eval.runner import merge_and_score, prepare_seed, reference_rows
from weightmerge.eval.tasks import make_task, register_task

pytestmark = pytest.mark.slow  # ~40 s in all (mostly importing transformers and matplotlib)

SIZES = {"n_train": 48, "n_val": 24, "n_test": 32}


def _words(rng: random.Random, letters: str, n: int) -> str:
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 5))) for _ in range(n))


def _builder(name: str, pools: dict[str, str], head: str | None = None, n_words: tuple[int, int] = (2, 6)):
    def build(*, seed: int, n_train: int, n_val: int, n_test: int):
        rng = random.Random(f"{name}-pool")
        texts = {
            label: {_words(rng, letters, rng.randint(*n_words)) for _ in range(200)}
            for label, letters in pools.items()
        }
        return make_task(
            name=name,
            label_names=list(pools),
            texts_by_label=texts,
            seed=seed,
            n_train=n_train,
            n_val=n_val,
            n_test=n_test,
            description=f"synthetic {name}",
            source="tests/test_eval_smoke.py",
            head=head,
        )

    return build


register_task("smoke_letters", _builder("smoke_letters", {"abc": "abc", "xyz": "xyz"}), replace=True)
register_task(
    "smoke_digits", _builder("smoke_digits", {"low": "0123", "high": "6789", "mix": "05a9"}), replace=True
)
register_task(
    "smoke_vowels", _builder("smoke_vowels", {"vowel": "aeiou", "consonant": "bdfgk"}), replace=True
)
register_task(
    "smoke_letters_long",
    _builder("smoke_letters_long", {"abc": "abc", "xyz": "xyz"}, head="smoke_letters", n_words=(7, 10)),
    replace=True,
)
register_task("smoke_probe", _builder("smoke_probe", {"p": "pqr", "m": "mno"}), replace=True)

METHODS = [
    {"method": "linear", "label": "average"},
    {"method": "task_arithmetic", "params": {"lambda": 0.5}, "grid": {"lambda": [0.5, 1.0]}},
    {"method": "ties", "params": {"density": 0.5}},
    {"method": "dare_ties", "params": {"density": 0.7, "lambda": 0.5}},
    {"method": "pcb", "params": {"keep_ratio": 0.2}},
    {"method": "emr"},
    {"method": "fisher"},
    {"method": "regmean", "params": {"reduce_non_diagonal_ratio": 0.9}, "dtype": "float64"},
]


def _config_doc(tmp: Path) -> dict:
    return {
        "name": "smoke",
        "model": "tiny-random",
        "tasks": ["smoke_letters", "smoke_digits", "smoke_vowels"],
        "held_out": ["smoke_letters_long", "smoke_probe"],
        "seeds": [0, 1],
        "sizes": {"train": SIZES["n_train"], "validation": SIZES["n_val"], "test": SIZES["n_test"]},
        "training": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "head_lr": 1e-2, "max_length": 32},
        "stats": {"fisher_examples": 16, "gram_examples": 32, "batch_size": 8},
        "few_shot": 4,
        "n_experts": [1, 2],
        "methods": METHODS,
        "output_dir": str(tmp / "out"),
        "cache_dir": str(tmp / "cache"),
        # recompute every merge of the second run from the cached experts (the run cache would
        # load the first run's numbers instead; tests/test_eval_scale.py covers it)
        "reuse_runs": False,
    }


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import yaml

    tmp = tmp_path_factory.mktemp("smoke")
    cfg_path = tmp / "smoke.yaml"
    cfg_path.write_text(yaml.safe_dump(_config_doc(tmp)), encoding="utf-8")
    rc = main(["eval", str(cfg_path), "--no-progress", "-q"])
    assert rc == 0
    first = json.loads((tmp / "out" / "report.json").read_text())
    rc = main(["eval", str(cfg_path), "--no-progress", "-q", "--output-dir", str(tmp / "out2")])
    assert rc == 0
    second = json.loads((tmp / "out2" / "report.json").read_text())
    return {"tmp": tmp, "first": first, "second": second}


def test_outputs_written(smoke_run: dict) -> None:
    out = smoke_run["tmp"] / "out"
    for name in ("normalized_held_in", "per_task_radar", "experts_sweep", "held_out_vs_held_in"):
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    md = (out / "report.md").read_text()
    for label in ("individual", "average", "task_arithmetic (tuned)", "emr", "fisher", "regmean", "base"):
        assert f"| {label} |" in md, label
    man = smoke_run["first"]["manifest"]
    assert man["seeds"] == [0, 1] and len(man["config_hash"]) == 64 and man["torch"] == torch.__version__


def test_individual_normalised_is_one(smoke_run: dict) -> None:
    for seed in smoke_run["first"]["per_seed"]:
        row = seed["rows"]["individual"]
        assert all(v == 1.0 for v in row["normalized"].values())
        assert row["normalized_avg"] == 1.0
        for t, e in seed["experts"].items():
            assert row["held_in"][t] == e["test_accuracy"]


def test_every_number_is_finite_and_in_range(smoke_run: dict) -> None:
    for seed in smoke_run["first"]["per_seed"]:
        for label, row in seed["rows"].items():
            for t, acc in row["held_in"].items():
                assert 0.0 <= acc <= 1.0, (label, t)
            assert row["held_out"]["smoke_letters_long"] is not None, label
        # few-shot held-out tasks have no task model for EMR / individual experts
        assert seed["rows"]["emr"]["held_out"]["smoke_probe"] is None
        assert seed["rows"]["average"]["held_out"]["smoke_probe"] is not None


def test_tuned_row_is_best_on_validation(smoke_run: dict) -> None:
    for seed in smoke_run["first"]["per_seed"]:
        grid = seed["grids"]["task_arithmetic"]
        assert [p["params"] for p in grid] == [{"lambda": 0.5}, {"lambda": 1.0}]
        tuned = seed["rows"]["task_arithmetic (tuned)"]
        assert tuned["validation_normalized_avg"] == max(p["validation_normalized_avg"] for p in grid)


def test_sweep_sizes(smoke_run: dict) -> None:
    for seed in smoke_run["first"]["per_seed"]:
        sweep = seed["sweep"]["emr"]
        assert sorted(sweep) == ["1", "2", "3"]
        assert all(len(r["tasks"]) == 1 for r in sweep["1"])
        # EMR of a single expert reconstructs it (see test_emr_single_task_reconstructs_the_expert)
        assert all(r["normalized_avg"] == 1.0 for r in sweep["1"])


def test_second_run_reuses_the_cache(smoke_run: dict) -> None:
    first, second = smoke_run["first"], smoke_run["second"]
    for s1, s2 in zip(first["per_seed"], second["per_seed"], strict=True):
        assert not any(e["cached"] for e in s1["experts"].values())
        assert all(e["cached"] for e in s2["experts"].values())
        assert s2["stats_cached"] and all(s2["stats_cached"].values())
        assert s1["rows"].keys() == s2["rows"].keys()
        for label in s1["rows"]:
            assert s1["rows"][label]["held_in"] == s2["rows"][label]["held_in"], label
            assert s1["rows"][label]["held_out"] == s2["rows"][label]["held_out"], label


@pytest.fixture(scope="module")
def ctx(smoke_run: dict):
    tmp = smoke_run["tmp"]
    cfg = parse_config(_config_doc(tmp))
    encoder = load_encoder(cfg.model, cache_dir=tmp / "cache")
    c = prepare_seed(cfg, encoder, 0, cache_dir=tmp / "cache", progress=False, log=lambda _m: None)
    assert all(e.cached for e in c.experts.values())
    reference_rows(c)
    return c


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


@pytest.mark.parametrize(
    ("method", "params", "dtype"),
    [
        ("linear", {}, "float32"),
        ("task_arithmetic", {"lambda": 0.5}, "float32"),
        ("ties", {"density": 1.0}, "float32"),
        ("emr", {}, "float32"),
        ("fisher", {}, "float32"),
        # the tiny model's Gram matrices have condition numbers up to 1e8 (LayerNorm outputs are
        # nearly rank-deficient): float32 solves are off by up to 2e-2, float64 by 1e-8
        ("regmean", {}, "float64"),
    ],
)
def test_identical_experts_merge_to_the_expert(ctx, method: str, params: dict, dtype: str) -> None:
    a = ctx.experts["smoke_letters"]
    saved = ctx.experts["smoke_digits"]
    stats_saved = dict(ctx.stats)
    # a second "expert" with the same body as smoke_letters (and its own head): merging the two
    # bodies must give smoke_letters' body back, so its task scores exactly as its expert
    ctx.experts["smoke_digits"] = dataclasses.replace(saved, body=a.body)
    for kind in ("fisher", "gram"):
        if (kind, "smoke_letters") in ctx.stats:
            ctx.stats[(kind, "smoke_digits")] = ctx.stats[(kind, "smoke_letters")]
    try:
        from weightmerge.eval.runner import merge_params

        full = merge_params(ctx, method, params, ["smoke_letters", "smoke_digits"])
        merged = merge_state_dicts(
            ctx.encoder.base_state,
            [a.body, a.body],
            method,
            full,
            seed=0,
            compute_dtype=getattr(torch, dtype),
        )
        if isinstance(merged, EMRResult):
            assert _max_diff(merged.task_state_dict(0), a.body) < 1e-6
            assert _max_diff(merged.task_state_dict(1), a.body) < 1e-6
        else:
            assert _max_diff(merged, a.body) < 1e-6
        scores, _ = merge_and_score(
            ctx,
            method,
            params,
            tasks=["smoke_letters", "smoke_digits"],
            held_out=[],
            validation=True,
            dtype=dtype,
        )
    finally:
        ctx.experts["smoke_digits"] = saved
        ctx.stats.clear()
        ctx.stats.update(stats_saved)
    assert scores.test["smoke_letters"] == ctx.expert_test["smoke_letters"]
    assert scores.validation["smoke_letters"] == a.val_accuracy


def test_emr_single_task_reconstructs_the_expert(ctx) -> None:
    a = ctx.experts["smoke_letters"]
    merged = merge_state_dicts(ctx.encoder.base_state, [a.body], "emr")
    assert isinstance(merged, EMRResult)
    assert merged.rescalers == [pytest.approx(1.0, abs=1e-6)]
    assert _max_diff(merged.task_state_dict(0), a.body) < 1e-6
    scores, _ = merge_and_score(
        ctx, "emr", {}, tasks=["smoke_letters"], held_out=["smoke_letters_long"], validation=True
    )
    assert scores.test["smoke_letters"] == ctx.expert_test["smoke_letters"]
    assert scores.validation["smoke_letters"] == a.val_accuracy
    individual, _ = reference_rows(ctx)
    assert scores.held_out["smoke_letters_long"] == individual["individual"].held_out["smoke_letters_long"]


def test_base_reference_differs_from_merges(ctx) -> None:
    # the held-out base reference is a probe on base features; the merges are scored with the
    # expert head: the numbers are computed independently (not the same by construction)
    assert set(ctx.base_refs) == {"smoke_letters_long", "smoke_probe"}
    assert all(0.0 <= v <= 1.0 for v in ctx.base_refs.values())


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [smoke_letters]\nmethods: [{method: tiess}]\n")
    assert main(["eval", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "did you mean 'ties'" in err and err.count("\n") == 1
    assert main(["eval", "no-such-builtin"]) == 1
    assert "no built-in eval config" in capsys.readouterr().err


def test_demo_command_runs_its_builtin_config(
    smoke_run: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`weightmerge demo` = the built-in demo config through the same runner (here swapped for the
    smoke config, whose experts are cached, so this runs in seconds)."""
    import weightmerge.eval.config as config_mod

    tmp = smoke_run["tmp"]
    seen: list[str] = []

    def fake_builtin(name: str):
        seen.append(name)
        return parse_config(_config_doc(tmp))

    monkeypatch.setattr(config_mod, "builtin_config", fake_builtin)
    out = tmp / "demo-out"
    assert main(["demo", "--no-progress", "-q", "--seeds", "1", "--output-dir", str(out)]) == 0
    assert seen == ["demo"]
    printed = capsys.readouterr().out
    assert "individual" in printed and "emr" in printed and "norm. held-in" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["manifest"]["seeds"] == [1]
    assert all(e["cached"] for e in report["per_seed"][0]["experts"].values())
    assert main(["demo", "--full", "--no-progress", "-q", "--seeds", "1", "--output-dir", str(out)]) == 0
    assert seen == ["demo", "benchmark"]
