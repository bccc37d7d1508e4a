"""Hugging Face model ids in a merge config: read from the Hugging Face cache, offline. The cache
folder is built here in the layout huggingface_hub reads (models--ORG--NAME/refs/main ->
snapshots/COMMIT/...); HF_HUB_OFFLINE=1 so nothing touches the network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_fixtures import fast_family
from weightmerge.cli import main
from weightmerge.config import ConfigError, load_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_model(cache: Path, repo: str, src: Path) -> Path:
    folder = cache / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / COMMIT
    shutil.copytree(src, snap)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, Path]]:
    base, dirs = fast_family(tmp_path / "src", 2, num_hidden_layers=2, layout="single")
    cache = tmp_path / "hub"
    snaps = {
        "org/base": _cache_model(cache, "org/base", base),
        "org/expert-a": _cache_model(cache, "org/expert-a", dirs[0]),
        "org/expert-b": _cache_model(cache, "org/expert-b", dirs[1]),
    }
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path, snaps


def test_hub_ids_come_from_the_cache(
    hub: tuple[Path, dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, snaps = hub
    cfg_path = tmp / "ta.yaml"
    cfg_path.write_text(
        "merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n"
        "  - model: org/expert-a\n  - model: org/expert-b\nparameters: {lambda: 0.5}\n"
    )
    cfg = load_config(cfg_path)
    assert cfg.base_model is not None and Path(cfg.base_model.path) == snaps["org/base"]
    assert [Path(e.model.path) for e in cfg.models] == [snaps["org/expert-a"], snaps["org/expert-b"]]
    assert any("Hugging Face cache" in n for n in cfg.notes)
    assert main(["merge", "-q", str(cfg_path), str(tmp / "out")]) == 0
    out = load_file(str(tmp / "out" / "model.safetensors"))
    b, a1, a2 = (
        load_file(str(snaps[k] / "model.safetensors")) for k in ("org/base", "org/expert-a", "org/expert-b")
    )
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(out[name], b[name] + 0.5 * ((a1[name] - b[name]) + (a2[name] - b[name])), atol=1e-6)
    front = (tmp / "out" / "README.md").read_text().split("---")[1]
    assert "org/base" in front and "org/expert-a" in front and str(tmp) not in front


def test_an_id_not_in_the_cache_is_named(
    hub: tuple[Path, dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, _snaps = hub
    cfg_path = tmp / "ta.yaml"
    cfg_path.write_text(
        "merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n  - model: org/missing\n"
    )
    cfg = load_config(cfg_path)  # validate does not need the weights
    assert sorted(cfg.hub_ids.values()) == ["org/base", "org/missing"]  # cached, and to download
    assert main(["merge", "-q", str(cfg_path), str(tmp / "out")]) == 1
    err = capsys.readouterr().err
    assert "org/missing" in err and "Hugging Face cache" in err


def test_a_local_folder_wins_over_an_id(hub: tuple[Path, dict[str, Path]]) -> None:
    tmp, _snaps = hub
    (tmp / "org" / "base").mkdir(parents=True)
    cfg = load_config({"merge_method": "linear", "models": [{"model": "org/base"}]}, base_dir=str(tmp))
    assert cfg.models[0].model.path == str(tmp / "org" / "base") and not cfg.hub_ids
    with pytest.raises(ConfigError):
        load_config({"merge_method": "linear", "models": [{"model": "org/base+x+y"}]}, base_dir=str(tmp))


def test_relative_paths_as_mergekit_reads_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mergekit reads a YAML's relative paths from the current directory; a path found only next to
    the config file is still read (noted); one that names two different folders is an error."""
    (tmp_path / "cfgdir").mkdir()
    (tmp_path / "run").mkdir()
    cfg = tmp_path / "cfgdir" / "m.yaml"
    cfg.write_text("merge_method: linear\nmodels:\n  - model: a\n  - model: b\n")
    (tmp_path / "run" / "a").mkdir()  # a: only in the current directory (mergekit's reading)
    (tmp_path / "cfgdir" / "b").mkdir()  # b: only next to the config file
    monkeypatch.chdir(tmp_path / "run")
    c = load_config(cfg)
    assert [e.model.path for e in c.models] == [str(tmp_path / "run" / "a"), str(tmp_path / "cfgdir" / "b")]
    assert any("relative to the config file" in n and "'b'" in n for n in c.notes)
    (tmp_path / "cfgdir" / "a").mkdir()  # now a names two folders
    with pytest.raises(ConfigError, match="two different things"):
        load_config(cfg)
