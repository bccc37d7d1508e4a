"""Medium: a PEFT adapter's lora_alpha of NaN / infinity / a string is refused (it would fold into an
all-NaN weight), naming the adapter and the module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightmerge.io.sources import open_source

P = "base_model.model."


def write_pair(tmp_path: Path, alpha: object) -> tuple[Path, Path]:
    base = tmp_path / "base"
    base.mkdir()
    save_file(
        {"q_proj.weight": torch.ones(4, 4), "norm.weight": torch.ones(4)}, str(base / "model.safetensors")
    )
    ad = tmp_path / "adapter"
    ad.mkdir()
    save_file(
        {f"{P}q_proj.lora_A.weight": torch.ones(2, 4), f"{P}q_proj.lora_B.weight": torch.ones(4, 2)},
        str(ad / "adapter_model.safetensors"),
    )
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": alpha}))
    return base, ad


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "8", True])
def test_bad_lora_alpha_is_refused(tmp_path: Path, alpha: object) -> None:
    base, ad = write_pair(tmp_path, alpha)
    with pytest.raises(ValueError, match=r"module 'q_proj' has lora_alpha .* not a finite number"):
        src = open_source(str(ad), base=open_source(str(base)))
        src.read("q_proj.weight")


def test_finite_lora_alpha_folds(tmp_path: Path) -> None:
    base, ad = write_pair(tmp_path, 4)
    src = open_source(str(ad), base=open_source(str(base)))
    # W + (B @ A) * alpha / r = 1 + 2 * 4 / 2
    assert torch.equal(src.read("q_proj.weight"), torch.full((4, 4), 5.0))
