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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from weightmerge.io._common import read_config
from weightmerge.io.base import TensorSource
from weightmerge.io.peft import ADAPTER_CONFIG, PeftSource
from weightmerge.io.safetensors_io import SafetensorsFile
from weightmerge.io.sharded import ShardedSource
from weightmerge.io.torchbin import TorchBinFile

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


# ---- tied embeddings ----------------------------------------------------------------------------
# (output embedding, input embedding) pairs of common causal-LM families, as in transformers'
# ``_tied_weights_keys``; other names fall back to the suffix rule in tied_weights().
KNOWN_TIES: tuple[tuple[str, str], ...] = (
    ("lm_head.weight", "model.embed_tokens.weight"),  # Llama, Mistral, Qwen, Gemma, Phi-3, ...
    ("lm_head.weight", "transformer.wte.weight"),  # GPT-2, GPT-J, CodeGen
    ("lm_head.weight", "model.decoder.embed_tokens.weight"),  # OPT
    ("lm_head.weight", "transformer.word_embeddings.weight"),  # BLOOM, Falcon
    ("lm_head.weight", "model.language_model.embed_tokens.weight"),  # multimodal wrappers
    ("embed_out.weight", "gpt_neox.embed_in.weight"),  # GPT-NeoX, Pythia
)
_EMBED_SUFFIXES = (".embed_tokens.weight", ".wte.weight", ".embed_in.weight", ".word_embeddings.weight")


def tie_flag(config: dict[str, Any] | None) -> bool | None:
    """``tie_word_embeddings`` from a config (or its ``text_config``); None when it does not say."""
    if not config:
        return None
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict) and isinstance(cfg.get("tie_word_embeddings"), bool):
            return bool(cfg["tie_word_embeddings"])
    return None


def _embedding_pair(keys: set[str]) -> tuple[str, str] | None:
    """The (output, input) embedding names of this checkpoint, whichever of the two is stored."""
    for out, emb in KNOWN_TIES:
        if emb in keys:
            return out, emb
    embs = sorted(k for k in keys if k.endswith(_EMBED_SUFFIXES) and "." in k.removesuffix(".weight"))
    if len(embs) == 1:
        return "lm_head.weight", embs[0]
    # only the output embedding stored: the family whose module prefix the other tensors share
    best: tuple[int, tuple[str, str]] | None = None
    for out, emb in KNOWN_TIES:
        prefix = emb.rsplit(".", 2)[0] + "."
        if (
            out in keys
            and any(k.startswith(prefix) for k in keys)
            and (best is None or len(prefix) > best[0])
        ):
            best = (len(prefix), (out, emb))
    return best[1] if best else None


def tied_weights(config: dict[str, Any] | None, keys: Iterable[str]) -> dict[str, str]:
    """Tensors a checkpoint leaves out because they are tied: ``{absent name: stored name}``.

    As transformers loads it: when ``tie_word_embeddings`` is true, the output embedding
    (``lm_head.weight``) and the input embedding are one tensor, and whichever of the two the
    checkpoint lacks is read from the other. When the config does not say, an absent
    ``lm_head.weight`` next to a present input embedding is taken as tied (checkpoints are saved
    that way only when tied). When it says false, nothing is tied (an absent head is a missing
    tensor, for the caller to report). When both are stored, nothing is returned: they are two
    tensors (transformers ties them only if equal; merging treats them separately). Encoder-decoder
    ties (T5's ``shared``) are not covered.
    """
    present = set(keys)
    pair = _embedding_pair(present)
    flag = tie_flag(config)
    if pair is None or flag is False:
        return {}
    out, emb = pair
    if out in present and emb in present:
        return {}
    if emb in present:
        return {out: emb}
    if out in present and flag:
        return {emb: out}
    return {}
