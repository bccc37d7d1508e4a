"""Deterministic split helpers shared by the text and image tasks (``tasks``, ``images``)."""

from __future__ import annotations

import hashlib
import random


def derive_rng(*parts: object) -> random.Random:
    """A `random.Random` seeded from sha256 of the parts' reprs: the same on every machine and run."""
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def class_quotas(n: int, k: int) -> list[int]:
    """`n` examples over `k` classes: `n // k` each, the first `n % k` classes one more."""
    return [n // k + (1 if c < n % k else 0) for c in range(k)]
