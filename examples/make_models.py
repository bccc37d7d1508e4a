"""Write the small checkpoints the example configs name: a random Llama-shaped base, three experts
(base + task vectors), and Fisher / RegMean statistics files for them.

    python examples/make_models.py            # writes examples/models/ and examples/stats/
    weightmerge merge examples/ties.yaml out/ties

Everything is generated (seeded); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_shapes(hidden: int, inter: int, vocab: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return shapes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(__file__).parent), help="where models/ and stats/ go")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=3)
    args = ap.parse_args(argv)
    root = Path(args.root)
    hidden, inter, vocab, layers = args.hidden, args.hidden * 2, 256, args.layers
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": vocab, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": "float32",
    }
    g = torch.Generator().manual_seed(0)
    shapes = llama_shapes(hidden, inter, vocab, layers)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    shared = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = {"base": base}
    for e in range(1, args.experts + 1):
        models[f"expert_{e}"] = {
            k: v + 0.002 * (0.5 * shared[k] + torch.randn(v.shape, generator=g)) for k, v in base.items()
        }
    for name, sd in models.items():
        d = root / "models" / name
        d.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config, indent=2))
    stats = root / "stats"
    stats.mkdir(parents=True, exist_ok=True)
    for e in range(1, args.experts + 1):
        fisher = {k: torch.rand(s, generator=g) + 0.01 for k, s in shapes.items()}
        save_file(fisher, str(stats / f"fisher_expert_{e}.safetensors"))
        gram = {}
        for k, s in shapes.items():
            if len(s) == 2 and k.startswith("model.layers."):
                x = torch.randn(4 * s[1], s[1], generator=g)
                gram[k.removesuffix(".weight")] = x.T @ x / x.shape[0]
        save_file(gram, str(stats / f"gram_expert_{e}.safetensors"))
    print(f"wrote {len(models)} checkpoints under {root / 'models'} and statistics under {stats}")


if __name__ == "__main__":
    main()
