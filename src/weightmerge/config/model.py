"""The resolved merge configuration the engine reads: model references, per-model and global
settings, and the per-tensor parameter values they give (filters and gradients applied)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from weightmerge.config.errors import ConfigError
from weightmerge.config.settings import (
    Setting,
    describe_setting,
    evaluate,
    gradient_t,
    is_varying,
    layer_positions,
    setting_to_data,
)
from weightmerge.methods._params import resolve_params

if TYPE_CHECKING:
    import torch

    from weightmerge.methods.base import MethodSpec, Param


@dataclass(frozen=True)
class ModelRef:
    """A checkpoint (``path``), optionally with a PEFT adapter (``lora``) applied on top of it.

    Paths are absolute (resolved by the loader). mergekit's ``A+B`` string
    means model A with adapter B; a ``models:`` entry naming a directory that holds an
    ``adapter_config.json`` is read as ``base_model + that adapter``.
    """

    path: str
    lora: str | None = None
    # mergekit's slices: the model is these layer ranges [start, stop) of these checkpoints, stacked
    # (weightmerge.io.stack.LayerStack); ``path`` is then the first range's checkpoint
    layers: tuple[tuple[str, int, int], ...] = ()

    def __str__(self) -> str:
        if self.layers:
            return " + ".join(f"{p}[{a}:{b}]" for p, a, b in self.layers)
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
        if self.layers:
            return list(dict.fromkeys(p for p, _a, _b in self.layers))
        return [self.path] if self.lora is None else [self.path, self.lora]


@dataclass(frozen=True)
class ModelEntry:
    model: ModelRef
    parameters: Mapping[str, Setting] = field(default_factory=dict)  # validated for the method


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
    hub_ids: Mapping[str, str] = field(default_factory=dict)  # local path -> the Hugging Face id it is
    notes: tuple[str, ...] = ()  # what the user should know (ignored mergekit knobs, dtype choices)

    # -- method -------------------------------------------------------------------------------
    @property
    def spec(self) -> MethodSpec:
        from weightmerge.methods.registry import get_method

        return get_method(self.merge_method)

    def display_name(self, ref: ModelRef) -> str:
        """How a model is named to people (model card): its Hugging Face id when it is one."""
        return self.hub_ids.get(ref.path, str(ref)) if ref.lora is None and not ref.layers else str(ref)

    @property
    def n_models(self) -> int:
        return len(self.models)

    # -- dtypes -------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 if ``dtype: float64``, else float32 (also for mergekit's bfloat16/float16)."""
        import torch

        return torch.float64 if self.dtype == "float64" else torch.float32

    @property
    def output_dtype(self) -> torch.dtype | None:
        """``out_dtype``, else ``dtype`` (mergekit writes in its compute dtype), else None: each
        tensor keeps the base model's dtype."""
        import torch

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
            if any(s is not None and is_varying(s) for s in settings):
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
                if s is not None and is_varying(s) and p.name not in out:
                    out[p.name] = f"{loc}.{p.name} is a filter or gradient"
        return out

    def per_tensor_params(self) -> frozenset[str]:
        """Names of the parameters set with a filter or a gradient somewhere (global or per model):
        their values exist per tensor only, so :meth:`model_params` leaves them out."""
        settings = [self.parameters, *(e.parameters for e in self.models)]
        return frozenset(k for s in settings for k, v in s.items() if is_varying(v))

    def resolved_model_params(self) -> dict[str, Any]:
        """:meth:`model_params` checked and completed by ``resolve_params`` (defaults filled). A
        required parameter set per tensor (a filter or gradient) is None here; every tensor's own
        value is checked by :meth:`params_by_tensor`."""
        return resolve_params(
            self.spec,
            self.model_params(),
            self.n_models,
            where=" (config)",
            per_tensor=self.per_tensor_params(),
        )

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
        params = {k: setting_to_data(v) for k, v in self.parameters.items()}
        set_anywhere = set(self.parameters) | {k for e in self.models for k in e.parameters}
        for p in spec.params:
            if p.name not in set_anywhere and p.kind != "stats" and p.default is not None:
                params[p.name] = list(p.default) if isinstance(p.default, tuple) else p.default
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            out["base_model"] = self.base_model.to_yaml_value()
        if self.models[0].model.layers:  # written back as mergekit's slices
            if self.base_model is not None and self.base_model.layers:
                out["base_model"] = self.base_model.layers[0][0]
            stacks = [e.model for e in self.models]
            if self.base_model is not None and self.base_model.layers and self.base_model not in stacks:
                stacks.insert(0, self.base_model)
            own = {e.model: e.parameters for e in self.models}
            out["slices"] = [
                {
                    "sources": [
                        {"model": ref.layers[i][0], "layer_range": list(ref.layers[i][1:])}
                        | (
                            {"parameters": {k: setting_to_data(v) for k, v in own[ref].items()}}
                            if own.get(ref)
                            else {}
                        )
                        for ref in stacks
                    ]
                }
                for i in range(len(self.models[0].model.layers))
            ]
        else:
            out["models"] = [
                {"model": e.model.to_yaml_value()}
                | (
                    {"parameters": {k: setting_to_data(v) for k, v in e.parameters.items()}}
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
            own = ", ".join(f"{k}={describe_setting(v)}" for k, v in e.parameters.items())
            lines.append(f"  [{i}] {e.model}" + (f"  ({own})" if own else ""))
        lines.append("parameters:")
        set_anywhere = set(self.parameters) | {k for e in self.models for k in e.parameters}
        for p in spec.params:
            if p.name in self.parameters:
                shown = describe_setting(self.parameters[p.name])
            elif p.name in set_anywhere:
                shown = "(per model, see above)" + ("" if p.kind == "stats" else f"; default {p.default!r}")
            elif p.kind == "stats":
                shown = "(not given)"
            else:
                shown = f"{p.default!r} (default)"
            lines.append(f"  {p.name}: {shown}")
        out = self.out_dtype or self.dtype  # names, not torch dtypes: validate does not load torch
        compute = "float64" if self.dtype == "float64" else "float32"
        lines.append(f"compute dtype: {compute}; output dtype: {out or 'as the base model'}")
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
