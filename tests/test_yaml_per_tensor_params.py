"""Required parameters set per tensor (gradients, filter lists) through the YAML path:
``weightmerge validate``, ``plan`` and ``merge`` on a tiny checkpoint, compared bit for bit with
mergekit 0.1.5 merging the same config (slerp and nearswap need ``t``; mergekit's gradient-slerp
example sets it only through filters and gradients)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_fixtures import fast_family
from conftest import require
from weightmerge.cli import main
from weightmerge.config import ConfigError, load_config

T_FILTERED = """
  t:
    - filter: self_attn
      value: [0, 0.5, 1]
    - filter: mlp
      value: [1, 0.5, 0]
    - value: 0.5
"""
T_GRADIENT = """
  t: [0, 0.3, 1]
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("family")
    base, dirs = fast_family(root, 1, num_hidden_layers=3, layout="single")
    return base, dirs[0]


def _config(tmp: Path, family: tuple[Path, Path], method: str, params: str) -> Path:
    base, model = family
    path = tmp / "merge.yaml"
    path.write_text(
        f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {model}\n"
        f"dtype: float32\nparameters:{params}"
    )
    return path


def _mergekit(cfg_path: Path, out: Path) -> dict[str, torch.Tensor]:
    require("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    doc = yaml.safe_load(cfg_path.read_text())
    run_merge(MergeConfiguration.model_validate(doc), str(out), options=MergeOptions(quiet=True))
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("method", ["slerp", "nearswap"])
@pytest.mark.parametrize("params", [T_FILTERED, T_GRADIENT], ids=["filters", "gradient"])
def test_validate_plan_merge_equal_mergekit(
    tmp_path: Path, family: tuple[Path, Path], method: str, params: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if method == "nearswap":
        params = params.replace("0.5", "0.002").replace("0.3", "0.001")
    cfg = _config(tmp_path, family, method, params)
    assert main(["validate", str(cfg)]) == 0
    assert main(["plan", str(cfg)]) == 0
    assert main(["merge", "-q", str(cfg), str(tmp_path / "ours")]) == 0
    capsys.readouterr()
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    theirs = _mergekit(cfg, tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    # the settings really vary: an attention and an MLP tensor of layer 0 differ in t
    base = load_file(str(family[0] / "model.safetensors"))
    if method == "slerp" and params is T_FILTERED:
        assert torch.equal(
            ours["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
        )
        assert not torch.equal(
            ours["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
        )


def test_a_filter_list_without_catch_all_is_refused_by_validate(
    tmp_path: Path, family: tuple[Path, Path]
) -> None:
    # tensors outside every filter (embeddings, norms, lm_head) would have no t
    cfg = _config(tmp_path, family, "slerp", "\n  t:\n    - filter: self_attn\n      value: 0.5\n")
    with pytest.raises(ConfigError, match="needs parameter 't'"):
        load_config(cfg)


def test_a_required_parameter_set_nowhere_is_refused_by_validate(
    tmp_path: Path, family: tuple[Path, Path]
) -> None:
    cfg = _config(tmp_path, family, "slerp", " {}\n")
    with pytest.raises(ConfigError, match="needs parameter 't'"):
        load_config(cfg)
