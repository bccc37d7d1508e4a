"""The TensorSource protocol: what the engine needs from any checkpoint layout.

Sources read lazily: ``info`` comes from headers only (no tensor data touched), ``read`` returns
one tensor or a row range of it (``rows = (start, stop)`` along dim 0), in its stored dtype, on
the CPU, preferably backed by a memory map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from weightmerge.io.safetensors_format import nbytes, numel


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # the file holding it (for messages and planning)

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


@runtime_checkable
class TensorSource(Protocol):
    path: str  # what the user named (for messages)
    config: dict[str, Any] | None  # parsed config.json next to the weights, if any

    def keys(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor: ...

    def close(self) -> None: ...
