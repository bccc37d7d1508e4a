"""The merge config document as written: its keys and plain types (pydantic, strict), checked
before any method knowledge is needed; parameter values are read per method by the loader."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from weightmerge.config.errors import ConfigError
from weightmerge.methods._params import did_you_mean
from weightmerge.safe_yaml import excerpt

FLOAT_DTYPES = ("float32", "float64", "bfloat16", "float16")
COMPUTE_DTYPES = ("float32", "float64")
UNSUPPORTED_TOP_LEVEL = {
    "modules": "'modules:' (per-module merges) is not supported yet; list whole models under 'models:'",
}


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TokenizerSection(_Doc):
    source: Any = "union"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class SliceSourceDoc(_Doc):
    model: Any
    layer_range: list[int]
    parameters: dict[str, Any] | None = None


class SliceDoc(_Doc):
    sources: list[SliceSourceDoc] = Field(min_length=1)
    base_model: Any = None
    residual_weight: Any = None
    parameters: dict[str, Any] | None = None


class ModelEntryDoc(_Doc):
    model: Any
    parameters: dict[str, Any] | None = None


class MergeDocument(_Doc):
    """The YAML document as written (mergekit 0.1.5 keys + ``seed`` and ``exclude``)."""

    merge_method: str
    base_model: Any = None
    models: list[ModelEntryDoc] | None = None
    slices: list[SliceDoc] | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Any = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None
    seed: int = Field(default=0, ge=0)
    exclude: list[str] = Field(default_factory=list)


TOP_KEYS = tuple(MergeDocument.model_fields)
ENTRY_KEYS = tuple(ModelEntryDoc.model_fields)
SLICE_KEYS = tuple(SliceDoc.model_fields)
SOURCE_KEYS = tuple(SliceSourceDoc.model_fields)
TOKENIZER_KEYS = tuple(TokenizerSection.model_fields)


def _loc(parts: Iterable[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def check_keys(raw: Mapping[str, Any], allowed: Sequence[str], where: str, what: str = "key") -> None:
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {key!r}", location=where)
        if key not in allowed:
            loc = f"{where}.{key}" if where else key
            raise ConfigError(
                f"unknown {what} {key!r}{did_you_mean(key, allowed)}; allowed: {list(allowed)}", location=loc
            )


def precheck(raw: Mapping[str, Any]) -> None:
    for key, why in UNSUPPORTED_TOP_LEVEL.items():
        if key in raw:
            raise ConfigError(why, location=key)
    check_keys(raw, TOP_KEYS, "")
    if ("models" in raw) == ("slices" in raw):
        raise ConfigError(
            "list the models to merge under 'models:' (or layer ranges under 'slices:'; not both)",
            location="models",
        )
    for i, sl in enumerate(raw.get("slices") or []):
        if isinstance(sl, Mapping):
            check_keys(sl, SLICE_KEYS, f"slices[{i}]")
            for j, src in enumerate(sl.get("sources") or []):
                if isinstance(src, Mapping):
                    check_keys(src, SOURCE_KEYS, f"slices[{i}].sources[{j}]")
    if isinstance(raw.get("models"), list):
        for i, entry in enumerate(raw["models"]):
            if isinstance(entry, str):
                raise ConfigError(
                    f"a model entry is a mapping: write '- model: {entry}'", location=f"models[{i}]"
                )
            if isinstance(entry, Mapping):
                check_keys(entry, ENTRY_KEYS, f"models[{i}]")
    if isinstance(raw.get("tokenizer"), Mapping):
        check_keys(raw["tokenizer"], TOKENIZER_KEYS, "tokenizer")


def pydantic_error(err: ValidationError) -> ConfigError:
    e = err.errors()[0]
    loc = _loc([p for p in e["loc"] if isinstance(p, (str, int))])
    msg = e["msg"]
    if e["type"] == "missing":
        msg = "missing (required)"
    elif "input" in e and e["type"] != "missing":
        msg = f"{msg}, got {type(e['input']).__name__} {excerpt(e['input'])}"
    return ConfigError(msg, location=loc)


def dtype_name(value: str | None, location: str) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.")
    if name not in FLOAT_DTYPES:
        raise ConfigError(
            f"unknown dtype {value!r}{did_you_mean(name, FLOAT_DTYPES)}; one of {list(FLOAT_DTYPES)}",
            location=location,
        )
    return name
