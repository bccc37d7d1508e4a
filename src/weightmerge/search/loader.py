"""Loading a search config: the schema (``config``) checked, then the merge part and every
dimension checked against the method (``problem.check_config``), without reading any tensor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from weightmerge.search.config import SearchBlock, SearchConfig, SearchConfigError, _evaluator, _where
from weightmerge.search.problem import check_config


def parse_search_config(
    data: Any, *, base_dir: str | os.PathLike[str] | None = None, source: str | None = None
) -> SearchConfig:
    """Validate a parsed document; the merge part and every dimension are checked against the method."""
    prefix = f"{source}: " if source else ""
    try:
        if not isinstance(data, dict):
            raise SearchConfigError("a search config is a mapping: a merge config plus a search: block")
        if "search" not in data:
            raise SearchConfigError("no search: block (see docs/search.md)")
        raw = dict(data["search"] or {})
        if "evaluator" not in raw:
            raise SearchConfigError("search.evaluator: missing (benchmark, python or lm_eval)")
        raw["evaluator"] = _evaluator(raw["evaluator"])
        try:
            block = SearchBlock.model_validate(raw)
        except ValidationError as err:
            raise SearchConfigError(_where(err)) from None
        merge = {k: v for k, v in data.items() if k != "search"}
        cfg = SearchConfig(
            merge=merge,
            search=block,
            base_dir=str(Path(base_dir or os.getcwd()).resolve()),
            source=source,
        )
        check_config(cfg)
        return cfg
    except SearchConfigError as err:
        raise SearchConfigError(f"{prefix}{err}") from None


def load_search_config(path: str | os.PathLike[str]) -> SearchConfig:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"search config not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SearchConfigError(f"{path}: not valid YAML: {err}") from None
    cfg = parse_search_config(data, base_dir=p.parent, source=str(path))
    out = Path(cfg.search.output_dir)
    if not out.is_absolute():
        block = cfg.search.model_copy(update={"output_dir": str((p.parent / out).resolve())})
        cfg = cfg.model_copy(update={"search": block})
    return cfg
