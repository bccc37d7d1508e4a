"""Small helpers shared by the checkpoint readers and the writer: dtype names, row ranges, JSON."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
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
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text") from None
    except RecursionError:
        raise ValueError(f"{what} {path}: JSON nested too deeply") from None


def read_config(directory: str) -> dict[str, Any] | None:
    """``config.json`` in ``directory`` parsed, or None when there is none."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    if not inside_model(path, directory, on_skip=lambda _m: None):
        raise ValueError(f"config {path} is a link to {Path(path).resolve()}, outside the model folder")
    cfg = load_json(path, what="config")
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def model_roots(directory: str | os.PathLike[str]) -> list[Path]:
    """Where the files of a model folder may live once symlinks are followed: the folder itself,
    and, for a Hugging Face cache snapshot (``.../snapshots/<rev>``), the repository's ``blobs``."""
    d = Path(directory).resolve()
    roots = [d]
    raw = Path(os.path.abspath(directory))
    if raw.parent.name == "snapshots":
        roots.append((raw.parent.parent / "blobs").resolve())
    return roots


def warn(message: str) -> None:
    print(f"weightmerge: warning: {message}", file=sys.stderr)


def inside_model(
    path: str | os.PathLike[str], directory: str | os.PathLike[str], *, on_skip: Callable[[str], None] = warn
) -> bool:
    """True when ``path`` (a file of the model folder ``directory``) is a regular file that stays
    inside the folder once symlinks are followed (see ``model_roots``). A link leading elsewhere
    (``tokenizer.json -> /etc/passwd``), or to a directory, is reported through ``on_skip``."""
    p = Path(path)
    if not p.is_symlink():
        return p.is_file()
    target = p.resolve()
    if not any(target.is_relative_to(r) for r in model_roots(directory)):
        on_skip(f"not copying {p}: it is a link to {target}, outside the model folder")
        return False
    if not target.is_file():
        on_skip(f"not copying {p}: it is a link to {target}, which is not a regular file")
        return False
    return True
