"""Multi-stage configs (mergekit-multi's format): validate, merge, and the result equals
mergekit-multi's (mergekit 0.1.5) bit for bit; errors for loops, duplicate and missing names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_fixtures import fast_family
from conftest import require
from weightmerge.cli import main
from weightmerge.config import ConfigError
from weightmerge.config.multi import read_stages


def _write(tmp: Path, text: str) -> Path:
    p = tmp / "multi.yaml"
    p.write_text(text)
    return p


def test_two_stages_equal_mergekit_multi(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, dirs = fast_family(tmp_path / "m", 3, num_hidden_layers=2, layout="single")
    cfg = _write(
        tmp_path,
        f"""name: ta
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {dirs[0]}
  - model: {dirs[1]}
parameters: {{lambda: 0.5, weight: 1.0}}
dtype: float32
---
merge_method: slerp
base_model: {dirs[2]}
models:
  - model: ta
parameters: {{t: [0, 0.7]}}
dtype: float32
""",
    )
    assert main(["validate", str(cfg)]) == 0
    assert "reads ['ta']" in capsys.readouterr().out
    assert main(["merge", "-q", str(cfg), str(tmp_path / "ours"), "-I", str(tmp_path / "stages")]) == 0
    assert (tmp_path / "stages" / "ta" / "model.safetensors").is_file()
    require("mergekit")
    from mergekit.scripts.multimerge import main as mergekit_multi

    mergekit_multi.main(
        [str(cfg), "--out-path", str(tmp_path / "theirs"), "-I", str(tmp_path / "mk-stages"),
         "--quiet", "--no-copy-tokenizer"],
        standalone_mode=False,
    )  # fmt: skip
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    theirs = {}
    for f in (tmp_path / "theirs").glob("*.safetensors"):
        theirs.update(load_file(str(f)))
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    # a second run reuses the finished stage
    assert main(["merge", str(cfg), str(tmp_path / "ours2"), "-I", str(tmp_path / "stages")]) == 0
    assert "already holds it" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: a\nmerge_method: linear\nmodels: [{model: b}]\n---\nname: b\nmerge_method: linear\n"
         "models: [{model: a}]\n---\nmerge_method: linear\nmodels: [{model: a}]\n", "loop"),
        ("name: a\nmerge_method: linear\nmodels: [{model: x}]\n---\nname: a\nmerge_method: linear\n"
         "models: [{model: x}]\n", "two stages named 'a'"),
        ("name: a\nmerge_method: linear\nmodels: [{model: x}]\n", "no final stage"),
    ],
)  # fmt: skip
def test_stage_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_stages(str(_write(tmp_path, text)))


def test_a_plain_config_is_not_staged(tmp_path: Path) -> None:
    assert read_stages(str(_write(tmp_path, "merge_method: linear\nmodels: [{model: x}]\n"))) is None
