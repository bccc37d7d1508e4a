"""Small helpers shared by the checkpoint readers and the writer: dtype names, row ranges, JSON."""

from __future__ import annotations

import json
import os
from typing import Any

from weightmerge.io.safetensors_format import ST_TO_TORCH, TORCH_TO_ST, itemsize, numel

__all__ = ["ST_TO_TORCH", "TORCH_TO_ST", "check_rows", "itemsize", "load_json", "numel", "read_config"]


def check_rows(*, name: str, shape: tuple[int, ...], rows: tuple[int, int] | None) -> tuple[int, int]:
    """Validate a row range ``[start, stop)`` along dim 0 of a tensor; ``None`` means all rows."""
    if rows is None:
        return (0, shape[0] if shape else 1)
    if not shape:
        raise ValueError(f"tensor {name!r} is 0-d: it has no rows to slice (asked rows={rows})")
    try:
        start, stop = (int(rows[0]), int(rows[1]))
    except (TypeError, ValueError, IndexError):
        raise TypeError(f"rows for tensor {name!r} must be (start, stop), got {rows!r}") from None
    if not 0 <= start <= stop <= shape[0]:
        raise ValueError(f"rows {rows} out of range for tensor {name!r} with {shape[0]} rows (shape {shape})")
    return start, stop


def load_json(path: str, *, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from None


def read_config(directory: str) -> dict[str, Any] | None:
    """``config.json`` in ``directory`` parsed, or None when there is none."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    cfg = load_json(path, what="config")
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg
