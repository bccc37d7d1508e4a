"""``weightmerge inspect``: numbers computed by hand for a small hand-made checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from io_fixtures import save_layout
from weightmerge.cli import main


def _ckpt(tmp_path: Path, layout: str = "sharded") -> Path:
    sd = {
        "model.embed_tokens.weight": torch.zeros(10, 4),  # 40 params, 160 B
        "model.norm.weight": torch.zeros(4, dtype=torch.bfloat16),  # 4 params, 8 B
        "model.layers.0.w": torch.zeros(3, 5, dtype=torch.float16),  # 15 params, 30 B
        "step": torch.tensor(7),  # 1 param, 8 B (int64)
    }
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": True}
    return save_layout(sd, tmp_path / "m", layout, config=cfg)


def test_inspect_json_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _ckpt(tmp_path)
    assert main(["inspect", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["layout"] == "sharded-safetensors"
    assert s["files"] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert s["architecture"] == "LlamaForCausalLM" and s["model_type"] == "llama"
    assert s["num_tensors"] == 4
    assert s["parameters"] == 40 + 4 + 15 + 1
    assert s["bytes"] == 160 + 8 + 30 + 8
    assert s["bytes_per_dtype"] == {"bfloat16": 8, "float16": 30, "float32": 160, "int64": 8}
    assert s["largest_tensor"] == {"name": "model.embed_tokens.weight", "shape": [10, 4], "bytes": 160}
    assert s["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert [t["name"] for t in s["tensors"]] == sorted(
        ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.w", "step"]
    )
    assert s["tensors"][1] == {"name": "model.layers.0.w", "dtype": "float16", "shape": [3, 5], "bytes": 30}


def test_inspect_text_limits_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _ckpt(tmp_path, "bin")
    assert main(["inspect", str(path), "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "torch-bin (1 file)" in out
    assert "architecture: LlamaForCausalLM" in out
    assert "tensors: 4, parameters: 60, size: 206 B" in out
    assert "model.layers.0.w" in out and "(3, 5)" in out and "30 B" in out
    assert "model.norm.weight" not in out.split("name", 1)[1]
    assert "... 2 more (--all shows every tensor)" in out
    assert main(["inspect", str(path), "--all"]) == 0
    out = capsys.readouterr().out
    assert "model.norm.weight" in out and "(4,)" in out and "more (--all" not in out


def test_inspect_adapter_with_and_without_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    base.mkdir()
    save_file(
        {"model.q.weight": torch.zeros(4, 4), "model.n.weight": torch.zeros(4)},
        str(base / "model.safetensors"),
    )
    ad = tmp_path / "ad"
    ad.mkdir()
    save_file(
        {
            "base_model.model.model.q.lora_A.weight": torch.ones(2, 4),
            "base_model.model.model.q.lora_B.weight": torch.ones(4, 2),
        },
        str(ad / "adapter_model.safetensors"),
    )
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    assert main(["inspect", str(ad), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["layout"] == "peft-adapter" and s["adapter"]["r"] == 2 and s["num_tensors"] == 2
    assert main(["inspect", str(ad), "--base", str(base), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["num_tensors"] == 2 and s["parameters"] == 20
    assert [t["name"] for t in s["tensors"]] == ["model.n.weight", "model.q.weight"]


def test_inspect_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.safetensors: truncated" in err and "Traceback" not in err
