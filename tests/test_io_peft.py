"""PEFT adapters folded into the base: against a literal dense reference written here, against
PEFT's own merge_and_unload (when peft is installed), row slices against whole reads, and the
clear refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import require
from weightmerge.io import open_source
from weightmerge.io.peft import BLOCK_ROWS, PeftSource, pattern_value

P = "base_model.model."


# ---- a literal reference ------------------------------------------------------------------------


def ref_product(b: torch.Tensor, a: torch.Tensor) -> list[list[float]]:
    """(B @ A)[i][j] = sum_k B[i][k] A[k][j], in Python floats (double precision)."""
    bl, al = b.double().tolist(), a.double().tolist()
    return [
        [sum(bl[i][k] * al[k][j] for k in range(len(al))) for j in range(len(al[0]))] for i in range(len(bl))
    ]


def ref_lora(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, *, transposed: bool
) -> torch.Tensor:
    d = torch.tensor(ref_product(b, a), dtype=torch.float64)
    d = d.T if transposed else d
    return w.double() + s * d


def ref_dora(merged: torch.Tensor, m: torch.Tensor, *, transposed: bool) -> torch.Tensor:
    """m_o * W'[o, :] / ||W'[o, :]|| for each output unit o (a column when W is stored (in, out))."""
    x = merged.T if transposed else merged
    rows = []
    for o in range(x.shape[0]):
        norm = math.sqrt(sum(v * v for v in x[o].tolist()))
        rows.append([float(m[o]) * v / norm for v in x[o].tolist()])
    out = torch.tensor(rows, dtype=torch.float64)
    return out.T if transposed else out


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5, msg=what)


# ---- a hand-built model and adapters --------------------------------------------------------------

V, H, I = BLOCK_ROWS + 22, 8, BLOCK_ROWS + 12  # above BLOCK_ROWS: LoRA products span two blocks


def base_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(V, H, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(H, H, generator=g),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(H, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(I, H, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(H, I, generator=g),
        "model.norm.weight": torch.randn(H, generator=g),
        "transformer.c_attn.weight": torch.randn(H, 3 * H, generator=g),  # Conv1D: stored (in, out)
        "transformer.c_attn.bias": torch.randn(3 * H, generator=g),
        "lm_head.weight": torch.randn(V, H, generator=g),
    }


def write_base(root: Path, sd: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(root / "model.safetensors"))
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def write_adapter(root: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text(json.dumps(config))
    return root


def lora_tensors(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": r(4, H),
        f"{P}model.layers.0.self_attn.q_proj.lora_B.weight": r(H, 4),
        f"{P}model.layers.0.self_attn.q_proj.lora_B.bias": r(H),
        f"{P}model.layers.0.mlp.up_proj.lora_A.weight": r(2, H),  # rank_pattern: 2
        f"{P}model.layers.0.mlp.up_proj.lora_B.weight": r(I, 2),
        f"{P}model.layers.0.mlp.down_proj.lora_A.weight": r(4, I),
        f"{P}model.layers.0.mlp.down_proj.lora_B.weight": r(H, 4),
        f"{P}model.embed_tokens.lora_embedding_A": r(4, V),
        f"{P}model.embed_tokens.lora_embedding_B": r(H, 4),
        f"{P}transformer.c_attn.lora_A.weight": r(4, H),
        f"{P}transformer.c_attn.lora_B.weight": r(3 * H, 4),
        f"{P}lm_head.weight": r(V, H),  # modules_to_save copy
    }


LORA_CONFIG = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "rank_pattern": {"up_proj": 2},
    "alpha_pattern": {"layers.0.mlp.down_proj": 3},
    "fan_in_fan_out": False,
    "lora_bias": True,
    "modules_to_save": ["lm_head"],
}


def _expected_lora(base: dict, ad: dict, *, rs: bool = False) -> dict[str, torch.Tensor]:
    def s(alpha: float, r: int) -> float:
        return alpha / math.sqrt(r) if rs else alpha / r

    q, up, down = (f"{P}model.layers.0.{m}" for m in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"))
    exp = dict(base)
    exp["model.layers.0.self_attn.q_proj.weight"] = ref_lora(
        base["model.layers.0.self_attn.q_proj.weight"],
        ad[f"{q}.lora_A.weight"],
        ad[f"{q}.lora_B.weight"],
        s(8, 4),
        transposed=False,
    )
    exp["model.layers.0.self_attn.q_proj.bias"] = (
        base["model.layers.0.self_attn.q_proj.bias"].double() + s(8, 4) * ad[f"{q}.lora_B.bias"].double()
    )
    exp["model.layers.0.mlp.up_proj.weight"] = ref_lora(
        base["model.layers.0.mlp.up_proj.weight"],
        ad[f"{up}.lora_A.weight"],
        ad[f"{up}.lora_B.weight"],
        s(8, 2),
        transposed=False,
    )
    exp["model.layers.0.mlp.down_proj.weight"] = ref_lora(
        base["model.layers.0.mlp.down_proj.weight"],
        ad[f"{down}.lora_A.weight"],
        ad[f"{down}.lora_B.weight"],
        s(3, 4),
        transposed=False,
    )
    exp["model.embed_tokens.weight"] = ref_lora(
        base["model.embed_tokens.weight"],
        ad[f"{P}model.embed_tokens.lora_embedding_A"],
        ad[f"{P}model.embed_tokens.lora_embedding_B"],
        s(8, 4),
        transposed=True,
    )
    exp["transformer.c_attn.weight"] = ref_lora(
        base["transformer.c_attn.weight"],
        ad[f"{P}transformer.c_attn.lora_A.weight"],
        ad[f"{P}transformer.c_attn.lora_B.weight"],
        s(8, 4),
        transposed=True,
    )
    exp["lm_head.weight"] = ad[f"{P}lm_head.weight"]
    return exp


def _check_all(src, expected: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> None:
    assert src.keys() == sorted(expected)
    for name, want in expected.items():
        got = src.read(name)
        assert got.dtype == dtypes[name] and src.info(name).dtype == dtypes[name], name
        assert tuple(got.shape) == src.info(name).shape == tuple(want.shape), name
        close(got, want, name)


def _check_chunks_equal_whole(src) -> None:
    """Any row range equals the same rows of a whole read, bit for bit."""
    names = src.keys()
    for name in names:
        whole = src.read(name)
        if whole.dim() == 0:
            continue
        n = whole.shape[0]
        for step in (5, BLOCK_ROWS - 1, BLOCK_ROWS + 3):
            parts = [src.read(name, (i, min(n, i + step))) for i in range(0, n, step)]
            assert torch.equal(torch.cat(parts) if parts else whole, whole), (name, step)


def test_lora_matches_literal_reference(tmp_path: Path) -> None:
    base = base_sd()
    ad = lora_tensors()
    src = open_source(
        write_adapter(tmp_path / "ad", ad, LORA_CONFIG), base=open_source(write_base(tmp_path / "base", base))
    )
    assert isinstance(src, PeftSource)
    assert src.changed == sorted(
        [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.embed_tokens.weight",
            "transformer.c_attn.weight",
            "lm_head.weight",
        ]
    )
    _check_all(src, _expected_lora(base, ad), dict.fromkeys(base, torch.float32))
    _check_chunks_equal_whole(src)
    # untouched tensors come straight from the base
    assert torch.equal(src.read("model.norm.weight"), base["model.norm.weight"])


def test_rslora_scaling(tmp_path: Path) -> None:
    base = base_sd()
    ad = lora_tensors()
    cfg = {**LORA_CONFIG, "use_rslora": True}
    src = open_source(
        write_adapter(tmp_path / "ad", ad, cfg), base=open_source(write_base(tmp_path / "b", base))
    )
    _check_all(src, _expected_lora(base, ad, rs=True), dict.fromkeys(base, torch.float32))


def test_dora_linear_and_fan_in_fan_out(tmp_path: Path) -> None:
    base = base_sd()
    g = torch.Generator().manual_seed(5)
    ad = {
        f"{P}model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(4, H, generator=g),
        f"{P}model.layers.0.mlp.up_proj.lora_B.weight": torch.randn(I, 4, generator=g),
        f"{P}model.layers.0.mlp.up_proj.lora_magnitude_vector": torch.rand(I, generator=g) + 0.5,
        f"{P}transformer.c_attn.lora_A.weight": torch.randn(4, H, generator=g),
        f"{P}transformer.c_attn.lora_B.weight": torch.randn(3 * H, 4, generator=g),
        f"{P}transformer.c_attn.lora_magnitude_vector": torch.rand(3 * H, generator=g) + 0.5,
    }
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 6, "use_dora": True}
    src = open_source(
        write_adapter(tmp_path / "ad", ad, cfg), base=open_source(write_base(tmp_path / "b", base))
    )
    exp = dict(base)
    up = f"{P}model.layers.0.mlp.up_proj"
    merged = ref_lora(
        base["model.layers.0.mlp.up_proj.weight"],
        ad[f"{up}.lora_A.weight"],
        ad[f"{up}.lora_B.weight"],
        6 / 4,
        transposed=False,
    )
    exp["model.layers.0.mlp.up_proj.weight"] = ref_dora(
        merged, ad[f"{up}.lora_magnitude_vector"], transposed=False
    )
    ca = f"{P}transformer.c_attn"
    merged = ref_lora(
        base["transformer.c_attn.weight"],
        ad[f"{ca}.lora_A.weight"],
        ad[f"{ca}.lora_B.weight"],
        6 / 4,
        transposed=True,
    )
    exp["transformer.c_attn.weight"] = ref_dora(merged, ad[f"{ca}.lora_magnitude_vector"], transposed=True)
    _check_all(src, exp, dict.fromkeys(base, torch.float32))
    _check_chunks_equal_whole(src)


def test_ia3_feedforward_and_not(tmp_path: Path) -> None:
    base = base_sd()
    g = torch.Generator().manual_seed(3)
    ad = {
        f"{P}model.layers.0.mlp.down_proj.ia3_l": torch.rand(1, I, generator=g)
        + 0.5,  # feed-forward: input dim
        f"{P}model.layers.0.self_attn.q_proj.ia3_l": torch.rand(H, 1, generator=g)
        + 0.5,  # output dim (+ bias)
        f"{P}transformer.c_attn.ia3_l": torch.rand(3 * H, 1, generator=g) + 0.5,  # (in, out) storage
    }
    cfg = {
        "peft_type": "IA3",
        "target_modules": ["down_proj", "q_proj", "c_attn"],
        "feedforward_modules": ["down_proj"],
    }
    src = open_source(
        write_adapter(tmp_path / "ad", ad, cfg), base=open_source(write_base(tmp_path / "b", base))
    )
    exp = dict(base)
    down = base["model.layers.0.mlp.down_proj.weight"]
    lff = ad[f"{P}model.layers.0.mlp.down_proj.ia3_l"][0]
    exp["model.layers.0.mlp.down_proj.weight"] = torch.tensor(
        [[float(down[o, i]) * float(lff[i]) for i in range(I)] for o in range(H)]
    )
    q = base["model.layers.0.self_attn.q_proj.weight"]
    lq = ad[f"{P}model.layers.0.self_attn.q_proj.ia3_l"][:, 0]
    exp["model.layers.0.self_attn.q_proj.weight"] = torch.tensor(
        [[float(q[o, i]) * float(lq[o]) for i in range(H)] for o in range(H)]
    )
    exp["model.layers.0.self_attn.q_proj.bias"] = base["model.layers.0.self_attn.q_proj.bias"] * lq
    c = base["transformer.c_attn.weight"]
    lc = ad[f"{P}transformer.c_attn.ia3_l"][:, 0]
    exp["transformer.c_attn.weight"] = torch.tensor(
        [[float(c[i, o]) * float(lc[o]) for o in range(3 * H)] for i in range(H)]
    )
    exp["transformer.c_attn.bias"] = base["transformer.c_attn.bias"] * lc
    _check_all(src, exp, dict.fromkeys(base, torch.float32))
    _check_chunks_equal_whole(src)


def test_bf16_base_result_rounded_once(tmp_path: Path) -> None:
    base = {k: v.to(torch.bfloat16) for k, v in base_sd().items()}
    ad = lora_tensors()  # float32 adapter
    src = open_source(
        write_adapter(tmp_path / "ad", ad, LORA_CONFIG), base=open_source(write_base(tmp_path / "b", base))
    )
    for name, want in _expected_lora(base, ad).items():
        got = src.read(name)
        assert got.dtype == torch.bfloat16, name
        # one rounding of the (near-)exact value: within half a bf16 ulp, plus fp32 slack
        torch.testing.assert_close(got.double(), want.double(), rtol=2**-8 + 1e-5, atol=1e-5, msg=name)


def test_base_without_model_prefix(tmp_path: Path) -> None:
    """An adapter trained on *ForCausalLM applied to a bare backbone checkpoint (no 'model.')."""
    full = base_sd()
    bare = {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}
    ad = {k: v for k, v in lora_tensors().items() if k.startswith(f"{P}model.")}
    cfg = {**LORA_CONFIG, "modules_to_save": None}
    src = open_source(
        write_adapter(tmp_path / "ad", ad, cfg), base=open_source(write_base(tmp_path / "b", bare))
    )
    full_exp = _expected_lora(full, lora_tensors())  # its model.* entries use only the model.* factors
    exp = {k.removeprefix("model."): v for k, v in full_exp.items() if k.startswith("model.")}
    _check_all(src, exp, dict.fromkeys(exp, torch.float32))
    # and the reverse: adapter names lack 'model.', the base has it
    ad2 = {k.replace(f"{P}model.", P): v for k, v in ad.items()}
    src2 = open_source(
        write_adapter(tmp_path / "ad2", ad2, cfg), base=open_source(write_base(tmp_path / "b2", full))
    )
    close(src2.read("model.embed_tokens.weight"), full_exp["model.embed_tokens.weight"], "emb")


def test_lora_on_tied_lm_head(tmp_path: Path) -> None:
    base = {k: v for k, v in base_sd().items() if k != "lm_head.weight"}
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(4, H, generator=g), torch.randn(V, 4, generator=g)
    ad = {f"{P}lm_head.lora_A.weight": a, f"{P}lm_head.lora_B.weight": b}
    src = open_source(
        write_adapter(tmp_path / "ad", ad, {"peft_type": "LORA", "r": 4, "lora_alpha": 4}),
        base=open_source(write_base(tmp_path / "b", base, {"tie_word_embeddings": True})),
    )
    keys = src.keys()
    assert "lm_head.weight" in keys
    close(
        src.read("lm_head.weight"),
        ref_lora(base["model.embed_tokens.weight"], a, b, 1.0, transposed=False),
        "head",
    )
    assert torch.equal(src.read("model.embed_tokens.weight"), base["model.embed_tokens.weight"])


def test_pattern_value_matches_peft_rules() -> None:
    pats = {"up_proj": 2, r"layers\.1\..*q_proj": 16, "0.mlp.down_proj": 3}
    assert pattern_value(pats, "model.layers.0.mlp.up_proj", 8) == 2
    assert pattern_value(pats, "model.layers.0.mlp.gate_up_proj", 8) == 8  # whole name components only
    assert pattern_value(pats, "model.layers.1.self_attn.q_proj", 8) == 16
    assert pattern_value(pats, "model.layers.1.self_attn.k_proj", 8) == 8
    assert pattern_value(pats, "model.layers.0.mlp.down_proj", 8) == 3


# ---- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "tensors", "pattern"),
    [
        ({"peft_type": "LOHA", "r": 4}, None, r"unsupported PEFT type 'LOHA'.*merge_and_unload"),
        (
            {"peft_type": "LORA", "r": 4, "layer_replication": [[0, 1]]},
            None,
            r"layer_replication.*not supported",
        ),
        (
            {"peft_type": "LORA", "r": 4, "init_lora_weights": "pissa"},
            None,
            r"pissa.*changed the base weights",
        ),
        ({"peft_type": "LORA", "r": 2}, None, r"inconsistent with rank r=2"),
        (
            {"peft_type": "LORA", "r": 4},
            {
                f"{P}model.nope.lora_A.weight": torch.ones(4, H),
                f"{P}model.nope.lora_B.weight": torch.ones(H, 4),
            },
            r"targets 'model\.nope\.weight', which base checkpoint .* lacks",
        ),
        (
            {"peft_type": "LORA", "r": 4},
            {
                f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, H, 1, 1),
                f"{P}model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(H, 4, 1, 1),
            },
            r"4-d LoRA factors",
        ),
        (
            {"peft_type": "LORA", "r": 4},
            {f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, H)},
            r"needs exactly one lora_A and lora_B pair",
        ),
        (
            {"peft_type": "LORA", "r": 4},
            {
                f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 5),
                f"{P}model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(H, 4),
            },
            r"implies a weight of shape \(8, 5\).*base tensor has shape \(8, 8\)",
        ),
        (
            {"peft_type": "LORA", "r": 4},
            {f"{P}model.layers.0.self_attn.q_proj.lora_C.weight": torch.ones(4, H)},
            r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_C\.weight' has a form",
        ),
        (
            {"peft_type": "IA3", "feedforward_modules": []},
            {f"{P}model.layers.0.mlp.down_proj.ia3_l": torch.ones(1, I)},
            rf"is not a feed-forward module per feedforward_modules, but its vector has shape \(1, {I}\)",
        ),
    ],
)
def test_refusals_are_clear(tmp_path: Path, cfg: dict, tensors: dict | None, pattern: str) -> None:
    base = open_source(write_base(tmp_path / "b", base_sd()))
    if tensors is None:
        tensors = lora_tensors()
    ad = write_adapter(tmp_path / "ad", tensors, cfg)
    with pytest.raises(ValueError, match=pattern):
        open_source(ad, base=base)


def test_adapter_needs_base_and_weights(tmp_path: Path) -> None:
    ad = write_adapter(tmp_path / "ad", lora_tensors(), LORA_CONFIG)
    with pytest.raises(ValueError, match="PEFT adapter directory: open it with base="):
        open_source(ad)
    base = open_source(write_base(tmp_path / "b", base_sd()))
    with pytest.raises(ValueError, match="base= is only for PEFT adapter directories"):
        open_source(tmp_path / "b", base=base)
    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors or adapter_model\.bin"):
        open_source(ad, base=base)


def test_adapter_bin_is_read_safely(tmp_path: Path) -> None:
    base = base_sd()
    ad = lora_tensors()
    root = tmp_path / "ad"
    root.mkdir()
    torch.save(ad, root / "adapter_model.bin")
    (root / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    src = open_source(root, base=open_source(write_base(tmp_path / "b", base)))
    _check_all(src, _expected_lora(base, ad), dict.fromkeys(base, torch.float32))


# ---- parity with PEFT itself --------------------------------------------------------------------


def _tiny_llama(vocab: int = BLOCK_ROWS + 40):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=BLOCK_ROWS + 8,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )


def _tiny_gpt2():
    from transformers import GPT2Config

    return GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=BLOCK_ROWS + 30,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )


def _peft_parity(tmp_path: Path, model_cls, config, peft_config, *, perturb: bool = True) -> None:
    peft = require("peft")
    torch.manual_seed(0)
    base = model_cls(config)
    with torch.no_grad():  # no zero-initialised biases: they would hide bias handling
        for p in base.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    pm = peft.get_peft_model(model_cls.from_pretrained(tmp_path / "base"), peft_config)
    if perturb:  # make every trainable piece non-trivial (PEFT initialises some to identity)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad and ("lora_B" in n or "magnitude" in n or "modules_to_save" in n):
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "adapter")
    ref = peft.PeftModel.from_pretrained(model_cls.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    expected = ref.merge_and_unload().state_dict()
    src = open_source(tmp_path / "adapter", base=open_source(tmp_path / "base"))
    assert src.changed, "adapter changed nothing"
    worst = 0.0
    names = src.keys()
    for name in names:
        got = src.read(name)
        worst = max(worst, (got.double() - expected[name].double()).abs().max().item())
        if got.dim() and got.shape[0] <= BLOCK_ROWS:  # one matmul call, as PEFT's: bit-exact
            assert torch.equal(got, expected[name]), name
    assert worst <= 1e-6
    _check_chunks_equal_whole(src)
    missing = set(expected) - set(src.keys())
    assert missing <= {"lm_head.weight"}  # only a tied head, which the checkpoint does not store


def test_peft_lora_llama(tmp_path: Path) -> None:
    peft = require("peft")
    from transformers import LlamaForCausalLM

    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
        init_lora_weights=False,
    )
    _peft_parity(tmp_path, LlamaForCausalLM, _tiny_llama(), cfg)


def test_peft_rslora_dora_llama(tmp_path: Path) -> None:
    peft = require("peft")
    from transformers import LlamaForCausalLM

    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        use_dora=True,
        target_modules=["q_proj", "up_proj"],
        init_lora_weights=False,
    )
    _peft_parity(tmp_path, LlamaForCausalLM, _tiny_llama(), cfg)


def test_peft_ia3_llama(tmp_path: Path) -> None:
    peft = require("peft")
    from transformers import LlamaForCausalLM

    cfg = peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        init_ia3_weights=False,
    )
    _peft_parity(tmp_path, LlamaForCausalLM, _tiny_llama(), cfg, perturb=False)


def test_peft_gpt2_conv1d_lora_bias(tmp_path: Path) -> None:
    peft = require("peft")
    from transformers import GPT2LMHeadModel

    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
        lora_bias=True,
        init_lora_weights=False,
    )
    _peft_parity(tmp_path, GPT2LMHeadModel, _tiny_gpt2(), cfg)


def test_peft_gpt2_dora_fan_in_fan_out(tmp_path: Path) -> None:
    peft = require("peft")
    from transformers import GPT2LMHeadModel

    cfg = peft.LoraConfig(
        r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True, init_lora_weights=False
    )
    _peft_parity(tmp_path, GPT2LMHeadModel, _tiny_gpt2(), cfg)


def test_peft_gpt2_embedding_lora_tied_head(tmp_path: Path) -> None:
    peft = require("peft")
    from transformers import GPT2LMHeadModel

    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["wte", "c_fc"], init_lora_weights=False)
    _peft_parity(tmp_path, GPT2LMHeadModel, _tiny_gpt2(), cfg)


def test_peft_gpt2_ia3_fan_in_fan_out(tmp_path: Path) -> None:
    peft = require("peft")
    from transformers import GPT2LMHeadModel

    cfg = peft.IA3Config(
        target_modules=["c_attn", "mlp.c_proj"],
        feedforward_modules=["mlp.c_proj"],
        fan_in_fan_out=True,
        init_ia3_weights=False,
    )
    _peft_parity(tmp_path, GPT2LMHeadModel, _tiny_gpt2(), cfg, perturb=False)
