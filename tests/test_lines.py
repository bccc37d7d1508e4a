"""LiNeS: the per-block scaling of the merged task vector, against a literal reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from weightmerge.api import merge_state_dicts
from weightmerge.methods.lines import block_index

F64 = torch.float64
NAMES = {
    "model.embed_tokens.weight": (10, 6),
    "model.layers.0.mlp.up_proj.weight": (8, 6),
    "model.layers.0.input_layernorm.weight": (6,),
    "model.layers.1.self_attn.q_proj.weight": (6, 6),
    "model.layers.2.mlp.down_proj.weight": (6, 8),
    "model.norm.weight": (6,),
    "lm_head.weight": (10, 6),
}


def scales_by_hand(alpha: float, beta: float) -> dict[str, float]:
    """L = 3 blocks: block l gets alpha + beta * l / 2; the embedding alpha, norm and head alpha + beta."""
    return {
        "model.embed_tokens.weight": alpha,
        "model.layers.0.mlp.up_proj.weight": alpha,
        "model.layers.0.input_layernorm.weight": alpha,
        "model.layers.1.self_attn.q_proj.weight": alpha + beta / 2,
        "model.layers.2.mlp.down_proj.weight": alpha + beta,
        "model.norm.weight": alpha + beta,
        "lm_head.weight": alpha + beta,
    }


def family(n: int):
    g = torch.Generator().manual_seed(5)
    base = {k: torch.randn(s, generator=g, dtype=F64) for k, s in NAMES.items()}
    models = [
        {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in base.items()}
        for _ in range(n)
    ]
    return base, models


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {"lambda": 1.0}),
        ("ties", {"density": 0.4}),
        ("pcb", {"keep_ratio": 0.3}),
        ("tsv_m", {}),
    ],
)
@pytest.mark.parametrize("blocks", [None, 3])
def test_lines_matches_literal_reference(method: str, params: dict, blocks: int | None) -> None:
    base, models = family(3)
    plain = merge_state_dicts(base, models, method, params, compute_dtype=F64)
    lines = {"lines_alpha": 0.3, "lines_beta": 0.9}
    if blocks is not None:
        lines["lines_blocks"] = blocks
    got = merge_state_dicts(base, models, method, {**params, **lines}, compute_dtype=F64)
    for name, s in scales_by_hand(0.3, 0.9).items():
        want = base[name] + s * (plain[name] - base[name])
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-14, msg=name)


def test_alpha_one_beta_zero_is_the_method() -> None:
    base, models = family(2)
    plain = merge_state_dicts(base, models, "task_arithmetic", {"lambda": 0.5}, compute_dtype=F64)
    got = merge_state_dicts(
        base, models, "task_arithmetic", {"lambda": 0.5, "lines_alpha": 1.0}, compute_dtype=F64
    )
    for k in base:
        torch.testing.assert_close(got[k], plain[k], rtol=1e-14, atol=1e-15)


def test_block_index_of_common_layouts() -> None:
    assert block_index("model.layers.7.mlp.up_proj.weight") == 7
    assert block_index("visual.transformer.resblocks.3.attn.in_proj_weight") == 3
    assert block_index("transformer.h.0.attn.c_attn.weight") == 0
    assert block_index("encoder.layer.11.output.dense.weight") == 11
    assert block_index("model.embed_tokens.weight") is None
    assert block_index("shells.0.weight") is None  # "h." must start a name component


def test_parameter_errors() -> None:
    base, models = family(2)
    with pytest.raises(ValueError, match="lines_alpha"):
        merge_state_dicts(base, models, "task_arithmetic", {"lines_beta": 0.5})
    with pytest.raises(ValueError, match="lines_blocks"):
        merge_state_dicts(base, models, "task_arithmetic", {"lines_alpha": 0.5, "lines_blocks": 0})


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {"lines_alpha": 0.4, "lines_beta": 0.6}),
        ("pcb", {"keep_ratio": 0.2, "lines_alpha": 0.4, "lines_beta": 0.6}),
    ],
)
def test_stream_equals_in_memory(tmp_path: Path, method: str, params: dict) -> None:
    from test_engine_stream import assert_same, run_case

    got, expected, _ = run_case(tmp_path, method, params, ("sharded",))
    assert_same(got, expected)
