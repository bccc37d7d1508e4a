"""Per-tensor statistics passed through ``params`` (Fisher diagonals, RegMean Gram matrices).

A statistics parameter is a list with one mapping per model. Its ``Param.layout`` says how it is
keyed:

* ``"param"`` (Fisher): keyed by the tensor name, same shape as the tensor; a row-chunk of the
  tensor gets the same rows of the statistic.
* ``"module_gram"`` (RegMean): keyed by the *module* name -- tensor ``"m.weight"`` <-> key ``"m"``
  -- holding a square ``(d, d)`` Gram matrix; never chunked (the method is not element-wise).

``gather_aux`` stacks what one tensor needs into ``(n_models, ...)`` in the compute dtype. A
statistic absent for every model is simply not in the result (the method decides what that means);
one present for some models but not others, of the wrong shape, or not a floating tensor, is an
error naming the tensor and the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from weightmerge.methods.base import MethodSpec


def module_name(tensor_name: str) -> str | None:
    """``"enc.fc.weight"`` -> ``"enc.fc"``; ``None`` for tensors that are not a ``.weight``."""
    suffix = ".weight"
    return tensor_name[: -len(suffix)] if tensor_name.endswith(suffix) else None


def check_stats_param(key: str, value: Any, n_models: int) -> None:
    """Validate a statistics parameter: a list of ``n_models`` entries, each a mapping name -> tensor
    or (config / streaming) a path or tensor source the engine opens later.

    Plain ``dict`` entries are checked value by value; other mappings (lazy readers) only by type,
    so validation never reads tensor data.
    """
    if value is None:
        raise ValueError(f"parameter {key!r} is required: a list with one dict name -> tensor per model")
    if isinstance(value, (Mapping, str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"parameter {key!r} must be a list with one dict name -> tensor per model, "
            f"got {type(value).__name__}"
        )
    if len(value) != n_models:
        raise ValueError(
            f"parameter {key!r} has {len(value)} entries but there are {n_models} models "
            "(give one dict of statistics per model)"
        )
    from weightmerge.io.base import TensorSource  # here: importing io at module level loads torch

    for i, d in enumerate(value):
        if isinstance(d, (str, os.PathLike, TensorSource)):
            continue
        if not isinstance(d, Mapping):
            raise TypeError(f"parameter {key!r}: entry for model {i} must be a dict, got {type(d).__name__}")
        if not isinstance(d, dict):
            continue
        for k, v in d.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(
                    f"parameter {key!r}: model {i} entry {k!r} is a {type(v).__name__}, not a torch.Tensor"
                )
            if not v.is_floating_point():
                raise TypeError(f"parameter {key!r}: model {i} entry {k!r} has non-floating dtype {v.dtype}")


def stats_keys(entry: Any) -> list[str]:
    """The names in one model's statistics entry (empty for a path the engine opens later)."""
    if isinstance(entry, (str, os.PathLike)):
        return []
    return [str(k) for k in list(entry.keys())]  # a Mapping or a TensorSource (keys() only)


def _lookup(key: str, entry: Any, name: str) -> torch.Tensor | None:
    from weightmerge.io.base import TensorSource

    if isinstance(entry, Mapping):
        return entry.get(name)
    if isinstance(entry, TensorSource):
        return entry.read(name) if name in set(entry.keys()) else None
    raise TypeError(
        f"parameter {key!r}: a {type(entry).__name__} entry cannot be read here; give a dict name -> tensor"
    )


def _gather_param(
    key: str,
    per_model: Sequence[Any],
    name: str,
    rows: tuple[int, int] | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor | None:
    found = [_lookup(key, d, name) for d in per_model]
    if all(f is None for f in found):
        return None
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        raise ValueError(f"{key}: statistics for tensor {name!r} missing for model(s) {missing}")
    parts = []
    for i, f in enumerate(found):
        assert f is not None
        if tuple(f.shape) != shape:
            raise ValueError(
                f"{key}: statistics for tensor {name!r} of model {i} have shape {tuple(f.shape)}, "
                f"the tensor has shape {shape}"
            )
        parts.append((f if rows is None else f[rows[0] : rows[1]]).to(dtype))
    return torch.stack(parts)  # (n_models, *chunk_shape)


def _gather_module_gram(
    key: str,
    per_model: Sequence[Any],
    name: str,
    rows: tuple[int, int] | None,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    module = module_name(name)
    if module is None:
        return None
    found = [_lookup(key, d, module) for d in per_model]
    if all(f is None for f in found):
        return None
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        raise ValueError(
            f"{key}: Gram matrix of module {module!r} (tensor {name!r}) missing for model(s) {missing}"
        )
    if rows is not None:
        raise ValueError(f"{key}: module statistics cannot be row-chunked (tensor {name!r})")
    first = found[0]
    assert first is not None
    for i, f in enumerate(found):
        assert f is not None
        if f.dim() != 2 or f.shape[0] != f.shape[1] or f.shape != first.shape:
            raise ValueError(
                f"{key}: Gram matrix of module {module!r} for model {i} has shape {tuple(f.shape)}; "
                f"expected one square (d, d) matrix per model, all the same shape"
            )
    return torch.stack([f.to(dtype) for f in found if f is not None])  # (n_models, d, d)


def gather_aux(
    spec: MethodSpec,
    params: Mapping[str, Any],
    name: str,
    rows: tuple[int, int] | None,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Stack the per-model statistics a method needs for tensor ``name`` (see each method)."""
    out: dict[str, torch.Tensor] = {}
    for p in spec.params:
        key = p.name
        per_model = params.get(key) if p.kind == "stats" else None
        if per_model is None:
            continue
        if p.layout == "module_gram":
            t = _gather_module_gram(key, per_model, name, rows, dtype)
        else:
            t = _gather_param(key, per_model, name, rows, tuple(shape), dtype)
        if t is not None:
            out[key] = t
    return out
