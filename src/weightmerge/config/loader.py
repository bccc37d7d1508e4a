"""Reading a merge config: YAML text -> checked document (schema) -> :class:`MergeConfig`, every
error a :class:`ConfigError` naming the file and the location."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from weightmerge.config.errors import ConfigError
from weightmerge.config.model import MergeConfig, ModelEntry, ModelRef
from weightmerge.config.schema import MergeDocument, check_keys, dtype_name, precheck, pydantic_error
from weightmerge.config.settings import Filtered, Gradient, Setting, parse_setting
from weightmerge.methods._params import did_you_mean, resolve_params
from weightmerge.safe_yaml import YAMLTooLarge, load_yaml

if TYPE_CHECKING:
    from weightmerge.methods.base import MethodSpec, Param

# mergekit parameters every method accepts that change nothing in its results (or ours): accepted
# with a note and dropped. Method-specific ones are declared on the method (MethodSpec.mergekit_ignored).
MERGEKIT_IGNORED = {"int8_mask": "mergekit's int8 mask storage only saves memory"}
ADAPTER_CONFIG = "adapter_config.json"
# A Hugging Face model id as mergekit accepts it: org/name, optionally @revision
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# What a merge reads from a Hub repository: weights, configs, tokenizer files
HUB_FILES = ["*.safetensors", "*.json", "*.bin", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def hub_snapshot(repo: str, revision: str | None, *, download: bool) -> str | None:
    """The local folder of a Hugging Face model: from the cache (``download=False``), else
    downloaded into it. None when it is not cached (or cannot be downloaded)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:  # the environment is read here, not when huggingface_hub was imported
        return str(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                local_files_only=offline or not download,
                allow_patterns=HUB_FILES,
            )
        )
    except Exception:  # not cached / offline / no such repo: the caller names the model
        return None


class _Loader:
    """Turns a checked document into a MergeConfig; every error names its location."""

    def __init__(self, doc: MergeDocument, base_dir: str, *, cwd: str | None = None) -> None:
        self.doc = doc
        self.base_dir = base_dir
        # a YAML file's relative paths: mergekit reads them from the current directory, older
        # weightmerge configs from the file's folder; see path()
        self.cwd = cwd
        self.notes: list[str] = []
        self.hub_ids: dict[str, str] = {}  # local path -> Hugging Face id it stands for

    def path(self, value: Any, location: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"expected a path string, got {type(value).__name__} {value!r}", location=location
            )
        text = os.path.expanduser(value.strip())
        here = os.path.normpath(os.path.join(self.base_dir, text))
        if self.cwd is None or os.path.isabs(text):
            return here
        there = os.path.normpath(os.path.join(self.cwd, text))
        if there == here or not os.path.exists(there):
            if there != here and os.path.exists(here):
                self.notes.append(
                    f"{location}: {value.strip()!r} is read relative to the config file ({here}); mergekit "
                    f"reads it relative to the current directory, where it does not exist ({there})"
                )
            return here
        if os.path.exists(here):
            raise ConfigError(
                f"{value.strip()!r} names two different things: {there} (relative to the current "
                f"directory, as mergekit reads it) and {here} (relative to the config file); write an "
                "absolute path",
                location=location,
            )
        return there  # mergekit's reading: relative to the current directory

    def model_path(self, value: Any, location: str) -> str:
        """A checkpoint path; a Hugging Face id (``org/name``, ``org/name@revision``) that is not a
        local folder is looked up in the Hugging Face cache (no network here); one not cached yet is
        remembered in ``hub_ids`` so that merge/plan can download it."""
        p = self.path(value, location)
        text = value.strip()
        if os.path.exists(p) or not HUB_ID.match(text):
            return p
        repo, _, revision = text.partition("@")
        local = hub_snapshot(repo, revision or None, download=False)
        if local is not None:
            self.notes.append(f"{location}: {text} is read from the Hugging Face cache ({local})")
            self.hub_ids[local] = text
            return local
        self.hub_ids[p] = text
        return p

    def model_ref(self, value: Any, location: str) -> ModelRef:
        if isinstance(value, Mapping):
            check_keys(value, ("model", "lora"), location)
            if "model" not in value:
                raise ConfigError("missing 'model' (the checkpoint path)", location=location)
            lora = value.get("lora")
            return ModelRef(
                self.model_path(value["model"], f"{location}.model"),
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
            self.model_path(parts[0], location), self.path(parts[1], location) if len(parts) == 2 else None
        )

    def stats_path(self, p: Param, value: Any, location: str) -> str:
        if isinstance(value, (list, Mapping)):
            raise ConfigError(
                f"statistics {p.name!r} are one file per model (a path), got {type(value).__name__}",
                location=location,
            )
        return self.path(value, location)

    def settings(
        self, spec: MethodSpec, raw: Mapping[str, Any] | None, location: str, *, per_model: bool
    ) -> dict[str, Setting]:
        known = {p.name: p for p in spec.params}
        out: dict[str, Setting] = {}
        for key, value in (raw or {}).items():
            loc = f"{location}.{key}"
            if key not in known:
                noop = {**MERGEKIT_IGNORED, **dict(spec.mergekit_ignored)}
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
            aliases = dict(p.mergekit_values)
            if isinstance(value, bool) and value in aliases and p.kind == "str":
                self.notes.append(f"{loc}: mergekit's {value!r} is {aliases[value]!r} here")
                value = aliases[value]
            out[key] = (
                self.stats_path(p, value, loc) if p.kind == "stats" else parse_setting(spec, p, value, loc)
            )
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

        inputs: list[tuple[str, ModelRef, dict[str, Setting]]] = []
        slice_params: Mapping[str, Any] | None = None
        if doc.slices is not None:
            inputs, base, slice_params = self.slices(spec, doc, base)
        for i, e in enumerate(doc.models or []):
            loc = f"models[{i}]"
            ref = self.adapter_dir(self.model_ref(e.model, f"{loc}.model"), base, loc)
            inputs.append((loc, ref, self.settings(spec, e.parameters, f"{loc}.parameters", per_model=True)))

        entries: list[ModelEntry] = []
        for loc, ref, params in inputs:
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
        if base is not None and spec.unlisted_base_note and all(x.model != base for x in entries):
            self.notes.append(spec.unlisted_base_note)

        glob = self.settings(spec, doc.parameters, "parameters", per_model=False)
        if slice_params:  # the one slice's own parameters override the global ones
            glob |= self.settings(spec, slice_params, "slices[0].parameters", per_model=False)
        if doc.slices is not None and len(doc.slices) > 1:
            varying = [f"parameters.{k}" for k, v in glob.items() if _has_gradient(v)] + [
                f"{loc}.parameters.{k}" for loc, _r, ps in inputs for k, v in ps.items() if _has_gradient(v)
            ]
            if varying:
                raise ConfigError(
                    f"a gradient ({varying[0]}) over several slices: mergekit restarts it in every slice; "
                    "weightmerge spreads gradients over one layer stack only. Use one slice, or plain "
                    "values and filters",
                    location="slices",
                )
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

        dtype = dtype_name(doc.dtype, "dtype")
        out_dtype = dtype_name(doc.out_dtype, "out_dtype")
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
            hub_ids=dict(self.hub_ids),
            notes=tuple(self.notes),
        )
        # model-level check with the values that hold outside the layer stack (a gradient's first
        # value, a filter list's catch-all): a required parameter that no filter gives to a tensor
        # outside every filter is refused here, before any checkpoint is opened
        try:
            resolved = resolve_params(
                spec, cfg.raw_params_for("", layer_index=None, num_layers=None), n, where=" (config)"
            )
            spec.check_rules(resolved, n, cfg.varying_params())
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err), location="parameters") from None
        return cfg

    def slices(
        self, spec: MethodSpec, doc: MergeDocument, base: ModelRef | None
    ) -> tuple[list[tuple[str, ModelRef, dict[str, Setting]]], ModelRef | None, Mapping[str, Any] | None]:
        """mergekit's ``slices:`` as stacked models: source ``j`` of every slice (the base model's
        source set aside) makes model ``j``, the base model's sources make the base. Returns the
        models (location, reference, own settings), the base and the one slice's parameters."""
        slices = doc.slices or []
        per_slice: list[list[tuple[str, ModelRef, int, int, Any]]] = []
        for i, sl in enumerate(slices):
            loc = f"slices[{i}]"
            for key in ("base_model", "residual_weight"):
                if getattr(sl, key) is not None:
                    raise ConfigError(f"not supported: a slice's own {key}", location=f"{loc}.{key}")
            if sl.parameters and len(slices) > 1:
                raise ConfigError(
                    "not supported: parameters of one slice among several (put them in 'parameters' "
                    "or on the sources)",
                    location=f"{loc}.parameters",
                )
            row = []
            for j, src in enumerate(sl.sources):
                where = f"{loc}.sources[{j}]"
                ref = self.model_ref(src.model, f"{where}.model")
                if ref.lora is not None:
                    raise ConfigError(
                        "not supported: a PEFT adapter inside a slice", location=f"{where}.model"
                    )
                rng = src.layer_range
                if len(rng) != 2 or not 0 <= rng[0] < rng[1]:
                    raise ConfigError(
                        f"layer_range is [start, stop) with 0 <= start < stop, got {rng}",
                        location=f"{where}.layer_range",
                    )
                row.append((where, ref, rng[0], rng[1], src.parameters))
            lengths = {b - a for _w, _r, a, b, _p in row}
            if len(lengths) > 1:
                raise ConfigError(
                    f"every source of a slice spans the same number of layers, got {sorted(lengths)}",
                    location=loc,
                )
            per_slice.append(row)
        base_stack: list[tuple[str, int, int]] = []
        if base is not None:
            for i, row in enumerate(per_slice):
                hits = [k for k, (_w, ref, _a, _b, _p) in enumerate(row) if ref.path == base.path]
                if not hits and spec.needs_base:
                    raise ConfigError(
                        f"base_model {base.path} is not among this slice's sources; mergekit takes each "
                        "slice's base from its sources",
                        location=f"slices[{i}]",
                    )
                if hits:
                    _w, ref, a, b, _p = row.pop(hits[0]) if spec.needs_base else row[hits[0]]
                    base_stack.append((ref.path, a, b))
            if base_stack and len(base_stack) == len(per_slice):
                base = ModelRef(base_stack[0][0], layers=tuple(base_stack))
        counts = {len(row) for row in per_slice}
        if len(counts) > 1:
            raise ConfigError(
                f"every slice merges the same number of sources here, got {sorted(counts)} "
                "(not counting the base model)",
                location="slices",
            )
        out: list[tuple[str, ModelRef, dict[str, Setting]]] = []
        for j in range(counts.pop()):
            where = per_slice[0][j][0]
            stack = tuple((row[j][1].path, row[j][2], row[j][3]) for row in per_slice)
            raws = [row[j][4] or {} for row in per_slice]
            if any(r != raws[0] for r in raws[1:]):
                raise ConfigError(
                    "not supported: different parameters for one model position in different slices",
                    location=f"slices[*].sources[{j}].parameters",
                )
            params = self.settings(spec, raws[0], f"{where}.parameters", per_model=True)
            out.append((where, ModelRef(stack[0][0], layers=stack), params))
        return out, base, slices[0].parameters if len(slices) == 1 else None

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


def _has_gradient(s: Setting) -> bool:
    if isinstance(s, Filtered):
        return any(_has_gradient(c.value) for c in s.conditions)
    return isinstance(s, Gradient)


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
        precheck(raw)
        try:
            doc = MergeDocument.model_validate(dict(raw))
        except ValidationError as err:
            raise pydantic_error(err) from None
        return _Loader(doc, root, cwd=None if source is None or base_dir else os.getcwd()).build(source)
    except ConfigError as err:
        raise err.with_source(source) from None
