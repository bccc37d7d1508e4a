"""A TensorSource over an in-memory mapping name -> tensor.

``merge_state_dicts`` wraps its dicts in these so that in-memory merges go through the same
planner and driver as merges streamed from checkpoint files (docs/engine.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from weightmerge.io.base import TensorInfo


class DictSource:
    """A TensorSource over ``tensors``; ``path`` labels it in messages (e.g. ``models[1]``).

    ``read`` returns the stored tensor itself (or a row slice of it, a view): no copy is made, and
    the tensor stays on whatever device it lives on.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: str = "<in-memory>") -> None:
        self.tensors = tensors
        self.path = path
        self.config: dict[str, Any] | None = None

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            t = self.tensors[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.path}") from None
        return TensorInfo(name, tuple(t.shape), t.dtype, self.path)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self.tensors[name]
        return t if rows is None else t[rows[0] : rows[1]]

    def close(self) -> None:
        pass
