"""The on-disk cache of experts and their statistics: content-addressed, atomic writes.

Layout under the cache directory (default ``~/.cache/weightmerge``, or ``$WEIGHTMERGE_CACHE``)::

    experts/<task>-<key[:20]>/expert.safetensors   body.* and head.* tensors (float32)
    experts/<task>-<key[:20]>/meta.json            task, settings, validation history, timing
    experts/<task>-<key[:20]>/fisher-<k>.safetensors, gram-<k>.safetensors   statistics
    models/tiny-random-v2/                          the generated test encoder

A key is the sha256 of a canonical JSON of everything the content depends on (task fingerprint,
model fingerprint, training settings, seed, format version), so changed data or settings never
reuse a stale entry, and unchanged ones are never recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    env = os.environ.get("WEIGHTMERGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "weightmerge"


def content_key(payload: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``payload`` (plus the cache format version)."""
    text = json.dumps({"format": FORMAT_VERSION, **payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
