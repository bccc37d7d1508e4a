"""Every example config runs end to end on the checkpoints examples/make_models.py writes."""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import pytest

from weightmerge.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def example_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples")
    for f in EXAMPLES.glob("*.yaml"):
        shutil.copy(f, root / f.name)
    make = runpy.run_path(str(EXAMPLES / "make_models.py"))
    make["main"](["--root", str(root), "--hidden", "32", "--layers", "2"])
    return root


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_example_merges(example_root: Path, name: str) -> None:
    out = example_root / "out" / name
    assert main(["merge", str(example_root / f"{name}.yaml"), str(out), "--quiet"]) == 0
    assert (out / "weightmerge_config.yaml").exists()
    assert any(out.glob("*.safetensors"))
