"""Search dimensions: one number (or choice) of the merge parameters, and its unit-cube coordinate.

A numeric dimension maps ``[low, high]`` (``log``: ``[log low, log high]``) linearly onto ``[0, 1]``;
the optimizers work in that cube (CMA-ES with one step size for every dimension), the merge sees the
value. A dimension with ``values`` is a choice (grid, random and TPE search only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dimension:
    name: str  # "keep_ratio", or "lambda[expert_a]" for one model's value
    param: str
    model: int | None  # index of the model whose value this is; None = the global value
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    steps: int | None = None
    values: tuple[Any, ...] | None = None

    @property
    def categorical(self) -> bool:
        return self.values is not None

    def _lo_hi(self) -> tuple[float, float]:
        assert self.low is not None and self.high is not None
        if self.log:
            return math.log(self.low), math.log(self.high)
        return self.low, self.high

    def from_unit(self, u: float) -> Any:
        """The value at unit coordinate ``u`` (clipped to [0, 1])."""
        u = min(1.0, max(0.0, float(u)))
        if self.values is not None:
            return self.values[min(len(self.values) - 1, int(u * len(self.values)))]
        lo, hi = self._lo_hi()
        v = lo + u * (hi - lo)
        v = math.exp(v) if self.log else v
        assert self.low is not None and self.high is not None
        v = min(self.high, max(self.low, v))  # exp/log round-off stays inside the bounds
        return round(v) if self.integer else v

    def to_unit(self, value: Any) -> float:
        """The unit coordinate of ``value`` (clipped into the range; a choice: its cell's centre)."""
        if self.values is not None:
            i = self.values.index(value) if value in self.values else 0
            return (i + 0.5) / len(self.values)
        lo, hi = self._lo_hi()
        v = float(value)
        if self.log:
            v = math.log(max(v, 1e-300))
        return min(1.0, max(0.0, (v - lo) / (hi - lo)))

    def grid(self) -> list[Any]:
        """The grid values: ``values``, else ``steps`` evenly spaced (default 5) in the range."""
        if self.values is not None:
            return list(self.values)
        n = self.steps or 5
        out = [self.from_unit(i / (n - 1)) for i in range(n)]
        return list(dict.fromkeys(out))


def point_key(point: dict[str, Any]) -> str:
    """A stable text key of a point (for comparing a replayed candidate with the stored one)."""
    import json

    return json.dumps(
        {k: (round(v, 12) if isinstance(v, float) else v) for k, v in point.items()}, sort_keys=True
    )
