"""Generate Llama-shaped benchmark checkpoints: a random base and experts = base + structured task
vectors, as sharded safetensors with a transformers ``LlamaConfig``. No torch model is built:
tensors are drawn one at a time from seeded generators and written shard by shard, so a 1B model
needs about one shard of memory. Results are cached: a directory whose ``spec.json`` matches the
requested spec is reused.

    .venv/bin/python benchmarks/make_models.py --preset 168m --dtype bfloat16 --experts 4
    .venv/bin/python benchmarks/make_models.py --list

Layout: ``ROOT/<preset>-<dtype>-e<N>-s<seed>/{base,expert_1..expert_N}/`` each with
``config.json``, ``model-0000i-of-0000k.safetensors`` and ``model.safetensors.index.json``.

Task vector of expert e for a tensor W (every draw seeded by (seed, tensor name, part, e), so the
same spec always gives the same bytes):

    2-D (out, in):  S + L_e + P_e + N_e
      S    shared part, the same for every expert:   A_s B_s,  rank 4,  entries ~ 0.5 * scale
      L_e  expert low-rank part:                      A_e B_e,  rank 8,  entries ~ scale
      P_e  sparse spikes: 0.5 % of the entries at random positions, +-5 * scale
      N_e  dense noise ~ N(0, (0.2 * scale)^2)
    1-D (norms):    8 * scale * (z_shared + z_e)     (norms sit near 1, where a bf16 ulp is 2^-7)

with ``scale = 1e-3`` (base weights ~ N(0, 0.02^2), norms ~ 1 + N(0, 0.02^2)). Experts are rounded
to the checkpoint dtype from base (already rounded) + task vector, so their deltas are exact
differences of stored values, as with a real fine-tune. The shared part makes signs agree, the
expert parts make them conflict, the spikes give the heavy tail that magnitude trimming keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
BASE_STD = 0.02
DELTA_SCALE = 1e-3
SHARED_RANK = 4
EXPERT_RANK = 8
NORM_DELTA_SCALE = 8 * DELTA_SCALE
SPIKE_FRACTION = 0.005
FORMAT_VERSION = 2  # bump when the generated values change


@dataclass(frozen=True)
class Shape:
    """Llama hyper-parameters (untied embeddings)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int


PRESETS: dict[str, Shape] = {
    # smoke tests: a few hundred KB
    "tiny": Shape(vocab=512, hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2),
    # ~58M: small enough for in-memory references anywhere
    "58m": Shape(vocab=32000, hidden=512, intermediate=1376, layers=8, heads=8, kv_heads=8),
    # ~168M: the reference point
    "168m": Shape(vocab=32000, hidden=768, intermediate=3264, layers=12, heads=12, kv_heads=12),
    # same largest tensor as 168m, 2.4x the parameters: memory-flatness check
    "405m": Shape(vocab=32000, hidden=768, intermediate=3264, layers=36, heads=12, kv_heads=12),
    # ~1.1B: TinyLlama's shape (grouped-query attention)
    "1b": Shape(vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),
}


@dataclass(frozen=True)
class Spec:
    preset: str
    dtype: str
    experts: int
    seed: int
    shard_bytes: int
    format_version: int = FORMAT_VERSION

    @property
    def shape(self) -> Shape:
        return PRESETS[self.preset]

    @property
    def dirname(self) -> str:
        return f"{self.preset}-{self.dtype}-e{self.experts}-s{self.seed}"


def default_root() -> Path:
    env = os.environ.get("WEIGHTMERGE_BENCH_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "weightmerge-bench"


def tensor_shapes(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a LlamaForCausalLM state dict (HF order), untied lm_head."""
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    head_dim = h // shape.heads
    kv = shape.kv_heads * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def param_count(shape: Shape) -> int:
    total = 0
    for _name, s in tensor_shapes(shape):
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def llama_config(shape: Shape, dtype: str) -> dict[str, object]:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    d["torch_dtype"] = dtype
    d.pop("dtype", None)
    return d


def _gen(seed: int, name: str, part: str, expert: int) -> torch.Generator:
    key = zlib.crc32(f"{seed}|{name}|{part}|{expert}".encode())
    return torch.Generator().manual_seed(key)


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """float32 base value of one tensor."""
    g = _gen(seed, name, "base", 0)
    t = torch.randn(shape, generator=g).mul_(BASE_STD)
    if len(shape) == 1:
        t.add_(1.0)
    return t


def _low_rank(shape: tuple[int, ...], rank: int, g: torch.Generator, scale: float) -> torch.Tensor:
    a = torch.randn(shape[0], rank, generator=g)
    b = torch.randn(rank, shape[1], generator=g).mul_(scale / rank**0.5)
    return a @ b  # (out, in), entries ~ N(0, scale^2)


def task_vector(name: str, shape: tuple[int, ...], seed: int, expert: int) -> torch.Tensor:
    """float32 task vector of ``expert`` (1-based) for one tensor."""
    gs = _gen(seed, name, "shared", 0)
    ge = _gen(seed, name, "expert", expert)
    if len(shape) == 1:
        z = torch.randn(shape, generator=gs).add_(torch.randn(shape, generator=ge))
        return z.mul_(NORM_DELTA_SCALE)
    d = _low_rank(shape, SHARED_RANK, gs, 0.5 * DELTA_SCALE)
    d.add_(_low_rank(shape, EXPERT_RANK, ge, DELTA_SCALE))
    d.add_(torch.randn(shape, generator=ge), alpha=0.2 * DELTA_SCALE)
    flat = d.view(-1)
    n_spikes = max(1, int(SPIKE_FRACTION * flat.numel()))
    idx = torch.randint(0, flat.numel(), (n_spikes,), generator=ge)
    sign = torch.randint(0, 2, (n_spikes,), generator=ge).mul_(2).sub_(1).to(flat.dtype)
    flat.index_put_((idx,), sign.mul_(5 * DELTA_SCALE), accumulate=True)
    return d


def _shard_groups(
    shapes: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, s in shapes:
        n = itemsize
        for d in s:
            n *= d
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, s))
        size += n
    return groups


def _shard_name(i: int, k: int) -> str:
    return f"model-{i + 1:05d}-of-{k:05d}.safetensors"


def _write_model(
    out: Path,
    spec: Spec,
    tensors: Iterator[tuple[str, torch.Tensor]],
    groups: list[list[tuple[str, tuple[int, ...]]]],
) -> None:
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    for gi, group in enumerate(groups):
        shard: dict[str, torch.Tensor] = {}
        for name, s in group:
            got_name, t = next(tensors)
            assert got_name == name and tuple(t.shape) == s, (got_name, name)
            shard[name] = t.contiguous()
            total += t.numel() * t.element_size()
            weight_map[name] = _shard_name(gi, len(groups))
        save_file(shard, str(tmp / _shard_name(gi, len(groups))), metadata={"format": "pt"})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(llama_config(spec.shape, spec.dtype), indent=2) + "\n")
    tmp.rename(out)


def _read_base(base_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    files: dict[str, object] = {}
    for name in index["weight_map"]:
        f = index["weight_map"][name]
        if f not in files:
            files[f] = safe_open(str(base_dir / f), framework="pt")
        yield name, files[f].get_tensor(name)  # type: ignore[attr-defined]


def make_models(spec: Spec, root: Path, *, quiet: bool = False) -> Path:
    """Create (or reuse) the checkpoints of ``spec`` under ``root``; returns their directory."""
    if spec.preset not in PRESETS:
        raise ValueError(f"unknown preset {spec.preset!r}; known: {sorted(PRESETS)}")
    if spec.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {spec.dtype!r}; known: {sorted(DTYPES)}")
    if not 1 <= spec.experts <= 64:
        raise ValueError(f"experts must be in [1, 64], got {spec.experts}")
    out = root / spec.dirname
    spec_path = out / "spec.json"
    want = {**asdict(spec), "params": param_count(spec.shape)}
    names = ["base"] + [f"expert_{e}" for e in range(1, spec.experts + 1)]
    cached = spec_path.exists() and json.loads(spec_path.read_text()) == want
    if cached and all((out / n / "model.safetensors.index.json").exists() for n in names):
        if not quiet:
            print(f"cached: {out}", file=sys.stderr)
        return out
    out.mkdir(parents=True, exist_ok=True)
    if spec_path.exists():
        spec_path.unlink()
    dtype = DTYPES[spec.dtype]
    shapes = tensor_shapes(spec.shape)
    groups = _shard_groups(shapes, torch.empty((), dtype=dtype).element_size(), spec.shard_bytes)
    t0 = time.perf_counter()
    for model in names:
        target = out / model
        if target.exists():
            import shutil

            shutil.rmtree(target)
        if model == "base":
            gen = ((n, base_tensor(n, s, spec.seed).to(dtype)) for n, s in shapes)
        else:
            e = int(model.split("_")[1])
            gen = (
                (n, b.to(torch.float32).add_(task_vector(n, tuple(b.shape), spec.seed, e)).to(dtype))
                for n, b in _read_base(out / "base")
            )
        _write_model(target, spec, gen, groups)
        if not quiet:
            print(f"  wrote {target} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    spec_path.write_text(json.dumps(want, indent=2) + "\n")
    return out


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1000, "M": 1000**2, "G": 1000**3}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="168m", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32 (bf16, fp32 ok)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", default="1GB", help="input shard size (default 1GB)")
    p.add_argument("--root", type=Path, default=None, help=f"cache root (default {default_root()})")
    p.add_argument("--list", action="store_true", help="print the presets and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, s in PRESETS.items():
            print(f"{name:6s} {param_count(s) / 1e6:8.1f}M params  {s}")
        return 0
    dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    spec = Spec(args.preset, dtype, args.experts, args.seed, parse_size(args.shard_size))
    out = make_models(spec, args.root or default_root())
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
