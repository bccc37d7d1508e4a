"""Validation and resolution of method parameters (YAML names) into typed, per-model values."""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the config reads parameters without importing torch
    from weightmerge.methods.base import MethodSpec, Param


def did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_scalar(method: str, p: Param, value: Any, where: str) -> Any:
    label = f"parameter {p.name!r} of method {method!r}{where}"
    if p.kind in ("float", "float_list"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{label} must be a number, got {type(value).__name__} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{label} must be finite, got {value!r}")
    elif p.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{label} must be an integer, got {type(value).__name__} {value!r}")
    elif p.kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"{label} must be true or false, got {value!r}")
    elif p.kind == "str":
        if not isinstance(value, str):
            raise TypeError(f"{label} must be a string, got {type(value).__name__} {value!r}")
        if p.choices is not None and value not in p.choices:
            raise ValueError(
                f"{label} must be one of {list(p.choices)}, got {value!r}{did_you_mean(value, p.choices)}"
            )
    if p.kind in ("float", "int", "float_list") and value is not None:
        lo_bad = p.low is not None and (value <= p.low if p.low_open else value < p.low)
        hi_bad = p.high is not None and (value >= p.high if p.high_open else value > p.high)
        if lo_bad or hi_bad:
            lo = "" if p.low is None else ("(" if p.low_open else "[") + f"{p.low:g}"
            hi = "" if p.high is None else f"{p.high:g}" + (")" if p.high_open else "]")
            rng = f"{lo or '(-inf'}, {hi or 'inf)'}"
            raise ValueError(f"{label} must be in {rng}, got {value!r}")
    return value


def resolve_params(
    spec: MethodSpec,
    raw: Mapping[str, Any] | None,
    n_models: int,
    *,
    where: str = "",
    per_tensor: Collection[str] = (),
) -> dict[str, Any]:
    """Check ``raw`` against ``spec`` and fill defaults.

    Per-model parameters come back as tuples of length ``n_models``; everything else as a scalar.
    Errors name the method, the parameter and (``where``) the tensor or config location.
    ``per_tensor`` names parameters whose value varies per tensor (filters, gradients) and is
    therefore absent from a model-level ``raw``: a required one is not reported missing here (it
    comes back None); the per-tensor resolution checks it for every tensor.
    """
    raw = dict(raw or {})
    known = {p.name: p for p in spec.params}
    for key in raw:
        if key not in known:
            raise ValueError(
                f"unknown parameter {key!r} for method {spec.name!r}{where}{did_you_mean(key, list(known))}; "
                f"known: {sorted(known)}"
            )
    out: dict[str, Any] = {}
    for p in spec.params:
        if p.kind == "stats":
            out[p.name] = raw.get(p.name, p.default)
            if p.required and out[p.name] is None:
                raise ValueError(f"method {spec.name!r} needs parameter {p.name!r}{where}: {p.help}")
            continue
        value = raw.get(p.name, p.default)
        if value is None:
            if p.required and p.name not in per_tensor:
                raise ValueError(f"method {spec.name!r} needs parameter {p.name!r}{where}: {p.help}")
            out[p.name] = tuple([None] * n_models) if p.per_model else None
            continue
        if isinstance(value, (list, tuple)) and p.kind != "float_list":
            if not p.per_model:
                raise TypeError(
                    f"parameter {p.name!r} of method {spec.name!r}{where} takes one value, "
                    f"got a list {list(value)!r}"
                )
            if len(value) != n_models:
                raise ValueError(
                    f"parameter {p.name!r} of method {spec.name!r}{where} has {len(value)} values "
                    f"but there are {n_models} models (give one value per model, or a scalar)"
                )
            out[p.name] = tuple(_check_scalar(spec.name, p, v, where) for v in value)
        elif p.per_model:
            v = _check_scalar(spec.name, p, value, where)
            out[p.name] = tuple([v] * n_models)
        else:
            out[p.name] = _check_scalar(spec.name, p, value, where)
    return out
