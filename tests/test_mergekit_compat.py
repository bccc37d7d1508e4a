"""Every example config of mergekit's repository, run by weightmerge and by mergekit-yaml 0.1.5 on
tiny checkpoints with the same tensor names (tests/mergekit_compat.py; the table is
docs/mergekit-compat.md). Also: slices as weightmerge reads them, and mergekit's CLI flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from conftest import require
from mergekit_compat import EXAMPLES, make_models, run_example
from weightmerge.cli import main, mergekit_yaml
from weightmerge.config import ConfigError, load_config

# Compute in float32 on both sides: equal bit for bit, except linear's weighted sum (mergekit sums
# in another order: at most 2 eps of the output's largest value, docs/parity.md).
EXACT_FLOAT32 = {"bio-merge.yml", "gradient-slerp.yml", "orcamini-platy-44layer.yml", "ties.yml"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    require("mergekit")
    return make_models(tmp_path_factory.mktemp("compat"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_mergekit_example(name: str, models: dict[str, str], tmp_path: Path) -> None:
    exact = run_example(name, models, tmp_path / "f32", dtype="float32")
    written = run_example(name, models, tmp_path / "as-written")
    if name == "arcee_fusion.yml":  # a mergekit method weightmerge does not have: said in one line
        assert exact.theirs == "ok" and "unknown merge method 'arcee_fusion'" in exact.ours
        return
    for r in (exact, written):
        assert r.ours == "ok" and r.theirs == "ok", r
        assert r.tensors > 300
    if name in EXACT_FLOAT32:
        assert exact.bit_exact == exact.tensors, exact
    else:
        assert exact.max_ulps <= 2.0, exact
    # as written, mergekit computes in float16 from float16-rounded inputs; weightmerge in float32
    assert written.max_ulps <= WRITTEN_BOUND.get(name, 0.0), written


# As written (float16), mergekit rounds the inputs to float16 and computes in float16; weightmerge
# computes in float32 and rounds once. Bounds in eps of float16 at each tensor's largest value,
# about 1.5x the differences measured (docs/mergekit-compat.md): copies and stacks are exact.
WRITTEN_BOUND = {
    "orcamini-platy-44layer.yml": 0.0,
    "gradient-slerp.yml": 1.5,
    "linear.yml": 1.5,
    "bio-merge.yml": 4.0,
    "ties.yml": 6.0,
}


def test_slices_are_stacked_models(tmp_path: Path) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    cfg = load_config(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "a", "layer_range": [0, 4]}]},
                {"sources": [{"model": "b", "layer_range": [2, 6]}]},
            ],
        },
        base_dir=str(tmp_path),
    )
    [entry] = cfg.models
    assert entry.model.layers == ((str(tmp_path / "a"), 0, 4), (str(tmp_path / "b"), 2, 6))
    again = load_config(cfg.resolved(), base_dir=str(tmp_path))
    assert again.models == cfg.models


def _src(model: str, a: int, b: int) -> dict:
    return {"model": model, "layer_range": [a, b]}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"slices": [{"sources": [_src("a", 0, 4), _src("b", 0, 3)]}]},
         "same number of layers"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [4, 4]}]}]}, "0 <= start < stop"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}], "models": [{"model": "a"}]},
         "not both"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                     {"sources": [_src("a", 0, 2), _src("b", 0, 2)]}]},
         "same number of sources"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}], "residual_weight": 0.5}]},
         "residual_weight"),
    ],
)  # fmt: skip
def test_slice_errors(tmp_path: Path, doc: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"merge_method": "passthrough", **doc}, base_dir=str(tmp_path))


def test_a_gradient_over_several_slices_is_refused(tmp_path: Path) -> None:
    doc = {
        "merge_method": "slerp",
        "base_model": "a",
        "parameters": {"t": [0, 1]},
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]},
            {"sources": [{"model": "a", "layer_range": [2, 4]}, {"model": "b", "layer_range": [2, 4]}]},
        ],
    }
    with pytest.raises(ConfigError, match="restarts it in every slice"):
        load_config(doc, base_dir=str(tmp_path))
    doc["parameters"] = {"t": 0.5}
    cfg = load_config(doc, base_dir=str(tmp_path))
    assert cfg.base_model is not None and cfg.base_model.layers == (
        (str(tmp_path / "a"), 0, 2),
        (str(tmp_path / "a"), 2, 4),
    )


def test_mergekit_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from weightmerge.cli.mergekit_flags import mapped, parse_count, register

    p = argparse.ArgumentParser()
    register(p)
    m = mapped(p.parse_args(["--cuda", "--lazy-unpickle", "-j", "3", "--out-shard-size", "1.5M",
                             "--no-write-model-card", "--random-seed", "7", "--copy-tokenizer"]))  # fmt: skip
    assert (m.device, m.threads, m.shard_params, m.write_card, m.seed, m.copy_tokenizer) == (
        "cuda", 3, 1_500_000, False, 7, True
    )  # fmt: skip
    assert len(m.notes) == 1 and "--lazy-unpickle" in m.notes[0]
    assert parse_count("5B") == 5 * 10**9
    with pytest.raises(ValueError, match="safetensors only"):
        mapped(p.parse_args(["--no-safe-serialization"]))
    # through the command, with an alias entry point named like mergekit's
    (tmp_path / "cfg.yaml").write_text("merge_method: linear\nmodels:\n  - model: nowhere\n")
    assert mergekit_yaml([str(tmp_path / "cfg.yaml"), str(tmp_path / "out"), "--allow-crimes"]) == 1
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an unknown flag is still an argparse error
        main(["merge", "cfg.yaml", "out", "--no-such-flag"])
