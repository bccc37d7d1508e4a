"""Plan a merge from checkpoint headers only: which tensors merge, which are copied, output
layout, memory estimate and row-chunking. Every inconsistency a user can cause is reported here,
with the file and tensor named, before any tensor data is read (non-floating buffers excepted:
they are tiny and compared here so a mismatch never surfaces mid-run).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from weightmerge.io.base import TensorSource
from weightmerge.io.output import OutputJob
from weightmerge.io.safetensors_format import itemsize, numel
from weightmerge.methods.base import MethodSpec

# Fixed overhead of the process (interpreter, torch, libraries), for the memory estimate.
FIXED_OVERHEAD_BYTES = 600 * 2**20
# Working buffers besides the n stacked inputs: base, result, and ~2 temporaries of one tensor.
EXTRA_BUFFERS = 4
# Row-chunkable methods (``MethodSpec.row_chunkable``) process large tensors in row chunks of about
# this many elements per model even without --max-memory: the working set then stays in cache,
# buffers of one size are reused by the allocator instead of being faulted in afresh, and the RSS
# stays flat as models grow. Their results do not depend on the chunking (the tests check this
# bit for bit). Why 2^18: docs/engine.md ("Memory is a contract").
CACHE_CHUNK_ELEMENTS = 1 << 18

TIED_PAIRS = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("lm_head.weight", "model.decoder.embed_tokens.weight"),
    ("lm_head.weight", "embed_tokens.weight"),
)


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    action: str  # "merge" | "copy"
    reason: str = ""  # why copied
    chunk_rows: int | None = None  # apply-pass rows per chunk (None: whole tensor)

    @property
    def numel(self) -> int:
        return numel(self.shape)


@dataclass
class MergePlan:
    method: MethodSpec
    n_models: int
    tensors: list[TensorPlan]
    compute_dtype: torch.dtype
    est_peak_bytes: int = 0
    stat_passes: int = 0
    aliases: list[dict[str, str]] = field(default_factory=list)  # per model: output name -> name read
    notes: list[str] = field(default_factory=list)
    # The one channel for resolved parameters: model-level (passes, finalize, chunking) and per
    # merged tensor (what ``apply`` sees; several tensors may share one dict).
    model_params: Mapping[str, Any] = field(default_factory=dict)
    tensor_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def merged(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.action == "merge"]

    @property
    def largest(self) -> TensorPlan | None:
        return max(self.merged, key=lambda t: t.numel, default=None)

    def output_job(
        self, base: TensorSource | None, models: Sequence[TensorSource], *, labels: Sequence[str]
    ) -> OutputJob:
        """What the method's output format is told about this plan and its opened inputs."""
        return OutputJob(
            tensors=self.tensors,
            base=base,
            models=models,
            aliases=self.aliases,
            labels=labels,
            model_params=self.model_params,
            compute_dtype=self.compute_dtype,
        )

    def output_bytes(self) -> int:
        return sum(t.numel * itemsize(t.out_dtype) for t in self.tensors)

    def describe(self, *, show_tensors: int = 12) -> str:
        merged = self.merged
        largest = self.largest
        lines = [
            f"method: {self.method.name} ({self.method.summary})",
            f"models: {self.n_models}",
            f"tensors: {len(self.tensors)} ({len(merged)} merged, {len(self.tensors) - len(merged)} copied)",
            f"parameters merged: {sum(t.numel for t in merged):,}",
            f"output size: {_fmt_bytes(self.output_bytes())}",
            f"compute dtype: {str(self.compute_dtype).replace('torch.', '')}",
        ]
        if largest is not None:
            lines.append(f"largest tensor: {largest.name} {list(largest.shape)} ({largest.numel:,} elements)")
        if self.stat_passes:
            lines.append(f"statistics passes over the whole model: {self.stat_passes} (then one apply pass)")
        chunked = [t for t in merged if t.chunk_rows is not None]
        if chunked:
            lines.append(f"row-chunked tensors (row-chunkable method; --max-memory): {len(chunked)}")
        lines.append(f"estimated peak memory: {_fmt_bytes(self.est_peak_bytes)}")
        for note in self.notes:
            lines.append(f"note: {note}")
        copied = [t for t in self.tensors if t.action == "copy"]
        if copied:
            lines.append("copied from the base:")
            for t in copied[:show_tensors]:
                lines.append(f"  {t.name}: {t.reason}")
            if len(copied) > show_tensors:
                lines.append(f"  ... and {len(copied) - show_tensors} more")
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def parse_size(text: str | int | None) -> int | None:
    """'4GB', '500M', '2GiB', 1234 -> bytes (decimal for GB/MB, binary for GiB/MiB)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {text!r} (examples: 500M, 4GB, 2GiB, 1000000)")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return int(value * base ** " KMGT".index(unit or " "))


def _tied_alias(src: TensorSource, name: str) -> str | None:
    """The embedding a missing output head is read from, when the model ties them; never when its
    config says ``tie_word_embeddings: false`` (the head is then missing, not tied)."""
    from weightmerge.io.tied import tie_flag

    if tie_flag(getattr(src, "config", None)) is False:
        return None
    keys = set(src.keys())
    for tied, emb in TIED_PAIRS:
        if name == tied and emb in keys:
            return emb
    return None


TensorParams = Callable[[Sequence[str]], Mapping[str, Mapping[str, Any]]]


def check_model_counts(method: MethodSpec, *, n_models: int, has_base: bool) -> None:
    """The method's input-count rules (``needs_base``, ``min_models``, ``max_models``)."""
    if n_models == 0:
        raise ValueError("no models to merge: give at least one model")
    if method.needs_base and not has_base:
        raise ValueError(f"method {method.name!r} needs a base model")
    if n_models < method.min_models:
        raise ValueError(f"method {method.name!r} needs at least {method.min_models} models, got {n_models}")
    if method.max_models is not None and n_models > method.max_models:
        raise ValueError(f"method {method.name!r} takes at most {method.max_models} models, got {n_models}")


def varying_params(
    method: MethodSpec, model_params: Mapping[str, Any], tensor_params: Mapping[str, Mapping[str, Any]]
) -> dict[str, str]:
    """``{param: "tensor 'x'"}`` for each parameter whose value for some tensor differs from the
    model-level value (the first such tensor in sorted order), statistics inputs left out."""
    out: dict[str, str] = {}
    keys = [p.name for p in method.params if p.kind != "stats"]
    for name in sorted(tensor_params):
        p = tensor_params[name]
        for key in keys:
            if key not in out and key in p and p[key] != model_params.get(key):
                out[key] = f"tensor {name!r}"
    return out


def _where(src: TensorSource, name: str) -> str:
    file = src.info(name).file
    return "" if file == src.path else f" ({file})"


def match_tensors(
    method: MethodSpec,
    base: TensorSource | None,
    models: Sequence[TensorSource],
    *,
    model_params: Mapping[str, Any],
    tensor_params: TensorParams | None = None,
    exclude: Sequence[str] = (),
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
    check_buffers: bool = True,
) -> MergePlan:
    """Which tensors merge and which are copied, from headers only, and the method's rules checked
    on the resolved parameters; no row-chunking (see :func:`plan_memory`).

    ``model_params`` are the resolved model-level parameters; ``tensor_params(names)`` resolves the
    parameters of each merged tensor (None: the model-level ones for every tensor).
    """
    n = len(models)
    check_model_counts(method, n_models=n, has_base=base is not None)
    ref = base if base is not None else models[0]
    ref_label = f"base model {ref.path}" if base is not None else f"model {ref.path}"
    ref_keys = ref.keys()
    ref_set = set(ref_keys)
    patterns = [re.compile(p) for p in exclude]
    aliases: list[dict[str, str]] = [{} for _ in models]
    notes: list[str] = []

    from weightmerge.io.tied import tie_flag

    for i, m in enumerate(models):
        mkeys = set(m.keys())
        extra = sorted(mkeys - ref_set)
        # A model that stores an untied lm_head while the reference ties it: not mergeable silently.
        if extra:
            raise ValueError(
                f"model {m.path} has tensor {extra[0]!r}{_where(m, extra[0])} that the {ref_label} lacks"
                f" ({len(extra)} such tensors); architectures differ"
            )
        for name in sorted(ref_set - mkeys):
            alias = _tied_alias(m, name)
            if alias is None:
                untied = (
                    any(name == t for t, _e in TIED_PAIRS) and tie_flag(getattr(m, "config", None)) is False
                )
                raise ValueError(
                    f"model {m.path} lacks tensor {name!r} that the {ref_label} has{_where(ref, name)}"
                    + (
                        "; its config says tie_word_embeddings: false, so it is not read from the embedding"
                        if untied
                        else ""
                    )
                )
            aliases[i][name] = alias
            notes.append(f"model {m.path}: {name} read from tied {alias}")

    tensors: list[TensorPlan] = []
    for name in sorted(ref_keys):
        rinfo = ref.info(name)
        infos = [m.info(aliases[i].get(name, name)) for i, m in enumerate(models)]
        for m, info in zip(models, infos, strict=True):
            if tuple(info.shape) != tuple(rinfo.shape):
                raise ValueError(
                    f"tensor {name!r}: shape {list(info.shape)} in {info.file} (model {m.path}) differs from "
                    f"{list(rinfo.shape)} in {rinfo.file}"
                )
        is_float = rinfo.dtype.is_floating_point and all(i.dtype.is_floating_point for i in infos)
        if not is_float:
            for m, info in zip(models, infos, strict=True):
                if info.dtype.is_floating_point != rinfo.dtype.is_floating_point:
                    raise ValueError(
                        f"tensor {name!r} is {str(info.dtype).replace('torch.', '')} in {info.file} (model "
                        f"{m.path}) but {str(rinfo.dtype).replace('torch.', '')} in {rinfo.file}: one is "
                        "floating point and the other is not"
                    )
            tensors.append(TensorPlan(name, tuple(rinfo.shape), rinfo.dtype, "copy", "not floating point"))
            continue
        odt = out_dtype or rinfo.dtype
        if any(p.search(name) for p in patterns):
            tensors.append(TensorPlan(name, tuple(rinfo.shape), odt, "copy", "excluded"))
            continue
        tensors.append(TensorPlan(name, tuple(rinfo.shape), odt, "merge"))

    merged = [t.name for t in tensors if t.action == "merge"]
    if tensor_params is None:
        by_tensor: dict[str, Mapping[str, Any]] = dict.fromkeys(merged, model_params)
    else:
        by_tensor = dict(tensor_params(merged))
        for p in {id(p): p for p in by_tensor.values()}.values():  # statistics are model-level
            for key in method.aux_inputs:
                if key in model_params and isinstance(p, dict):
                    p[key] = model_params[key]
    method.check_rules(model_params, n, varying_params(method, model_params, by_tensor))

    if check_buffers:  # the only data read at plan time: tiny non-floating buffers
        for t in tensors:
            if t.reason != "not floating point":
                continue
            r = ref.read(t.name)
            for i, m in enumerate(models):
                other = aliases[i].get(t.name, t.name)
                if not torch.equal(m.read(other).to(r.dtype), r):
                    raise ValueError(
                        f"non-floating tensor {t.name!r} differs between {ref.info(t.name).file} and "
                        f"{m.info(other).file}"
                    )
    return MergePlan(
        method=method,
        n_models=n,
        tensors=tensors,
        compute_dtype=compute_dtype,
        est_peak_bytes=FIXED_OVERHEAD_BYTES,
        stat_passes=len(method.passes(model_params)),
        aliases=aliases,
        notes=notes,
        model_params=model_params,
        tensor_params=by_tensor,
    )


def plan_memory(plan: MergePlan, *, max_memory: int | None = None) -> MergePlan:
    """Row-chunking and the peak-memory estimate of a matched plan: row-chunkable
    (``MethodSpec.row_chunkable``) methods split large 2-D+ tensors into cache-sized row chunks, and into
    smaller ones when ``max_memory`` asks; other methods must fit each tensor whole."""
    method, n = plan.method, plan.n_models
    csize = itemsize(plan.compute_dtype)
    chunkable = method.is_row_chunkable(plan.model_params)
    buffers = n + EXTRA_BUFFERS
    planned: list[TensorPlan] = []
    budget = None
    if max_memory is not None:
        budget = max_memory - FIXED_OVERHEAD_BYTES
        if budget <= 0:
            raise ValueError(
                f"--max-memory {_fmt_bytes(max_memory)} is below the fixed overhead of "
                f"{_fmt_bytes(FIXED_OVERHEAD_BYTES)}"
            )
    peak_tensor = 0
    for t in plan.tensors:
        rows = None
        need = t.numel * buffers * csize
        if t.action == "merge" and budget is not None and need > budget:
            if not chunkable or len(t.shape) < 2:
                raise ValueError(
                    f"tensor {t.name!r} ({t.numel:,} elements) needs about {_fmt_bytes(need)} with "
                    f"{n} models, over --max-memory; method {method.name!r} with these options cannot "
                    "split a tensor into row chunks"
                )
            row_bytes = (t.numel // t.shape[0]) * buffers * csize
            rows = max(1, budget // row_bytes)
        if t.action == "merge" and chunkable and len(t.shape) >= 2 and t.numel > CACHE_CHUNK_ELEMENTS:
            cache_rows = max(1, CACHE_CHUNK_ELEMENTS // max(1, t.numel // t.shape[0]))
            rows = cache_rows if rows is None else min(rows, cache_rows)
        if rows is not None and rows >= t.shape[0]:
            rows = None
        if rows is not None:
            need = rows * (t.numel // t.shape[0]) * buffers * csize
        if t.action == "merge":
            peak_tensor = max(peak_tensor, need)
        planned.append(replace(t, chunk_rows=rows))
    return replace(plan, tensors=planned, est_peak_bytes=FIXED_OVERHEAD_BYTES + peak_tensor)


def build_plan(
    method: MethodSpec,
    base: TensorSource | None,
    models: Sequence[TensorSource],
    *,
    model_params: Mapping[str, Any],
    tensor_params: TensorParams | None = None,
    exclude: Sequence[str] = (),
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
    max_memory: int | None = None,
    check_buffers: bool = True,
) -> MergePlan:
    """The whole plan of a streamed merge: :func:`match_tensors`, then :func:`plan_memory`."""
    matched = match_tensors(
        method,
        base,
        models,
        model_params=model_params,
        tensor_params=tensor_params,
        exclude=exclude,
        out_dtype=out_dtype,
        compute_dtype=compute_dtype,
        check_buffers=check_buffers,
    )
    return plan_memory(matched, max_memory=max_memory)
