"""Small text clean-up helpers shared by the task builders."""

from __future__ import annotations

import os
from pathlib import Path

from weightmerge.eval.tasks import TaskDataUnavailable


def squash(text: str) -> str:
    """Collapse every run of whitespace (newlines, tabs) into one space and strip the ends."""
    return " ".join(text.split())


def truncate(text: str, *, max_chars: int) -> str:
    """Cut `text` to at most `max_chars` characters at a word boundary (a single over-long word is cut)."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > 0 else text[:max_chars]).rstrip()


def letter_fraction(text: str) -> float:
    """Letters / non-space characters (0.0 for an all-space text): low for ASCII art, code, tables."""
    chars = [ch for ch in text if not ch.isspace()]
    return sum(ch.isalpha() for ch in chars) / len(chars) if chars else 0.0


def data_dir(*, env: str, default: str, what: str, install: str) -> Path:
    """The folder named by environment variable `env` (else `default`); TaskDataUnavailable if absent."""
    path = Path(os.environ.get(env) or default)
    if not path.is_dir():
        raise TaskDataUnavailable(f"{what} not found at {path} (set {env} or install it: {install})")
    return path
