"""Per-tensor statistics passed through ``params`` (Fisher diagonals, RegMean Gram matrices)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from weightmerge.methods.base import MethodSpec


def gather_aux(
    spec: MethodSpec,
    params: Mapping[str, Any],
    name: str,
    rows: tuple[int, int] | None,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Stack the per-model statistics a method needs for tensor ``name`` (see each method)."""
    out: dict[str, torch.Tensor] = {}
    for key in spec.aux_inputs:
        per_model = params.get(key)
        if per_model is None:
            continue
        found = [d.get(name) for d in per_model]
        if all(f is None for f in found):
            continue
        if any(f is None for f in found):
            missing = [i for i, f in enumerate(found) if f is None]
            raise ValueError(f"{key}: statistics for tensor {name!r} missing for model(s) {missing}")
        t = torch.stack([f.to(dtype) for f in found])
        out[key] = t if rows is None else t[:, rows[0] : rows[1]]
    return out
