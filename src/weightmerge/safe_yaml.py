"""Loading YAML without letting aliases multiply it, and quoting values in errors without printing
them whole.

YAML aliases make a document a graph: a few hundred bytes of ``&a [*b, *b, ...]`` lines describe
billions of values once expanded (an "alias bomb"). PyYAML shares the aliased objects, so parsing
is cheap; what explodes is anything that walks the document as a tree (validation, ``repr`` in
an error message). ``load_yaml`` counts the values of the expanded tree (memoized per shared
object, so the count itself is cheap) and refuses a document over ``max_values``.
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

MAX_VALUES = 1_000_000  # a merge config has hundreds of values; a million is far beyond any real one


class YAMLTooLarge(ValueError):
    """The document expands (through aliases) to more values than allowed."""


def expanded_size(obj: Any, *, limit: int, _memo: dict[int, int] | None = None) -> int:
    """Number of values (scalars, keys and containers) of ``obj`` expanded as a tree; stops counting
    (returns a value above ``limit``) as soon as ``limit`` is passed."""
    memo = {} if _memo is None else _memo
    if isinstance(obj, dict):
        children: list[Any] = [v for kv in obj.items() for v in kv]
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    else:
        return 1
    key = id(obj)
    if key in memo:
        return memo[key]
    memo[key] = limit + 1  # a cycle (YAML allows recursive aliases) counts as too large
    total = 1
    for c in children:
        total += expanded_size(c, limit=limit, _memo=memo)
        if total > limit:
            break
    memo[key] = total
    return total


def load_yaml(text: str, *, max_values: int = MAX_VALUES) -> Any:
    """``yaml.safe_load`` that refuses documents expanding to more than ``max_values`` values."""
    data = yaml.safe_load(text)
    if expanded_size(data, limit=max_values) > max_values:
        raise YAMLTooLarge(
            f"the YAML document expands to more than {max_values:,} values (aliases repeated "
            "inside aliases?); refusing it"
        )
    return data


_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def excerpt(value: Any, limit: int = 120) -> str:
    """A bounded ``repr`` of ``value`` for error messages (never more than ``limit`` characters,
    however large or deeply nested the value)."""
    r = _REPR.repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."
