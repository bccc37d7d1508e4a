"""Checkpoint-I/O test helpers: deterministic state dicts of every dtype and shape kind, and
writers for each on-disk layout built only from safetensors / torch.save (never from the code
under test)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LAYOUTS = ("single", "sharded", "bin", "sharded_bin", "file_safetensors", "file_bin")


def mixed_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of many dtypes and shapes, including 0-d and empty ones (odd sizes on purpose, so
    some tensors land at offsets unaligned for their dtype in files written by other tools)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bf16": torch.randn(9, 3, generator=g).to(torch.bfloat16),
        "c.fp16": torch.randn(4, 3, 2, generator=g).to(torch.float16),
        "d.f64": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "e.i64": torch.randint(-1000, 1000, (6,), generator=g),
        "f.i32": torch.randint(-1000, 1000, (5, 3), generator=g, dtype=torch.int32),
        "g.u8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
        "h.i8": torch.randint(-128, 127, (11,), generator=g, dtype=torch.int8),
        "i.bool": torch.rand(5, 2, generator=g) > 0.5,
        "j.scalar": torch.tensor(3.25),
        "k.empty": torch.empty(0, 4),
        "l.empty_cols": torch.empty(3, 0, dtype=torch.bfloat16),
        "m.i16": torch.randint(-3000, 3000, (2, 5), generator=g, dtype=torch.int16),
    }


def save_layout(sd: dict[str, torch.Tensor], root: Path, layout: str, *, config: dict | None = None) -> Path:
    """Write ``sd`` under ``root`` in ``layout``; returns the path to open."""
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    names = sorted(sd)
    if layout in ("single", "file_safetensors"):
        save_file(sd, str(root / "model.safetensors"), metadata={"format": "pt"})
        return root if layout == "single" else root / "model.safetensors"
    if layout in ("bin", "file_bin"):
        torch.save(sd, root / "pytorch_model.bin")
        return root if layout == "bin" else root / "pytorch_model.bin"
    if layout in ("sharded", "sharded_bin"):
        groups = [names[0::3], names[1::3], names[2::3]]
        weight_map = {}
        for j, group in enumerate(groups):
            if layout == "sharded":
                fname = f"model-{j + 1:05d}-of-00003.safetensors"
                save_file({k: sd[k] for k in group}, str(root / fname))
            else:
                fname = f"pytorch_model-{j + 1:05d}-of-00003.bin"
                torch.save({k: sd[k] for k in group}, root / fname)
            weight_map.update(dict.fromkeys(group, fname))
        index = "model.safetensors.index.json" if layout == "sharded" else "pytorch_model.bin.index.json"
        (root / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return root
    raise ValueError(layout)


def raw_safetensors(path: Path, header: dict, data: bytes, *, header_len: int | None = None) -> Path:
    """Write a safetensors file byte by byte (for corrupted / hand-made headers)."""
    raw = json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(n.to_bytes(8, "little") + raw + data)
    return path
