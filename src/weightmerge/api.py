"""The public in-memory API: ``merge_state_dicts``.

It validates the inputs, then runs the same driver as the streaming engine over readers of the
given dicts, so streamed merges equal these results bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightmerge.engine.driver import MergeInputs, Rows, run_merge
from weightmerge.methods._params import resolve_params
from weightmerge.methods.base import EMRTensor, MethodSpec
from weightmerge.methods.registry import get_method

StateDict = Mapping[str, torch.Tensor]
COMPUTE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class EMRResult:
    """EMR output: one unified task vector, a boolean mask and a scalar rescaler per task.

    ``task_state_dict(i)`` reconstructs task i: base + rescaler_i * mask_i * unified on merged
    tensors, base values elsewhere (cast to the base dtype).
    """

    base: dict[str, torch.Tensor]
    unified: dict[str, torch.Tensor]  # compute dtype
    masks: list[dict[str, torch.Tensor]]  # bool
    rescalers: list[float]

    def task_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self.masks):
            raise IndexError(f"task index {i} out of range for {len(self.masks)} tasks")
        out: dict[str, torch.Tensor] = {}
        for name, b in self.base.items():
            u = self.unified.get(name)
            if u is None:
                out[name] = b.clone()
                continue
            r = torch.tensor(self.rescalers[i], dtype=u.dtype)
            out[name] = emr_reconstruct(b, u, self.masks[i][name], r)
        return out


def emr_reconstruct(
    base: torch.Tensor, unified: torch.Tensor, mask: torch.Tensor, rescaler: torch.Tensor
) -> torch.Tensor:
    """The one definition of EMR's task reconstruction (used by the API, artifacts and switching)."""
    delta = unified * mask.to(unified.dtype) * rescaler.to(unified.dtype)
    return (base.to(unified.dtype) + delta).to(base.dtype)


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _check_inputs(base: StateDict | None, models: Sequence[StateDict], spec: MethodSpec) -> None:
    if isinstance(models, Mapping) or not isinstance(models, Sequence):
        raise TypeError("models must be a list of state dicts (name -> tensor)")
    if len(models) == 0:
        raise ValueError("models is empty: give at least one model to merge")
    if len(models) < spec.min_models:
        raise ValueError(f"method {spec.name!r} needs at least {spec.min_models} models, got {len(models)}")
    if spec.max_models is not None and len(models) > spec.max_models:
        raise ValueError(f"method {spec.name!r} takes at most {spec.max_models} models, got {len(models)}")
    if spec.needs_base and base is None:
        raise ValueError(f"method {spec.name!r} needs a base model (base=None given)")
    for label, sd in ([("base", base)] if base is not None else []) + [
        (f"model {i}", m) for i, m in enumerate(models)
    ]:
        if not isinstance(sd, Mapping):
            raise TypeError(f"{label} must be a mapping name -> tensor, got {type(sd).__name__}")
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{label}: tensor {k!r} is a {type(v).__name__}, not a torch.Tensor")


def plan_names(
    base: StateDict | None, models: Sequence[StateDict], exclude: Sequence[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """(names to merge, {name: why copied}) -- errors for shape mismatches and differing buffers."""
    ref = base if base is not None else models[0]
    ref_label = "base" if base is not None else "model 0"
    patterns = [re.compile(p) for p in exclude]
    merged: list[str] = []
    copied: dict[str, str] = {}
    for i, m in enumerate(models):
        extra = sorted(set(m) - set(ref))
        if extra:
            raise ValueError(
                f"model {i} has tensor {extra[0]!r} that {ref_label} lacks ({len(extra)} such tensors)"
            )
    for name in sorted(ref):
        r = ref[name]
        present = [m[name] for m in models if name in m]
        for i, m in enumerate(models):
            if name in m and tuple(m[name].shape) != tuple(r.shape):
                raise ValueError(
                    f"tensor {name!r}: shape {tuple(m[name].shape)} in model {i} differs from "
                    f"{tuple(r.shape)} in {ref_label}"
                )
        if not _is_float(r) or not all(_is_float(t) for t in present):
            for i, m in enumerate(models):
                if name in m and not torch.equal(m[name].to(r.dtype), r):
                    raise ValueError(
                        f"non-floating tensor {name!r} differs between {ref_label} and model {i}"
                    )
            copied[name] = "not floating point"
        elif len(present) != len(models):
            missing = [i for i, m in enumerate(models) if name not in m]
            copied[name] = f"missing from model(s) {missing}"
        elif any(p.search(name) for p in patterns):
            copied[name] = "excluded"
        else:
            merged.append(name)
    return merged, copied


def merge_state_dicts(
    base: StateDict | None,
    models: Sequence[StateDict],
    method: str,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    *,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = "cpu",
    allow_nonfinite: bool = False,
) -> dict[str, torch.Tensor] | EMRResult:
    """Merge ``models`` (fine-tuned from ``base``) with ``method``; see ``weightmerge methods``.

    ``params`` uses the YAML names of the method (per-model values as a list, one per model, or a
    scalar); ``exclude`` (list of regexes) keeps matching tensors at the base value. Arithmetic runs
    in ``compute_dtype`` (float32 or float64); results are cast back to the base dtype. ``device``
    is where the arithmetic runs (``"cpu"``, ``"cuda"``, ``"cuda:N"``, or ``"auto"``/``None``: a GPU
    when present); inputs may live anywhere, results are CPU tensors. A NaN or infinity in a tensor
    to merge, or in a result, raises ``ValueError`` naming the tensor and model unless
    ``allow_nonfinite``.
    """
    from weightmerge.device import resolve_device

    dev = resolve_device(device)
    spec = get_method(method)
    _check_inputs(base, models, spec)
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    raw = dict(params or {})
    exclude = raw.pop("exclude", None) or []
    if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
        raise TypeError("parameter 'exclude' must be a list of regular expressions")
    for e in exclude:
        try:
            re.compile(e)
        except re.error as err:
            raise ValueError(f"invalid regular expression {e!r} in 'exclude': {err}") from None
    n = len(models)
    resolved = resolve_params(spec, raw, n)
    spec.check(resolved, n)
    names, copied = plan_names(base, models, exclude)
    ref = base if base is not None else models[0]

    def reader(sd: StateDict):
        def read(name: str, rows: Rows) -> torch.Tensor:
            t = sd[name]
            return t if rows is None else t[rows[0] : rows[1]]

        return read

    aux_keys = spec.aux_inputs

    def aux(name: str, rows: Rows) -> dict[str, torch.Tensor]:
        from weightmerge.methods.aux import gather_aux

        return gather_aux(spec, resolved, name, rows, ref[name].shape, compute_dtype)

    inp = MergeInputs(
        names=names,
        shapes={k: tuple(ref[k].shape) for k in names},
        base=reader(base) if base is not None else None,
        models=[reader(m) for m in models],
        params_for=lambda _name: resolved,
        model_params=resolved,
        seed=seed,
        compute_dtype=compute_dtype,
        aux=aux if aux_keys else (lambda _n, _r: {}),
        device=dev,
        allow_nonfinite=allow_nonfinite,
    )
    merged: dict[str, torch.Tensor] = {}
    unified: dict[str, torch.Tensor] = {}
    masks: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]

    def emit(name: str, rows: Rows, out: torch.Tensor | EMRTensor) -> None:
        assert rows is None, "the in-memory API never chunks"
        if isinstance(out, EMRTensor):
            unified[name] = out.unified.cpu()
            cpu_masks = out.masks.cpu()
            for i in range(n):
                masks[i][name] = cpu_masks[i]
        else:
            merged[name] = out.to(ref[name].dtype).cpu()

    outcome = run_merge(inp, spec, emit)
    if spec.name == "emr":
        assert base is not None
        return EMRResult(
            base={k: base[k] for k in sorted(base)},
            unified=unified,
            masks=masks,
            rescalers=[float(r) for r in outcome.extras["rescalers"]],
        )
    result = {k: ref[k].clone() for k in sorted(ref) if k in copied}
    result.update(merged)
    return {k: result[k] for k in sorted(result)}
