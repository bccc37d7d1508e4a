"""Opening any supported checkpoint layout as a TensorSource, and what the engine needs to know
about tied embeddings.

Layouts, for a directory (in the order transformers prefers them):
``adapter_config.json`` (a PEFT adapter, folded into ``base=``), ``model.safetensors``,
``model.safetensors.index.json`` (sharded), ``pytorch_model.bin``, ``pytorch_model.bin.index.json``;
for a file: ``*.safetensors``, ``*.index.json`` (sharded, either format), ``*.bin`` / ``*.pt`` /
``*.pth``. ``config`` is ``config.json`` in the directory (for a file: next to it), when present.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from weightmerge.io._common import read_config
from weightmerge.io.base import TensorSource
from weightmerge.io.peft import ADAPTER_CONFIG, PeftSource
from weightmerge.io.safetensors_io import SafetensorsFile
from weightmerge.io.sharded import ShardedSource
from weightmerge.io.tied import tied_weights
from weightmerge.io.torchbin import TorchBinFile

__all__ = ["detect_layout", "open_source", "tied_weights"]

LayoutKind = Literal["safetensors", "sharded-safetensors", "torch-bin", "sharded-torch-bin", "peft-adapter"]
DIR_FILES: tuple[tuple[str, LayoutKind], ...] = (
    ("model.safetensors", "safetensors"),
    ("model.safetensors.index.json", "sharded-safetensors"),
    ("pytorch_model.bin", "torch-bin"),
    ("pytorch_model.bin.index.json", "sharded-torch-bin"),
)
TORCH_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Layout:
    kind: LayoutKind
    file: str  # the weights file, index JSON, or adapter directory
    directory: str  # where config.json / tokenizer files are looked for


def detect_layout(path: str) -> Layout:
    """Which layout ``path`` holds (files are not opened beyond existence checks)."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
            return Layout("peft-adapter", path, path)
        for fname, kind in DIR_FILES:
            if os.path.isfile(os.path.join(path, fname)):
                return Layout(kind, os.path.join(path, fname), path)
        found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".json", *TORCH_SUFFIXES)))
        raise FileNotFoundError(
            f"no checkpoint in directory {path}: looked for {', '.join(f for f, _ in DIR_FILES)} and "
            f"{ADAPTER_CONFIG}"
            + (f"; found {', '.join(found)} (pass one of those files directly)" if found else "")
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    directory = os.path.dirname(os.path.abspath(path))
    if path.endswith(".safetensors"):
        return Layout("safetensors", path, directory)
    if path.endswith(".safetensors.index.json"):
        return Layout("sharded-safetensors", path, directory)
    if path.endswith(".index.json"):
        return Layout("sharded-torch-bin", path, directory)
    if path.endswith(TORCH_SUFFIXES):
        return Layout("torch-bin", path, directory)
    raise ValueError(
        f"cannot tell the format of {path}: expected a model directory, *.safetensors, *.index.json, "
        f"or {'/'.join('*' + s for s in TORCH_SUFFIXES)}"
    )


def open_source(path: str | os.PathLike[str], *, base: TensorSource | None = None) -> TensorSource:
    """Open a checkpoint (see the module docstring for layouts). A PEFT adapter directory needs
    ``base``, the source of the model it was trained on; the result is that model with the adapter
    folded in. ``base`` given for anything else is an error (it would be ignored)."""
    path = os.fspath(path)
    layout = detect_layout(path)
    if layout.kind == "peft-adapter":
        if base is None:
            raise ValueError(
                f"{path} is a PEFT adapter directory: open it with base=<source of its base model> "
                "(the adapter holds only the changes)"
            )
        return PeftSource(path, base=base)
    if base is not None:
        raise ValueError(
            f"base= is only for PEFT adapter directories; {path} is a full checkpoint ({layout.kind})"
        )
    config = read_config(layout.directory)
    if layout.kind == "safetensors":
        return SafetensorsFile(layout.file, config=config)
    if layout.kind == "torch-bin":
        return TorchBinFile(layout.file, config=config)
    if layout.kind == "sharded-safetensors":
        return ShardedSource(layout.file, open_shard=SafetensorsFile, config=config)
    return ShardedSource(layout.file, open_shard=_open_torch_shard, config=config)


def _open_torch_shard(path: str) -> TensorSource:
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    return TorchBinFile(path)
