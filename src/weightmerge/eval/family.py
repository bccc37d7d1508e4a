"""The expert-family interface: what the harness needs from a kind of model, whatever its modality.

A *family* is one pretrained body (a text encoder, an image classifier without its classifier) and
how to use it. The runner, the cache, the Fisher/RegMean statistics, the multitask trainer, the
report and the plots only talk to a family and to the *splits* it prepares:

* ``family.new_body(state)`` -- a fresh body module holding ``state`` (default: the base weights);
  only the body's float parameters (``body_state``) are merged, every task keeps its own head;
* ``family.prepare(examples, max_length=...)`` -- a task split ready for batching (`Split`);
* ``split.batch(index)`` -- ``(inputs, labels)``; ``split.pool(body, *inputs)`` -- the pooled
  ``(batch, hidden_size)`` features (for heads and linear probes); ``split.row_mask(inputs)`` --
  which rows of a layer's input are real data (padding excluded) for RegMean's Gram matrices;
* ``family.train_mode(body)`` -- the module state for a training step (vision: BatchNorm running
  statistics stay frozen, so a fine-tuned model is fully described by its parameters);
* ``family.with_base(...)`` -- the same family from another base (the ``random`` and ``multitask``
  bases of a scale study), with its own fingerprint, so experts of different bases never share a
  cache entry.

The text family is `weightmerge.eval.model.Encoder` (Hugging Face encoders, mean pooling); the
vision family is `weightmerge.eval.vision.VisionFamily` (EfficientNet-Lite and a tiny CNN).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn


class Split(Protocol):
    """A prepared task split (text: `Encoded`; images: `weightmerge.eval.vision.Pixels`)."""

    def __len__(self) -> int: ...

    @property
    def label_tensor(self) -> torch.Tensor: ...

    def batch(self, index: Sequence[int]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]: ...

    def inference_order(self, batch_size: int) -> Iterator[list[int]]: ...

    def pool(self, body: nn.Module, *inputs: torch.Tensor) -> torch.Tensor: ...

    def row_mask(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None: ...

    def lengths(self) -> list[int]: ...


class ExpertFamily(Protocol):
    """A loaded model family member with one base (see the module docstring)."""

    @property
    def name(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def base_state(self) -> Mapping[str, torch.Tensor]: ...

    @property
    def modality(self) -> str: ...  # "text" or "image"

    @property
    def base(self) -> str: ...  # "pretrained", "multitask" or "random"

    def new_body(self, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module: ...

    def prepare(self, examples: Any, *, max_length: int) -> Any: ...

    def train_mode(self, body: nn.Module) -> None: ...

    def with_base(
        self, *, base: str, state: Mapping[str, torch.Tensor], tag: str, calibration: Sequence[Any] = ()
    ) -> ExpertFamily: ...

    def random_state(self, *, seed: int) -> dict[str, torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


def n_parameters(state: Mapping[str, torch.Tensor]) -> int:
    """Number of scalars in a body state (the model-size axis of a scale study)."""
    return int(sum(t.numel() for t in state.values()))
