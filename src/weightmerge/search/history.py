"""The search history: one JSON line per evaluated candidate, rewritten atomically after each one.

Line 1 is a header (``kind: header``: the config hash, the dimensions, the optimizer); then one
``kind: candidate`` line per evaluation (index, generation, point, scores, objective, seconds,
worker) and at most one ``kind: default`` line (the config's own point). The file is written to a
temporary file next to it and renamed over the old one after every evaluation, so a killed search
leaves either the previous or the new complete file, never a torn line; it is also fsynced at the
end of every generation (against a machine crash), not after every evaluation (an fsync can cost
more than a small merge on a busy disk).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str, *, sync: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class History:
    def __init__(self, path: Path | None, header: Mapping[str, Any]) -> None:
        self.path = path
        self.header = {"kind": "header", **header}
        self.candidates: dict[int, dict[str, Any]] = {}
        self.default: dict[str, Any] | None = None
        self.startup_seconds = 0.0  # starting the workers (not part of the history file)

    @classmethod
    def resume(cls, path: Path, header: Mapping[str, Any]) -> History:
        """The stored history; an error when it belongs to another search."""
        h = cls(path, header)
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("kind") != "header":
            raise ValueError(f"{path}: not a search history (no header line)")
        stored = lines[0]
        for key in ("config_hash", "dimensions", "optimizer"):
            if stored.get(key) != h.header.get(key):
                raise ValueError(
                    f"{path}: the history was made by a different search ({key} differs); "
                    "use another output directory or start afresh with --force"
                )
        for rec in lines[1:]:
            if rec.get("kind") == "candidate":
                h.candidates[int(rec["index"])] = rec
            elif rec.get("kind") == "default":
                h.default = rec
        return h

    def add(self, record: Mapping[str, Any]) -> None:
        rec = dict(record)
        if rec["kind"] == "default":
            self.default = rec
        else:
            self.candidates[int(rec["index"])] = rec
        self.save(sync=False)

    def records(self) -> list[dict[str, Any]]:
        return [self.candidates[i] for i in sorted(self.candidates)]

    def save(self, *, sync: bool = True) -> None:
        if self.path is None:  # an in-memory history (the search rows of weightmerge eval)
            return
        lines = [self.header, *([self.default] if self.default else []), *self.records()]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines)
        atomic_write_text(self.path, text, sync=sync)
