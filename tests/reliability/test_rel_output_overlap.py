"""High: an output path that overlaps an input is refused before anything is read or written, with
and without --force, and every input stays byte-identical."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rel_fixtures import family, run_cli, save_model, state_dict, tree_digest, write_cfg


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    models = tmp_path / "models"
    base, experts = family(models, 2)
    cfg = write_cfg(tmp_path / "ta.yaml", "task_arithmetic", base, experts, {"weight": 0.5})
    return tmp_path, models, base, experts, cfg


@pytest.mark.parametrize(
    "which",
    ["base", "expert", "parent_of_all", "base_weight_file", "inside_base", "base_via_symlink"],
)
@pytest.mark.parametrize("force", [True, False])
def test_output_overlapping_an_input_is_refused(setup, which: str, force: bool, capsys) -> None:  # type: ignore[no-untyped-def]
    tmp_path, models, base, experts, cfg = setup
    before = tree_digest(models)
    out = {
        "base": base,
        "expert": experts[1],
        "parent_of_all": models,
        "base_weight_file": base / "model.safetensors",
        "inside_base": base / "merged",
    }.get(which)
    if which == "base_via_symlink":
        out = tmp_path / "alias"
        os.symlink(base, out)
    rc, err = run_cli(["merge", str(cfg), str(out), *(["--force"] if force else [])], capsys)
    assert rc == 1
    assert "choose an output outside every input" in err, err
    assert tree_digest(models) == before
    assert (base / "model.safetensors").is_file()
    assert not (base / "merged").exists()


def test_weight_file_linked_from_output_is_refused(setup, capsys) -> None:  # type: ignore[no-untyped-def]
    """An expert whose weight file is a symlink into OUT: replacing OUT would delete its data."""
    tmp_path, _models, base, experts, _cfg = setup
    out = tmp_path / "out"
    save_model(out, state_dict(5))
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "config.json").write_text((base / "config.json").read_text())
    os.symlink(out / "model.safetensors", linked / "model.safetensors")
    cfg2 = write_cfg(tmp_path / "ta2.yaml", "task_arithmetic", base, [experts[0], linked], {"weight": 0.5})
    before = tree_digest(out)
    rc, err = run_cli(["merge", str(cfg2), str(out), "--force"], capsys)
    assert rc == 1 and "outside every input" in err, err
    assert tree_digest(out) == before


def test_disjoint_output_with_force_still_works(setup, capsys) -> None:  # type: ignore[no-untyped-def]
    tmp_path, _models, _base, _experts, cfg = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    rc, err = run_cli(["merge", str(cfg), str(out), "--force", "-q"], capsys)
    assert rc == 0, err
    assert (out / "model.safetensors").is_file() and not (out / "old.txt").exists()
