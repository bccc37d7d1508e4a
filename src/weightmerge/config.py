"""The merge configuration: a YAML file in mergekit's format (plus a few keys of our own),
validated once at the boundary into a :class:`MergeConfig` the engine reads.

Accepted document (mergekit 0.1.5 keys, then ours)::

    merge_method: ties                 # a name from weightmerge.methods.registry.METHODS
    base_model: path/to/base           # or BASE+LORA, or {model: ..., lora: ...}
    models:
      - model: path/to/a               # a checkpoint, BASE+ADAPTER, or a PEFT adapter directory
        parameters: {weight: 1.0, density: [0.2, 0.5, 0.8]}
    parameters:                        # global; models[i].parameters override these
      density:
        - filter: self_attn            # plain substring match on the tensor name, first match wins
          value: 0.3
        - value: 0.5
    dtype: bfloat16                    # mergekit's compute dtype, see "dtypes" below
    out_dtype: bfloat16
    tokenizer_source: base             # or a model path; or tokenizer: {source: ...}
    chat_template: chatml              # recorded, written with the output
    seed: 0                            # ours: seed of every random draw (DARE)
    exclude: ['classifier']            # ours: regexes (re.search); matching tensors keep the base value

Parameter settings follow mergekit: a scalar; a list of numbers = a *gradient* interpolated over
the layer index (``t = layer / (num_layers - 1)``, ``t = 1`` for a single layer, ``t = 0`` for
tensors outside the layer stack such as embeddings, final norm and lm_head); a list of booleans
or strings picks ``values[int(t * (len - 1))]``; a ``{filter, value}`` entry or a list of them picks
the first whose filter is absent, ``'*'`` or a substring of the tensor name, and falls through to
the next scope (model -> global -> method default) when none matches. In YAML a list is therefore
always a gradient, never "one value per model": per-model values go under ``models[i].parameters``.

Errors raise :class:`ConfigError` (a ValueError) naming the file and the location, e.g.
``models[1].parameters.densty: unknown parameter 'densty' for method 'ties' (did you mean
'density'?)``. The engine uses :meth:`MergeConfig.raw_params_for` / :meth:`params_by_tensor`
(per-tensor values, filters and gradients applied) and :meth:`MergeConfig.model_params`
(model-level values, for statistics passes and finalize). See docs/config.md.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from weightmerge.methods._params import _check_scalar, did_you_mean, resolve_params
from weightmerge.methods.base import MethodSpec, Param
from weightmerge.safe_yaml import YAMLTooLarge, excerpt, load_yaml

Scalar = bool | int | float | str

# mergekit parameters that change nothing in its results (or ours); accepted with a note and
# dropped when the method does not declare them itself. Key: method name, or "*" for every method.
NOOP_MERGEKIT_PARAMS: dict[str, dict[str, str]] = {
    "*": {"int8_mask": "mergekit's int8 mask storage only saves memory"},
    "task_arithmetic": {
        "density": "mergekit's task_arithmetic accepts it but does not sparsify",
        "rescale": "mergekit's task_arithmetic accepts it but does not sparsify",
    },
}
# mergekit values spelled differently here: (method, parameter) -> {mergekit value: ours}.
MERGEKIT_VALUE_ALIASES: dict[tuple[str, str], dict[Any, Any]] = {
    ("dare_linear", "rescale"): {True: "l1", False: "none"},
    ("dare_ties", "rescale"): {True: "l1", False: "none"},
}
FLOAT_DTYPES = ("float32", "float64", "bfloat16", "float16")
COMPUTE_DTYPES = ("float32", "float64")
UNSUPPORTED_TOP_LEVEL = {
    "slices": "'slices:' (layer ranges) is not supported yet; when every source spans all layers (the usual "
    "slerp config), list the models under 'models:' instead",
    "modules": "'modules:' (per-module merges) is not supported yet; list whole models under 'models:'",
}
ADAPTER_CONFIG = "adapter_config.json"


MAX_MESSAGE = 2000


class ConfigError(ValueError):
    """A config the user must fix. ``str()`` is one line: ``FILE: LOCATION: MESSAGE``."""

    def __init__(self, message: str, *, location: str = "", source: str | None = None) -> None:
        self.message = " ".join(message.split())  # always one line
        if len(self.message) > MAX_MESSAGE:  # values quoted in messages are untrusted in size
            self.message = self.message[: MAX_MESSAGE - 3] + "..."
        self.location = location
        self.source = source
        super().__init__(self._text())

    def _text(self) -> str:
        return ": ".join(p for p in (self.source, self.location, self.message) if p)

    def with_source(self, source: str | None) -> ConfigError:
        return ConfigError(self.message, location=self.location, source=source)


# ---------------------------------------------------------------------------------------------
# Parameter settings (validated, typed) and their evaluation for one tensor
# ---------------------------------------------------------------------------------------------


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


def _is_varying(setting: Setting) -> bool:
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
# Model references
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A checkpoint (``path``), optionally with a PEFT adapter (``lora``) applied on top of it.

    Paths are absolute (resolved against the config file's directory). mergekit's ``A+B`` string
    means model A with adapter B; a ``models:`` entry naming a directory that holds an
    ``adapter_config.json`` is read as ``base_model + that adapter``.
    """

    path: str
    lora: str | None = None

    def __str__(self) -> str:
        return self.path if self.lora is None else f"{self.path}+{self.lora}"

    def to_yaml_value(self) -> str | dict[str, str]:
        if self.lora is None and "+" not in self.path:
            return self.path
        if self.lora is None:
            return {"model": self.path}
        if "+" in self.path or "+" in self.lora:
            return {"model": self.path, "lora": self.lora}
        return f"{self.path}+{self.lora}"

    def paths(self) -> list[str]:
        return [self.path] if self.lora is None else [self.path, self.lora]


@dataclass(frozen=True)
class ModelEntry:
    model: ModelRef
    parameters: Mapping[str, Setting] = field(default_factory=dict)  # validated for the method


# ---------------------------------------------------------------------------------------------
# The document schema (structure and plain types); settings are checked per method afterwards
# ---------------------------------------------------------------------------------------------


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TokenizerSection(_Doc):
    source: Any = "union"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class ModelEntryDoc(_Doc):
    model: Any
    parameters: dict[str, Any] | None = None


class MergeDocument(_Doc):
    """The YAML document as written (mergekit 0.1.5 keys + ``seed`` and ``exclude``)."""

    merge_method: str
    base_model: Any = None
    models: list[ModelEntryDoc]
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Any = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None
    seed: int = Field(default=0, ge=0)
    exclude: list[str] = Field(default_factory=list)


_TOP_KEYS = tuple(MergeDocument.model_fields)
_ENTRY_KEYS = tuple(ModelEntryDoc.model_fields)
_TOKENIZER_KEYS = tuple(TokenizerSection.model_fields)


def _loc(parts: Iterable[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _check_keys(raw: Mapping[str, Any], allowed: Sequence[str], where: str, what: str = "key") -> None:
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {key!r}", location=where)
        if key not in allowed:
            loc = f"{where}.{key}" if where else key
            raise ConfigError(
                f"unknown {what} {key!r}{did_you_mean(key, allowed)}; allowed: {list(allowed)}", location=loc
            )


def _precheck(raw: Mapping[str, Any]) -> None:
    for key, why in UNSUPPORTED_TOP_LEVEL.items():
        if key in raw:
            raise ConfigError(why, location=key)
    _check_keys(raw, _TOP_KEYS, "")
    if "models" not in raw:
        raise ConfigError("missing: list the models to merge under 'models:'", location="models")
    if isinstance(raw.get("models"), list):
        for i, entry in enumerate(raw["models"]):
            if isinstance(entry, str):
                raise ConfigError(
                    f"a model entry is a mapping: write '- model: {entry}'", location=f"models[{i}]"
                )
            if isinstance(entry, Mapping):
                _check_keys(entry, _ENTRY_KEYS, f"models[{i}]")
    if isinstance(raw.get("tokenizer"), Mapping):
        _check_keys(raw["tokenizer"], _TOKENIZER_KEYS, "tokenizer")


def _pydantic_error(err: ValidationError) -> ConfigError:
    e = err.errors()[0]
    loc = _loc([p for p in e["loc"] if isinstance(p, (str, int))])
    msg = e["msg"]
    if e["type"] == "missing":
        msg = "missing (required)"
    elif "input" in e and e["type"] != "missing":
        msg = f"{msg}, got {type(e['input']).__name__} {excerpt(e['input'])}"
    return ConfigError(msg, location=loc)


# ---------------------------------------------------------------------------------------------
# The validated configuration
# ---------------------------------------------------------------------------------------------


def _dtype_name(value: str | None, location: str) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.")
    if name not in FLOAT_DTYPES:
        raise ConfigError(
            f"unknown dtype {value!r}{did_you_mean(name, FLOAT_DTYPES)}; one of {list(FLOAT_DTYPES)}",
            location=location,
        )
    return name


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge configuration (build it with :func:`load_config`). Read-only."""

    merge_method: str
    base_model: ModelRef | None
    models: tuple[ModelEntry, ...]  # the models merged (a base listed among them is removed, as mergekit)
    parameters: Mapping[str, Setting]  # global settings, validated for the method
    dtype: str | None = None  # as written (mergekit's compute dtype)
    out_dtype: str | None = None  # as written
    tokenizer_source: str | None = None  # "base", an absolute model path, or None (engine default)
    chat_template: str | None = None
    seed: int = 0
    exclude: tuple[str, ...] = ()
    source: str | None = None  # the YAML file, if loaded from one
    notes: tuple[str, ...] = ()  # what the user should know (ignored mergekit knobs, dtype choices)

    # -- method -------------------------------------------------------------------------------
    @property
    def spec(self) -> MethodSpec:
        from weightmerge.methods.registry import get_method

        return get_method(self.merge_method)

    @property
    def n_models(self) -> int:
        return len(self.models)

    # -- dtypes -------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 if ``dtype: float64``, else float32 (also for mergekit's bfloat16/float16)."""
        return torch.float64 if self.dtype == "float64" else torch.float32

    @property
    def output_dtype(self) -> torch.dtype | None:
        """``out_dtype``, else ``dtype`` (mergekit writes in its compute dtype), else None: each
        tensor keeps the base model's dtype."""
        name = self.out_dtype or self.dtype
        return None if name is None else getattr(torch, name)

    # -- tokenizer ----------------------------------------------------------------------------
    @property
    def tokenizer_path(self) -> str | None:
        """Directory to copy tokenizer files from; None = the engine's default (the base model's)."""
        if self.tokenizer_source == "base":
            return self.base_model.path if self.base_model is not None else None
        return self.tokenizer_source

    def referenced_paths(self) -> list[str]:
        """Every file/directory the config names (models, adapters, statistics, tokenizer)."""
        out: list[str] = []
        if self.base_model is not None:
            out += self.base_model.paths()
        for entry in self.models:
            out += entry.model.paths()
            for p in self.spec.params:
                if p.kind == "stats" and isinstance(entry.parameters.get(p.name), str):
                    out.append(str(entry.parameters[p.name]))
        if self.tokenizer_source not in (None, "base"):
            out.append(str(self.tokenizer_source))
        return list(dict.fromkeys(out))

    # -- parameters ---------------------------------------------------------------------------
    def _value(self, p: Param, model: int | None, tensor_name: str, t: float) -> Any:
        if model is not None:
            v = evaluate(self.models[model].parameters.get(p.name), tensor_name=tensor_name, t=t, kind=p.kind)
            if v is not None:
                return v
        return evaluate(self.parameters.get(p.name), tensor_name=tensor_name, t=t, kind=p.kind)

    def raw_params_for(
        self, tensor_name: str, *, layer_index: int | None = None, num_layers: int | None = None
    ) -> dict[str, Any]:
        """Parameters for one tensor, filters and gradients applied, ready for
        ``resolve_params(spec, raw, n_models)``: per-model parameters as a list over models (a
        model's own setting, else the global one, else the method default), others scalars.
        Parameters set nowhere are left out (resolve_params fills the defaults).

        ``layer_index``/``num_layers`` place the tensor in its layer stack for gradients (see
        :func:`layer_positions`); None = outside the layers (t = 0, mergekit's rule for
        embeddings, final norm and lm_head)."""
        t = gradient_t(layer_index, num_layers)
        out: dict[str, Any] = {}
        for p in self.spec.params:
            if p.per_model or p.kind == "stats":
                values = [self._value(p, i, tensor_name, t) for i in range(self.n_models)]
                if all(v is None for v in values):
                    continue
                out[p.name] = [p.default if v is None else v for v in values]
            else:
                v = self._value(p, None, tensor_name, t)
                if v is not None:
                    out[p.name] = v
        return out

    def model_params(self) -> dict[str, Any]:
        """Model-level parameters (for ``MethodSpec.passes/check/finalize/is_row_chunkable``), in the
        raw form ``resolve_params`` takes: every parameter whose value is the same for all tensors
        (all ``tensor_scoped=False`` ones -- the loader rejects filters/gradients on those -- and
        tensor-scoped ones written as plain values). Tensor-scoped parameters that vary (filters,
        gradients) are left out: read them per tensor with :meth:`raw_params_for`. Statistics
        (``kind="stats"``) come as a list of paths, one per model: the engine opens them."""
        out: dict[str, Any] = {}
        for p in self.spec.params:
            settings = [self.parameters.get(p.name)] + [e.parameters.get(p.name) for e in self.models]
            if any(s is not None and _is_varying(s) for s in settings):
                continue
            if p.per_model or p.kind == "stats":
                values = [self._value(p, i, "", 0.0) for i in range(self.n_models)]
                if not all(v is None for v in values):
                    out[p.name] = [p.default if v is None else v for v in values]
            else:
                v = self._value(p, None, "", 0.0)
                if v is not None:
                    out[p.name] = v
        return out

    def varying_params(self) -> dict[str, str]:
        """``{param: where}`` for every parameter set by a filter or a gradient somewhere (its
        value may differ per tensor), for ``MethodSpec.check_rules``."""
        out: dict[str, str] = {}
        for p in self.spec.params:
            where = [("parameters", self.parameters.get(p.name))] + [
                (f"models[{i}].parameters", e.parameters.get(p.name)) for i, e in enumerate(self.models)
            ]
            for loc, s in where:
                if s is not None and _is_varying(s) and p.name not in out:
                    out[p.name] = f"{loc}.{p.name} is a filter or gradient"
        return out

    def resolved_model_params(self) -> dict[str, Any]:
        """:meth:`model_params` checked and completed by ``resolve_params`` (defaults filled)."""
        return resolve_params(self.spec, self.model_params(), self.n_models, where=" (config)")

    def params_by_tensor(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Resolved parameters of every tensor in ``names`` (resolve_params applied), computed
        eagerly so a bad combination is reported at plan time, naming the tensor."""
        spec = self.spec
        out: dict[str, dict[str, Any]] = {}
        cache: dict[str, dict[str, Any]] = {}
        for name, (idx, n_layers) in layer_positions(names).items():
            raw = self.raw_params_for(name, layer_index=idx, num_layers=n_layers)
            key = repr(sorted(raw.items()))
            if key not in cache:
                try:
                    cache[key] = resolve_params(spec, raw, self.n_models, where=f" (tensor {name!r})")
                except (ValueError, TypeError) as err:
                    raise ConfigError(str(err), location="parameters", source=self.source) from None
            out[name] = cache[key]
        return out

    # -- output -------------------------------------------------------------------------------
    def resolved(self) -> dict[str, Any]:
        """The configuration as it will run, as plain data (loadable again by load_config):
        absolute paths, normalised dtype names, and every method parameter the user did not set
        written with its default (so the record survives a change of defaults)."""
        spec = self.spec
        params = {k: _setting_to_data(v) for k, v in self.parameters.items()}
        set_anywhere = set(self.parameters) | {k for e in self.models for k in e.parameters}
        for p in spec.params:
            if p.name not in set_anywhere and p.kind != "stats" and p.default is not None:
                params[p.name] = list(p.default) if isinstance(p.default, tuple) else p.default
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            out["base_model"] = self.base_model.to_yaml_value()
        out["models"] = [
            {"model": e.model.to_yaml_value()}
            | (
                {"parameters": {k: _setting_to_data(v) for k, v in e.parameters.items()}}
                if e.parameters
                else {}
            )
            for e in self.models
        ]
        out["parameters"] = params
        for key in ("dtype", "out_dtype", "tokenizer_source", "chat_template"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["seed"] = self.seed
        out["exclude"] = list(self.exclude)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False, default_flow_style=None)

    def describe(self) -> list[str]:
        """Human-readable summary lines (``weightmerge validate``)."""
        spec = self.spec
        lines = [f"method: {self.merge_method} ({spec.summary})"]
        lines.append(f"base model: {self.base_model if self.base_model is not None else '(none)'}")
        lines.append(f"models ({self.n_models}):")
        for i, e in enumerate(self.models):
            own = ", ".join(f"{k}={_describe_setting(v)}" for k, v in e.parameters.items())
            lines.append(f"  [{i}] {e.model}" + (f"  ({own})" if own else ""))
        lines.append("parameters:")
        set_anywhere = set(self.parameters) | {k for e in self.models for k in e.parameters}
        for p in spec.params:
            if p.name in self.parameters:
                shown = _describe_setting(self.parameters[p.name])
            elif p.name in set_anywhere:
                shown = "(per model, see above)" + ("" if p.kind == "stats" else f"; default {p.default!r}")
            elif p.kind == "stats":
                shown = "(not given)"
            else:
                shown = f"{p.default!r} (default)"
            lines.append(f"  {p.name}: {shown}")
        out = self.output_dtype
        lines.append(
            f"compute dtype: {str(self.compute_dtype).removeprefix('torch.')}; output dtype: "
            + (str(out).removeprefix("torch.") if out is not None else "as the base model")
        )
        lines.append(f"seed: {self.seed}")
        if self.exclude:
            lines.append(f"exclude (kept at the base value): {list(self.exclude)}")
        tok = self.tokenizer_path
        lines.append(f"tokenizer: {tok if tok is not None else 'from the base model (default)'}")
        if self.chat_template is not None:
            lines.append(f"chat template: {self.chat_template}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return lines


def _setting_to_data(s: Setting) -> Any:
    if isinstance(s, Filtered):
        return [
            ({"filter": c.filter} if c.filter is not None else {}) | {"value": _setting_to_data(c.value)}
            for c in s.conditions
        ]
    if isinstance(s, Gradient):
        return list(s.values)
    if isinstance(s, tuple):
        return list(s)
    return s


def _describe_setting(s: Setting) -> str:
    if isinstance(s, Filtered):
        parts = [
            f"{'else' if c.filter in (None, '*') else repr(c.filter)} -> {_describe_setting(c.value)}"
            for c in s.conditions
        ]
        return "{" + "; ".join(parts) + "}"
    if isinstance(s, Gradient):
        return f"gradient {list(s.values)} over layers"
    if isinstance(s, tuple):
        return repr(list(s))
    return repr(s)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class _Loader:
    """Turns a checked document into a MergeConfig; every error names its location."""

    def __init__(self, doc: MergeDocument, base_dir: str) -> None:
        self.doc = doc
        self.base_dir = base_dir
        self.notes: list[str] = []

    def path(self, value: Any, location: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"expected a path string, got {type(value).__name__} {value!r}", location=location
            )
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value.strip())))

    def model_ref(self, value: Any, location: str) -> ModelRef:
        if isinstance(value, Mapping):
            _check_keys(value, ("model", "lora"), location)
            if "model" not in value:
                raise ConfigError("missing 'model' (the checkpoint path)", location=location)
            lora = value.get("lora")
            return ModelRef(
                self.path(value["model"], f"{location}.model"),
                None if lora is None else self.path(lora, f"{location}.lora"),
            )
        if not isinstance(value, str):
            raise ConfigError(
                f"expected a path (or 'MODEL+ADAPTER'), got {type(value).__name__} {value!r}",
                location=location,
            )
        parts = value.split("+")
        if len(parts) > 2:
            raise ConfigError(
                f"cannot parse {value!r}: at most one '+' (MODEL+ADAPTER); use {{model: ..., lora: ...}} "
                "for paths that contain '+'",
                location=location,
            )
        return ModelRef(
            self.path(parts[0], location), self.path(parts[1], location) if len(parts) == 2 else None
        )

    # -- settings -----------------------------------------------------------------------------
    def leaf(self, spec: MethodSpec, p: Param, value: Any, location: str) -> Scalar:
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

    def plain(
        self, spec: MethodSpec, p: Param, value: Any, location: str
    ) -> Scalar | tuple[float, ...] | Gradient:
        """A scalar, a float_list value, or a gradient (a list of scalars)."""
        if isinstance(value, list):
            if not value:
                raise ConfigError("empty list", location=location)
            if p.kind == "float_list":
                return tuple(float(self.leaf(spec, p, v, f"{location}[{i}]")) for i, v in enumerate(value))
            if p.kind == "int":
                raise ConfigError(
                    f"parameter {p.name!r} is an integer: a gradient (list) is not allowed", location=location
                )
            return Gradient(tuple(self.leaf(spec, p, v, f"{location}[{i}]") for i, v in enumerate(value)))
        if p.kind == "float_list":
            raise ConfigError(
                f"parameter {p.name!r} takes a list of numbers, got {value!r}", location=location
            )
        return self.leaf(spec, p, value, location)

    def setting(self, spec: MethodSpec, p: Param, value: Any, location: str) -> Setting:
        if p.kind == "stats":
            if isinstance(value, (list, Mapping)):
                raise ConfigError(
                    f"statistics {p.name!r} are one file per model (a path), got {type(value).__name__}",
                    location=location,
                )
            return self.path(value, location)
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
                _check_keys(entry, ("filter", "value"), where)
                if "value" not in entry:
                    raise ConfigError("missing 'value'", location=where)
                flt = entry.get("filter")
                if flt is not None and not isinstance(flt, str):
                    raise ConfigError(
                        f"a filter is a substring of tensor names, got {flt!r}", location=f"{where}.filter"
                    )
                conds.append(Conditional(flt, self.plain(spec, p, entry["value"], f"{where}.value")))
            setting: Setting = Filtered(tuple(conds))
        else:
            setting = self.plain(spec, p, value, location)
        if not p.tensor_scoped and _is_varying(setting):
            raise ConfigError(
                f"parameter {p.name!r} of method {spec.name!r} applies to the whole model: give one value "
                "(filters and gradients are not allowed for it)",
                location=location,
            )
        return setting

    def settings(
        self, spec: MethodSpec, raw: Mapping[str, Any] | None, location: str, *, per_model: bool
    ) -> dict[str, Setting]:
        known = {p.name: p for p in spec.params}
        out: dict[str, Setting] = {}
        for key, value in (raw or {}).items():
            loc = f"{location}.{key}"
            if key not in known:
                noop = {**NOOP_MERGEKIT_PARAMS["*"], **NOOP_MERGEKIT_PARAMS.get(spec.name, {})}
                if key in noop:
                    self.notes.append(f"{loc} ignored: {noop[key]}")
                    continue
                raise ConfigError(
                    f"unknown parameter {key!r} for method {spec.name!r}{did_you_mean(key, list(known))}; "
                    f"known: {sorted(known)}",
                    location=loc,
                )
            p = known[key]
            if per_model and not (p.per_model or p.kind == "stats"):
                raise ConfigError(
                    f"parameter {key!r} of method {spec.name!r} is the same for every model: move it to the "
                    "top-level 'parameters'",
                    location=loc,
                )
            if not per_model and p.kind == "stats":
                raise ConfigError(
                    f"statistics {key!r} belong to each model: give one file per model under "
                    f"models[i].parameters.{key}",
                    location=loc,
                )
            aliases = MERGEKIT_VALUE_ALIASES.get((spec.name, key), {})
            if isinstance(value, bool) and value in aliases and p.kind == "str":
                self.notes.append(f"{loc}: mergekit's {value!r} is {aliases[value]!r} here")
                value = aliases[value]
            out[key] = self.setting(spec, p, value, loc)
        return out

    # -- the whole document ---------------------------------------------------------------------
    def build(self, source: str | None) -> MergeConfig:
        from weightmerge.methods.registry import get_method

        doc = self.doc
        try:
            spec = get_method(doc.merge_method)
        except ValueError as err:
            raise ConfigError(str(err), location="merge_method") from None
        base = None if doc.base_model is None else self.model_ref(doc.base_model, "base_model")
        if base is not None and base.lora is not None:
            self.notes.append(f"base_model is {base.path} with adapter {base.lora} applied")

        entries: list[ModelEntry] = []
        for i, e in enumerate(doc.models):
            loc = f"models[{i}]"
            ref = self.model_ref(e.model, f"{loc}.model")
            ref = self.adapter_dir(ref, base, loc)
            params = self.settings(spec, e.parameters, f"{loc}.parameters", per_model=True)
            if base is not None and ref == base and spec.needs_base:
                self.notes.append(
                    f"{loc} is the base model: method {spec.name!r} takes the base separately, so it is not "
                    "merged as one of the models"
                    + (" (its parameters are ignored, as in mergekit)" if params else "")
                )
                continue
            if any(ref == x.model for x in entries):
                self.notes.append(f"{loc} ({ref}) is listed more than once")
            entries.append(ModelEntry(ref, params))
        if not entries:
            raise ConfigError("no models to merge (only the base model is listed)", location="models")
        if spec.needs_base and base is None:
            raise ConfigError(
                f"method {spec.name!r} needs a base model: set 'base_model'",
                location="base_model",
            )
        n = len(entries)
        if n < spec.min_models:
            raise ConfigError(
                f"method {spec.name!r} needs at least {spec.min_models} models, got {n}", location="models"
            )
        if spec.max_models is not None and n > spec.max_models:
            raise ConfigError(
                f"method {spec.name!r} takes at most {spec.max_models} models, got {n}", location="models"
            )
        if base is not None and spec.name == "linear" and all(x.model != base for x in entries):
            self.notes.append(
                "base_model is not averaged in: list it under 'models' to include it (mergekit's linear "
                "adds it with the global weight)"
            )

        glob = self.settings(spec, doc.parameters, "parameters", per_model=False)
        for p in spec.params:  # statistics: every model or none
            if p.kind == "stats":
                given = [i for i, x in enumerate(entries) if p.name in x.parameters]
                if given and len(given) != n:
                    missing = [i for i in range(n) if i not in given]
                    raise ConfigError(
                        f"statistics {p.name!r} are given for models {given} but not for {missing}: give one "
                        "file per model",
                        location="models",
                    )

        dtype = _dtype_name(doc.dtype, "dtype")
        out_dtype = _dtype_name(doc.out_dtype, "out_dtype")
        if dtype in ("bfloat16", "float16"):
            self.notes.append(
                f"dtype {dtype}: weightmerge computes in float32 (mergekit would compute in {dtype}) "
                f"and writes {out_dtype or dtype}"
            )
        tokenizer = self.tokenizer(doc, base)
        for i, rx in enumerate(doc.exclude):
            try:
                re.compile(rx)
            except re.error as err:
                raise ConfigError(
                    f"invalid regular expression {rx!r}: {err}", location=f"exclude[{i}]"
                ) from None

        cfg = MergeConfig(
            merge_method=spec.name,
            base_model=base,
            models=tuple(entries),
            parameters=glob,
            dtype=dtype,
            out_dtype=out_dtype,
            tokenizer_source=tokenizer,
            chat_template=doc.chat_template,
            seed=doc.seed,
            exclude=tuple(doc.exclude),
            source=source,
            notes=tuple(self.notes),
        )
        try:  # model-level check with the values that hold outside filters/gradients
            resolved = resolve_params(
                spec, cfg.raw_params_for("", layer_index=None, num_layers=None), n, where=" (config)"
            )
            spec.check_rules(resolved, n, cfg.varying_params())
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err), location="parameters") from None
        return cfg

    def adapter_dir(self, ref: ModelRef, base: ModelRef | None, loc: str) -> ModelRef:
        """A ``models:`` entry that is a PEFT adapter directory means base_model + adapter."""
        if ref.lora is not None or not os.path.isfile(os.path.join(ref.path, ADAPTER_CONFIG)):
            return ref
        if base is None:
            raise ConfigError(
                f"{ref.path} is a PEFT adapter ({ADAPTER_CONFIG}): set 'base_model' (the model it adapts) "
                "or write 'BASE+ADAPTER'",
                location=f"{loc}.model",
            )
        self.notes.append(f"{loc} is a PEFT adapter: merged as {base.path} + {ref.path}")
        return ModelRef(base.path, ref.path)

    def tokenizer(self, doc: MergeDocument, base: ModelRef | None) -> str | None:
        if doc.tokenizer_source is not None and doc.tokenizer is not None:
            raise ConfigError("give either 'tokenizer_source' or 'tokenizer', not both", location="tokenizer")
        loc, source = "tokenizer_source", doc.tokenizer_source
        if doc.tokenizer is not None:
            loc, source = "tokenizer.source", doc.tokenizer.source
            if doc.tokenizer.tokens:
                raise ConfigError(
                    "not supported: weightmerge does not add or re-map tokens; merge models that share "
                    "a vocabulary",
                    location="tokenizer.tokens",
                )
            if doc.tokenizer.pad_to_multiple_of is not None:
                raise ConfigError(
                    "not supported: vocabulary padding", location="tokenizer.pad_to_multiple_of"
                )
        if source is None:
            return None
        if source == "union":
            raise ConfigError(
                "'union' is not supported: weightmerge does not build a union vocabulary (nor re-map "
                "embeddings); use 'base' or a model path",
                location=loc,
            )
        if source == "base":
            if base is None:
                raise ConfigError("'base' needs a base_model", location=loc)
            return "base"
        return self.path(source, loc)


def load_config(
    path_or_dict: str | os.PathLike[str] | Mapping[str, Any], *, base_dir: str | None = None
) -> MergeConfig:
    """Read and validate a merge config: a YAML file (paths relative to its directory) or an
    already-parsed mapping (paths relative to ``base_dir``, default the current directory).

    Raises :class:`ConfigError` (a ValueError) naming the file and the location of the problem.
    Nothing is read besides the YAML itself and, for ``models:`` entries, a check for a PEFT
    ``adapter_config.json``.
    """
    source: str | None = None
    if isinstance(path_or_dict, Mapping):
        raw: Any = path_or_dict
        root = os.path.abspath(base_dir or os.getcwd())
    else:
        source = os.fspath(path_or_dict)
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ConfigError("config file not found", source=source) from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config: {err}", source=source) from None
        try:
            raw = load_yaml(text)
        except YAMLTooLarge as err:
            raise ConfigError(str(err), source=source) from None
        except RecursionError:
            raise ConfigError("invalid YAML: nested too deeply", source=source) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"invalid YAML: {problem}", location=where, source=source) from None
        root = os.path.abspath(base_dir or os.path.dirname(os.path.abspath(source)))
    try:
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"a config is a mapping of keys (merge_method, models, ...), got {type(raw).__name__}"
            )
        _precheck(raw)
        try:
            doc = MergeDocument.model_validate(dict(raw))
        except ValidationError as err:
            raise _pydantic_error(err) from None
        return _Loader(doc, root).build(source)
    except ConfigError as err:
        raise err.with_source(source) from None
