"""The public in-memory API: ``merge_state_dicts``.

The dicts are wrapped in in-memory sources (``weightmerge.io.memory.DictSource``) and merged by the
same planner (``engine.plan``), driver and output seam as a streamed merge, so the two give the
same result, or the same error, on every input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from weightmerge.engine.plan import match_tensors
from weightmerge.engine.stream import stream_merge
from weightmerge.io.memory import DictSource
from weightmerge.methods._params import resolve_params
from weightmerge.methods.registry import get_method

StateDict = Mapping[str, torch.Tensor]
COMPUTE_DTYPES = (torch.float32, torch.float64)


def _check_types(base: StateDict | None, models: Sequence[StateDict]) -> None:
    if isinstance(models, Mapping) or not isinstance(models, Sequence):
        raise TypeError("models must be a list of state dicts (name -> tensor)")
    for label, sd in ([("base", base)] if base is not None else []) + [
        (f"model {i}", m) for i, m in enumerate(models)
    ]:
        if not isinstance(sd, Mapping):
            raise TypeError(f"{label} must be a mapping name -> tensor, got {type(sd).__name__}")
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{label}: tensor {k!r} is a {type(v).__name__}, not a torch.Tensor")


def _check_exclude(exclude: Any) -> list[str]:
    if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
        raise TypeError("parameter 'exclude' must be a list of regular expressions")
    for e in exclude:
        try:
            re.compile(e)
        except re.error as err:
            raise ValueError(f"invalid regular expression {e!r} in 'exclude': {err}") from None
    return list(exclude)


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
) -> Any:
    """Merge ``models`` (fine-tuned from ``base``) with ``method``; see ``weightmerge methods``.

    ``params`` uses the YAML names of the method (per-model values as a list, one per model, or a
    scalar); ``exclude`` (list of regexes) keeps matching tensors at the base value. Arithmetic runs
    in ``compute_dtype`` (float32 or float64); results are cast back to the base dtype. ``device``
    is where the arithmetic runs (``"cpu"``, ``"cuda"``, ``"cuda:N"``, or ``"auto"``/``None``: a GPU
    when present); inputs may live anywhere, results are CPU tensors. A NaN or infinity in a tensor
    to merge, or in a result, raises ``ValueError`` naming the tensor and model unless
    ``allow_nonfinite``.

    Returns what the method's output format makes in memory: a dict name -> tensor for most
    methods, an ``weightmerge.emr.EMRResult`` for ``emr``.
    """
    from weightmerge.device import resolve_device

    dev = resolve_device(device)
    spec = get_method(method)
    _check_types(base, models)
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    raw = dict(params or {})
    exclude = _check_exclude(raw.pop("exclude", None) or [])
    resolved = resolve_params(spec, raw, len(models))
    bsrc = DictSource(base, "<base>") if base is not None else None
    msrcs = [DictSource(m, f"<models[{i}]>") for i, m in enumerate(models)]
    plan = match_tensors(
        spec, bsrc, msrcs, model_params=resolved, exclude=exclude, compute_dtype=compute_dtype
    )
    writer = spec.output.in_memory(plan.output_job(bsrc, msrcs, labels=[s.path for s in msrcs]))
    try:
        outcome, _ = stream_merge(
            plan,
            bsrc,
            msrcs,
            writer=writer,
            seed=seed,
            quiet=True,
            prefetch=False,
            device=dev,
            allow_nonfinite=allow_nonfinite,
        )
        return writer.finish(outcome.extras)
    finally:
        writer.close()
