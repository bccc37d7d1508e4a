"""Tiny Hugging Face checkpoints built here (no download): a random Llama base and experts =
base + structured task vectors, saved in every layout the engine reads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

LAYOUTS = ("single", "sharded", "bin", "sharded_bin")


def tiny_llama_config(**overrides: object):
    from transformers import LlamaConfig

    kw: dict[str, object] = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    config = LlamaConfig(**kw)
    config.architectures = ["LlamaForCausalLM"]
    return config


def base_state_dict(config, seed: int = 0) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def expert_state_dicts(
    base: dict[str, torch.Tensor], n: int, *, seed: int = 1, scale: float = 0.02
) -> list[dict[str, torch.Tensor]]:
    """Experts = base + structured task vectors: a low-rank part, sparse spikes and a shared
    direction (so sign conflicts and agreements both occur)."""
    g = torch.Generator().manual_seed(seed)
    shared = {k: torch.randn(v.shape, generator=g) for k, v in base.items() if v.is_floating_point()}
    experts = []
    for i in range(n):
        sd = {}
        for k, v in base.items():
            if not v.is_floating_point():
                sd[k] = v.clone()
                continue
            d = torch.randn(v.shape, generator=g)
            if v.dim() == 2:
                r = 2
                d = d + (torch.randn(v.shape[0], r, generator=g) @ torch.randn(r, v.shape[1], generator=g))
            spikes = (torch.rand(v.shape, generator=g) < 0.01).float() * 8.0
            delta = scale * (0.5 * shared[k] + d + spikes * torch.sign(d)) * (1.0 + 0.2 * i)
            sd[k] = (v.float() + delta).to(v.dtype)
        experts.append(sd)
    return experts


def save_checkpoint(
    sd: dict[str, torch.Tensor],
    path: Path,
    layout: str,
    config=None,
    *,
    n_shards: int = 3,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        config.to_json_file(str(path / "config.json"))
    names = sorted(sd)
    if layout == "single":
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "bin":
        torch.save(sd, path / "pytorch_model.bin")
    elif layout in ("sharded", "sharded_bin"):
        groups = [names[i::n_shards] for i in range(n_shards)]
        weight_map = {}
        total = 0
        for j, group in enumerate(groups):
            if layout == "sharded":
                fname = f"model-{j + 1:05d}-of-{n_shards:05d}.safetensors"
                save_file({k: sd[k] for k in group}, str(path / fname), metadata={"format": "pt"})
            else:
                fname = f"pytorch_model-{j + 1:05d}-of-{n_shards:05d}.bin"
                torch.save({k: sd[k] for k in group}, path / fname)
            for k in group:
                weight_map[k] = fname
                total += sd[k].numel() * sd[k].element_size()
        index = "model.safetensors.index.json" if layout == "sharded" else "pytorch_model.bin.index.json"
        (path / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    else:
        raise ValueError(layout)
    return path


def make_family(
    root: Path,
    n_models: int,
    *,
    layouts: Sequence[str] = ("single",),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **config_overrides: object,
) -> tuple[Path, list[Path], dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Write base + n experts under root; layouts cycle over the experts (base uses layouts[0])."""
    config = tiny_llama_config(**config_overrides)
    config.torch_dtype = str(dtype).replace("torch.", "")
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base_state_dict(config, seed).items()}
    experts = expert_state_dicts(base, n_models, seed=seed + 1)
    if getattr(config, "tie_word_embeddings", False):
        base.pop("lm_head.weight", None)
        for e in experts:
            e.pop("lm_head.weight", None)
    base_dir = save_checkpoint(base, root / "base", layouts[0], config)
    dirs = [
        save_checkpoint(e, root / f"expert{i}", layouts[i % len(layouts)], config)
        for i, e in enumerate(experts)
    ]
    return base_dir, dirs, base, experts


def llama_shapes(config) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a LlamaForCausalLM checkpoint, from its config (no model built)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    return shapes


def fast_family(
    root: Path,
    n_models: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    layout: str = "sharded",
    **config_overrides: object,
) -> tuple[Path, list[Path]]:
    """Like make_family but without instantiating a model (fast for bigger checkpoints); returns dirs."""
    config = tiny_llama_config(**config_overrides)
    config.torch_dtype = str(dtype).replace("torch.", "")
    g = torch.Generator().manual_seed(seed)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in llama_shapes(config).items()}
    base_dir = save_checkpoint(base, root / "base", layout, config)
    dirs = []
    for m in range(n_models):
        sd = {k: (v.float() + 0.002 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        dirs.append(save_checkpoint(sd, root / f"expert{m}", layout, config))
    return base_dir, dirs
