"""mergekit-yaml's command-line flags (mergekit 0.1.5), accepted by ``weightmerge merge``.

Each flag is mapped to ours, or accepted with one line saying why it changes nothing here, or
refused with one line saying why; so a script written for ``mergekit-yaml`` runs unchanged, and
``weightmerge-yaml`` is the same command under a mergekit-like name.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# flag -> why it has no effect here (accepted, one note line)
NO_EFFECT: dict[str, str] = {
    "lazy-unpickle": ".bin checkpoints are always read lazily, through a restricted unpickler",
    "allow-crimes": "weightmerge checks that tensor names and shapes match, not architecture names",
    "trust-remote-code": "weightmerge never runs a model's code",
    "clone-tensors": "each output tensor is written once, from its own buffer",
    "low-cpu-memory": "memory is bounded by --max-memory (row chunks), not by where results are kept",
    "read-to-gpu": "tensors are read on the CPU and moved to --device for the arithmetic",
    "multi-gpu": "weightmerge uses one device",
    "async-write": "writes are positioned writes of each finished tensor",
    "transformers-cache": "weightmerge reads local checkpoints; set HF_HOME for the Hugging Face cache",
    "lora-merge-cache": "adapters are folded in memory, tensor by tensor; nothing is cached",
    "lora-merge-dtype": "adapters are folded in the compute dtype",
    "write-threads": "one writer",
}
BOOL_FLAGS = (
    "lazy-unpickle",
    "allow-crimes",
    "trust-remote-code",
    "clone-tensors",
    "low-cpu-memory",
    "read-to-gpu",
    "multi-gpu",
    "async-write",
    "cuda",
    "write-model-card",
    "safe-serialization",
    "unsafe-truncate-embeddings",
)
VALUE_FLAGS = (
    "transformers-cache",
    "lora-merge-cache",
    "lora-merge-dtype",
    "write-threads",
    "out-shard-size",
    "random-seed",
)


def register(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mergekit-yaml flags (accepted as mergekit 0.1.5 spells them)")
    for name in BOOL_FLAGS:
        dest = "mk_" + name.replace("-", "_")
        g.add_argument(f"--{name}", dest=dest, action="store_true", default=None, help=argparse.SUPPRESS)
        g.add_argument(f"--no-{name}", dest=dest, action="store_false", help=argparse.SUPPRESS)
    for name in VALUE_FLAGS:
        g.add_argument(f"--{name}", dest="mk_" + name.replace("-", "_"), default=None, help=argparse.SUPPRESS)
    g.add_argument(
        "--gpu-rich", dest="mk_gpu_rich", action="store_true", default=None, help=argparse.SUPPRESS
    )
    g.add_argument(
        "--num-threads", "-j", dest="mk_num_threads", type=int, default=None, help=argparse.SUPPRESS
    )
    g.add_argument(
        "--copy-tokenizer",
        dest="mk_copy_tokenizer",
        action="store_true",
        default=None,
        help=argparse.SUPPRESS,
    )
    g.add_argument("-v", dest="mk_verbosity", action="count", default=None, help=argparse.SUPPRESS)
    g.description = (
        "--cuda, --gpu-rich (= --device cuda), -j/--num-threads (= --threads), --out-shard-size N "
        "(parameters per shard), --copy-tokenizer/--no-copy-tokenizer, --write-model-card/"
        "--no-write-model-card, --random-seed N (= the config's seed); accepted with a note: "
        + ", ".join(f"--{k}" for k in NO_EFFECT)
        + "; refused: --no-safe-serialization, --unsafe-truncate-embeddings"
    )


@dataclass
class Mapped:
    device: str | None = None
    threads: int | None = None
    shard_params: int | None = None  # mergekit counts shard size in parameters
    copy_tokenizer: bool | None = None
    write_card: bool | None = None
    seed: int | None = None
    notes: tuple[str, ...] = ()


def parse_count(text: str) -> int:
    """mergekit's sizes: a number with an optional K, M or B suffix (thousands, millions, billions)."""
    t = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "B": 10**9}.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in "KMB" else t
    try:
        return int(float(digits) * mult)
    except ValueError:
        raise ValueError(f"--out-shard-size: expected a count such as 5B or 500M, got {text!r}") from None


def mapped(args: argparse.Namespace) -> Mapped:
    """What the mergekit flags on ``args`` mean here; ValueError for a refused one."""
    out = Mapped()
    notes: list[str] = []
    for name, why in NO_EFFECT.items():
        if getattr(args, "mk_" + name.replace("-", "_"), None):
            notes.append(f"--{name} has no effect here: {why}")
    if args.mk_safe_serialization is False:
        raise ValueError("--no-safe-serialization: weightmerge writes safetensors only")
    if args.mk_unsafe_truncate_embeddings:
        raise ValueError(
            "--unsafe-truncate-embeddings is not supported: merge models with one vocabulary size"
        )
    if args.mk_cuda or args.mk_gpu_rich:
        out.device = "cuda"
    out.threads = args.mk_num_threads
    if args.mk_out_shard_size is not None:
        out.shard_params = parse_count(args.mk_out_shard_size)
    out.copy_tokenizer = args.mk_copy_tokenizer
    out.write_card = args.mk_write_model_card
    if args.mk_random_seed is not None:
        try:
            out.seed = int(args.mk_random_seed)
        except ValueError:
            raise ValueError(f"--random-seed: expected an integer, got {args.mk_random_seed!r}") from None
    out.notes = tuple(notes)
    return out
