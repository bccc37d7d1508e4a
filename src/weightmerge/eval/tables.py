"""Small formatting helpers of the eval reports (``report``, ``study``): a mean/std summary of
per-seed values, its text form, and a markdown table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def stat(values: Sequence[float | None]) -> dict[str, Any] | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals), "values": vals}


def fmt(s: Mapping[str, Any] | None, *, digits: int = 3, spread: bool = True) -> str:
    if s is None:
        return "-"
    if not spread or s["n"] < 2:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines
