"""Tied embeddings: which tensors a checkpoint leaves out because they are one with another."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
