"""Helpers of the reliability catalogue: tiny model folders written with safetensors itself (never
with the code under test), merge configs, and the CLI run in-process or as a child process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from weightmerge.cli import main

WM = [sys.executable, "-m", "weightmerge"]
SHAPES = {"embed_tokens.weight": (16, 8), "layers.0.w": (8, 8), "layers.0.b": (8,), "lm_head.weight": (16, 8)}
CONFIG = {"model_type": "toy", "tie_word_embeddings": False, "hidden_size": 8}


def state_dict(seed: int, *, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def save_model(
    root: Path, sd: dict[str, torch.Tensor], *, config: dict | None = CONFIG, shards: int = 1
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    names = sorted(sd)
    if shards == 1:
        save_file(sd, str(root / "model.safetensors"), metadata={"format": "pt"})
        return root
    weight_map = {}
    for j in range(shards):
        group = names[j::shards]
        fname = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in group}, str(root / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, fname))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def family(root: Path, n: int = 2, **kw: object) -> tuple[Path, list[Path]]:
    """A base and ``n`` experts (base + small noise) under ``root``."""
    base_sd = state_dict(0)
    base = save_model(root / "base", base_sd, **kw)  # type: ignore[arg-type]
    experts = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base_sd.items()}
        experts.append(save_model(root / f"expert{i}", sd, **kw))  # type: ignore[arg-type]
    return base, experts


def write_cfg(
    path: Path,
    method: str,
    base: Path | None,
    models: list[Path],
    params: dict | None = None,
    **extra: object,
) -> Path:
    doc: dict = {"merge_method": method, "models": [{"model": str(m)} for m in models], **extra}
    if params:
        doc["parameters"] = params
    if base is not None:
        doc["base_model"] = str(base)
    path.write_text(yaml.safe_dump(doc))
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (symlinks not followed): proof that an input is untouched."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = (
                "link:" + os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
            )
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """In-process CLI; returns (exit code, stderr)."""
    rc = main(argv)
    return rc, capsys.readouterr().err


def run_child(argv: list[str], *, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*WM, *argv], capture_output=True, text=True, timeout=timeout, env=env, **kw)  # type: ignore[call-overload]


def one_line_error(err: str) -> bool:
    """A user error: one ``weightmerge: error:`` line, no traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return "Traceback" not in err and len(lines) >= 1 and lines[-1].startswith("weightmerge: error:")
