"""mergekit's setting language: how one parameter's value is written and what it is for one tensor.

A setting is a scalar; a list of numbers = a *gradient* interpolated over the layer index
(``t = layer / (num_layers - 1)``, ``t = 1`` for a single layer, ``t = 0`` for tensors outside the
layer stack such as embeddings, final norm and lm_head); a list of booleans or strings picks
``values[int(t * (len - 1))]``; a ``{filter, value}`` entry or a list of them picks the first whose
filter is absent, ``'*'`` or a substring of the tensor name, and falls through to the next scope
(model -> global -> method default) when none matches. See docs/config.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from weightmerge.config.errors import ConfigError
from weightmerge.config.schema import check_keys
from weightmerge.methods._params import _check_scalar

if TYPE_CHECKING:
    from weightmerge.methods.base import MethodSpec, Param

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Gradient:
    """A list of values spread over the layer stack (mergekit's gradient)."""

    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Conditional:
    """One ``{filter, value}`` entry; ``filter`` None or ``'*'`` matches every tensor."""

    filter: str | None
    value: Scalar | Gradient | tuple[float, ...]


@dataclass(frozen=True)
class Filtered:
    """A list of conditional entries: the first matching one gives the value."""

    conditions: tuple[Conditional, ...]


# A validated setting: a plain value (scalar; a tuple for float_list params; a path string for
# statistics), a gradient, or filtered entries.
Setting = Scalar | tuple[float, ...] | Gradient | Filtered


def gradient_t(layer_index: int | None, num_layers: int | None) -> float:
    """mergekit's position in the layer stack: i / (L - 1); 1 for a single layer; 0 outside layers."""
    if layer_index is None:
        return 0.0
    if num_layers is None or num_layers < 1 or not 0 <= layer_index < num_layers:
        raise ValueError(f"layer_index {layer_index} is not within num_layers {num_layers}")
    return layer_index / (num_layers - 1) if num_layers > 1 else 1.0


def interpolate(values: Sequence[float], t: float) -> float:
    """Piecewise-linear value at ``t`` in [0, 1] of ``values`` spread evenly over [0, 1]."""
    pos = t * (len(values) - 1)
    lo = int(pos)
    hi = min(len(values) - 1, lo + 1)
    frac = pos - lo
    return (1 - frac) * values[lo] + frac * values[hi]


def evaluate(setting: Setting | None, *, tensor_name: str, t: float, kind: str) -> Any:
    """The value of ``setting`` for one tensor, or None when no filter matches (fall through)."""
    if setting is None:
        return None
    if isinstance(setting, Filtered):
        for cond in setting.conditions:
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate(cond.value, tensor_name=tensor_name, t=t, kind=kind)
        return None
    if isinstance(setting, Gradient):
        if kind == "float":
            return interpolate([float(v) for v in setting.values], t)
        return setting.values[int(t * (len(setting.values) - 1))]
    if isinstance(setting, tuple):
        return list(setting)
    return setting


def is_varying(setting: Setting) -> bool:
    return isinstance(setting, (Gradient, Filtered))


# ---------------------------------------------------------------------------------------------
# Layer positions
# ---------------------------------------------------------------------------------------------

# A numbered block of a layer stack: model.layers.3., transformer.h.0., encoder.layer.11.,
# blocks.2., encoder.block.4. (T5), visual.transformer.resblocks.7. (OpenCLIP). Leftmost wins.
_LAYER_RE = re.compile(r"(?:^|\.)(layers|layer|h|blocks|block|resblocks)\.(\d+)(?=\.|$)")


def _layer_match(tensor_name: str) -> tuple[str, int] | None:
    m = _LAYER_RE.search(tensor_name)
    if m is None:
        return None
    return tensor_name[: m.start(2) - 1], int(m.group(2))


def layer_index_of(tensor_name: str) -> int | None:
    """Index of the layer holding ``tensor_name`` (``model.layers.7.mlp.up_proj.weight`` -> 7), or
    None for tensors outside the layer stack (embeddings, final norm, lm_head)."""
    found = _layer_match(tensor_name)
    return None if found is None else found[1]


def layer_positions(names: Iterable[str]) -> dict[str, tuple[int | None, int | None]]:
    """``{name: (layer_index, num_layers)}`` for ``raw_params_for``. ``num_layers`` is counted per
    stack (the name prefix before the index, so an encoder and a decoder count separately) as the
    largest index + 1, which is mergekit's ``num_hidden_layers`` for a complete checkpoint."""
    names = list(names)
    found = {n: _layer_match(n) for n in names}
    counts: dict[str, int] = {}
    for m in found.values():
        if m is not None:
            counts[m[0]] = max(counts.get(m[0], 0), m[1] + 1)
    return {n: (None, None) if m is None else (m[1], counts[m[0]]) for n, m in found.items()}


# ---------------------------------------------------------------------------------------------
# Writing settings back (resolved config) and describing them (validate)
# ---------------------------------------------------------------------------------------------


def setting_to_data(s: Setting) -> Any:
    if isinstance(s, Filtered):
        return [
            ({"filter": c.filter} if c.filter is not None else {}) | {"value": setting_to_data(c.value)}
            for c in s.conditions
        ]
    if isinstance(s, Gradient):
        return list(s.values)
    if isinstance(s, tuple):
        return list(s)
    return s


def describe_setting(s: Setting) -> str:
    if isinstance(s, Filtered):
        parts = [
            f"{'else' if c.filter in (None, '*') else repr(c.filter)} -> {describe_setting(c.value)}"
            for c in s.conditions
        ]
        return "{" + "; ".join(parts) + "}"
    if isinstance(s, Gradient):
        return f"gradient {list(s.values)} over layers"
    if isinstance(s, tuple):
        return repr(list(s))
    return repr(s)


# ---------------------------------------------------------------------------------------------
# Reading a setting from YAML
# ---------------------------------------------------------------------------------------------


def _leaf(spec: MethodSpec, p: Param, value: Any, location: str) -> Scalar:
    if isinstance(value, (list, tuple, Mapping)) or value is None:
        raise ConfigError(
            f"expected one {p.kind} value here, got {type(value).__name__} {value!r}", location=location
        )
    if p.kind in ("float", "float_list") and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string; mergekit accepts it as a number
            as_float = float(value)
        except ValueError:
            as_float = math.nan
        if math.isfinite(as_float):
            value = as_float
    if p.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        return _check_scalar(spec.name, p, value, "")
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err), location=location) from None


def _plain(spec: MethodSpec, p: Param, value: Any, location: str) -> Scalar | tuple[float, ...] | Gradient:
    """A scalar, a float_list value, or a gradient (a list of scalars)."""
    if isinstance(value, list):
        if not value:
            raise ConfigError("empty list", location=location)
        if p.kind == "float_list":
            return tuple(float(_leaf(spec, p, v, f"{location}[{i}]")) for i, v in enumerate(value))
        if p.kind == "int":
            raise ConfigError(
                f"parameter {p.name!r} is an integer: a gradient (list) is not allowed", location=location
            )
        return Gradient(tuple(_leaf(spec, p, v, f"{location}[{i}]") for i, v in enumerate(value)))
    if p.kind == "float_list":
        raise ConfigError(f"parameter {p.name!r} takes a list of numbers, got {value!r}", location=location)
    return _leaf(spec, p, value, location)


def parse_setting(spec: MethodSpec, p: Param, value: Any, location: str) -> Setting:
    """A parameter's value as written in YAML, checked against its declaration (not ``stats``)."""
    is_cond = isinstance(value, Mapping) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)
    )
    if isinstance(value, list) and any(isinstance(v, Mapping) for v in value) and not is_cond:
        raise ConfigError(
            "mixes {filter, value} entries with plain values; write every entry as {filter?, value}",
            location=location,
        )
    if is_cond:
        entries = [value] if isinstance(value, Mapping) else value
        conds = []
        for i, entry in enumerate(entries):
            where = location if isinstance(value, Mapping) else f"{location}[{i}]"
            check_keys(entry, ("filter", "value"), where)
            if "value" not in entry:
                raise ConfigError("missing 'value'", location=where)
            flt = entry.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise ConfigError(
                    f"a filter is a substring of tensor names, got {flt!r}", location=f"{where}.filter"
                )
            conds.append(Conditional(flt, _plain(spec, p, entry["value"], f"{where}.value")))
        setting: Setting = Filtered(tuple(conds))
    else:
        setting = _plain(spec, p, value, location)
    if not p.tensor_scoped and is_varying(setting):
        raise ConfigError(
            f"parameter {p.name!r} of method {spec.name!r} applies to the whole model: give one value "
            "(filters and gradients are not allowed for it)",
            location=location,
        )
    return setting
