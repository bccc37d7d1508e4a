"""Coefficient search: black-box optimisation of merge parameters on validation data.

``weightmerge search CONFIG`` (or :func:`run_search`) takes a merge config with a ``search:`` block
(docs/search.md), loads the task vectors once, merges every candidate in memory, scores it on the
validation split with an evaluator (the built-in benchmark, a Python callable, lm-evaluation-harness),
and scores the chosen point on test once at the end. Heavy imports (torch, the optimizers, Ray)
happen inside functions so that importing this package is cheap.
"""

from __future__ import annotations

from weightmerge.search.config import SearchConfig, SearchConfigError
from weightmerge.search.loader import load_search_config, parse_search_config

__all__ = ["SearchConfig", "SearchConfigError", "load_search_config", "parse_search_config", "run_search"]


def run_search(*args: object, **kwargs: object) -> object:
    """See :func:`weightmerge.search.runner.run_search`."""
    from weightmerge.search.runner import run_search as _run

    return _run(*args, **kwargs)  # type: ignore[arg-type]
