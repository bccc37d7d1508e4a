"""The one merge loop, shared by the in-memory API and the streaming engine.

statistics passes (each: one sweep, or two for exact order statistics) -> apply pass -> emit.
Inputs come through reader callables, so the same code runs on dicts of tensors and on
memory-mapped checkpoint slices; that is what makes streaming equal in-memory bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from weightmerge.engine.select import RadixSelect, SampleSelect
from weightmerge.methods.base import (
    MethodSpec,
    OrderStat,
    Reduce,
    SampleCapture,
    StatRequest,
    TensorCtx,
)

Rows = tuple[int, int] | None  # [start, stop) along dim 0, or None for the whole tensor
Reader = Callable[[str, Rows], torch.Tensor]


@dataclass
class MergeInputs:
    """What the driver needs to know about the inputs; tensors are read lazily through readers."""

    names: Sequence[str]  # tensors to merge, in sorted order
    shapes: Mapping[str, tuple[int, ...]]
    base: Reader | None
    models: Sequence[Reader]
    params_for: Callable[[str], Mapping[str, Any]]  # resolved params of one tensor
    model_params: Mapping[str, Any]  # resolved model-level params (for passes / finalize)
    seed: int = 0
    compute_dtype: torch.dtype = torch.float32
    chunk_rows: Callable[[str], int | None] = lambda _name: None  # rows per chunk; None = whole
    aux: Callable[[str, Rows], Mapping[str, torch.Tensor]] = lambda _name, _rows: {}
    progress: Callable[[str, str], None] | None = None  # (phase, tensor name)
    prefetch: bool = False  # read the next chunk on a helper thread while computing the current
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the math runs
    labels: Sequence[str] | None = None  # model names for error messages (default "model i")
    allow_nonfinite: bool = False  # merge NaN/Inf inputs (and outputs) instead of refusing them
    skip_apply: frozenset[str] = frozenset()  # already written by an interrupted run (--resume)
    _finite_checked: set[tuple[str, Rows]] = field(default_factory=set)


class NonFiniteError(ValueError):
    """A NaN or an infinity in a tensor to merge (or in a merged result)."""


def _nonfinite_rows(t: torch.Tensor) -> torch.Tensor | None:
    """Per-leading-index count of non-finite values of ``t`` (one count per model), or None when all
    are finite. A NaN or an infinity makes the row sum non-finite, so a finite sum proves the row
    finite; only a non-finite sum (which an overflow of large finite values can also give) takes
    the exact count. The sum costs a small fraction of the merge arithmetic; ``isfinite().all()``
    or a float64 sum cost more than task arithmetic itself."""
    flat = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
    if bool(torch.isfinite(flat.sum(dim=1)).all()):
        return None
    counts = (~torch.isfinite(flat)).sum(dim=1)
    return counts if bool(counts.any()) else None


def _refuse_nonfinite(
    inp: MergeInputs, name: str, rows: Rows, counts: torch.Tensor, what: Sequence[str]
) -> None:
    i = int(torch.nonzero(counts)[0, 0])
    where = "" if rows is None else f" (rows {rows[0]}:{rows[1]})"
    others = int((counts > 0).sum()) - 1
    raise NonFiniteError(
        f"tensor {name!r}{where}: {int(counts[i])} non-finite values (NaN or infinity) in {what[i]}"
        + (f" and {others} more input(s)" if others > 0 else "")
        + "; refusing to merge them (pass --allow-nonfinite / allow_nonfinite=True to proceed)"
    )


def _check_finite_inputs(
    inp: MergeInputs, name: str, rows: Rows, base: torch.Tensor | None, x: torch.Tensor
) -> None:
    if inp.allow_nonfinite or not x.is_floating_point() or (name, rows) in inp._finite_checked:
        return
    labels = list(inp.labels) if inp.labels is not None else [f"model {i}" for i in range(len(inp.models))]
    if base is not None and base.is_floating_point():
        bad = _nonfinite_rows(base.unsqueeze(0))
        if bad is not None:
            _refuse_nonfinite(inp, name, rows, bad, ["the base model"])
    bad = _nonfinite_rows(x)
    if bad is not None:
        _refuse_nonfinite(inp, name, rows, bad, labels)
    inp._finite_checked.add((name, rows))


def _check_finite_output(inp: MergeInputs, method: MethodSpec, name: str, rows: Rows, out: object) -> None:
    if inp.allow_nonfinite:
        return
    for t in _output_tensors(out):
        _check_finite_result(method, name, rows, t)


def _output_tensors(out: object) -> list[torch.Tensor]:
    """The floating tensors of what ``apply`` returned: the tensor itself, or the floating tensor
    fields of a method's own result object (a method with its own output format)."""
    if isinstance(out, torch.Tensor):
        found = [out]
    elif dataclasses.is_dataclass(out):
        found = [
            v for v in (getattr(out, f.name) for f in dataclasses.fields(out)) if isinstance(v, torch.Tensor)
        ]
    else:
        found = []
    return [t for t in found if t.is_floating_point()]


def _check_finite_result(method: MethodSpec, name: str, rows: Rows, t: torch.Tensor) -> None:
    bad = _nonfinite_rows(t.unsqueeze(0))
    if bad is not None:
        where = "" if rows is None else f" (rows {rows[0]}:{rows[1]})"
        raise NonFiniteError(
            f"tensor {name!r}{where}: method {method.name!r} produced {int(bad[0])} non-finite values "
            "(NaN or infinity) from finite inputs; refusing to write them (pass --allow-nonfinite / "
            "allow_nonfinite=True to proceed)"
        )


@dataclass
class MergeOutcome:
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


def _chunks(shape: tuple[int, ...], rows: int | None) -> Iterator[Rows]:
    if len(shape) < 2 or rows is None or rows >= shape[0]:
        yield None
        return
    rows = max(1, rows)
    for start in range(0, shape[0], rows):
        yield (start, min(shape[0], start + rows))


def _load(
    inp: MergeInputs, method: MethodSpec, name: str, rows: Rows
) -> tuple[torch.Tensor | None, torch.Tensor]:
    dt, dev = inp.compute_dtype, inp.device
    base = inp.base(name, rows).to(device=dev, dtype=dt) if inp.base is not None else None
    first = inp.models[0](name, rows)
    x = torch.empty((len(inp.models), *first.shape), dtype=dt, device=dev)
    x[0].copy_(first)
    del first
    for i in range(1, len(inp.models)):
        x[i].copy_(inp.models[i](name, rows))
    _check_finite_inputs(inp, name, rows, base, x)
    if method.inputs == "deltas":
        if base is None:
            raise ValueError(f"method {method.name!r} needs a base model (tensor {name!r})")
        x.sub_(base)
    return base, x


def _iter_loaded(
    inp: MergeInputs, method: MethodSpec, chunked: bool
) -> Iterator[tuple[str, Rows, torch.Tensor | None, torch.Tensor]]:
    jobs = [
        (name, rows)
        for name in inp.names
        for rows in _chunks(inp.shapes[name], inp.chunk_rows(name) if chunked else None)
    ]
    if not inp.prefetch or len(jobs) < 2:
        for name, rows in jobs:
            base, x = _load(inp, method, name, rows)
            yield name, rows, base, x
            del base, x  # before the next load: do not hold two jobs
        return
    from concurrent.futures import Future, ThreadPoolExecutor

    elem = torch.empty((), dtype=inp.compute_dtype).element_size()
    held = [_job_bytes(inp.shapes[name], rows, len(inp.models) + 1, elem) for name, rows in jobs]
    limit = max(max(held), PREFETCH_OVERLAP_BYTES)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wm-read") as pool:
        fut: Future[tuple[torch.Tensor | None, torch.Tensor]] | None
        fut = pool.submit(_load, inp, method, *jobs[0])
        for k, (name, rows) in enumerate(jobs):
            base, x = fut.result() if fut is not None else _load(inp, method, name, rows)
            fut = None
            if k + 1 < len(jobs) and held[k] + held[k + 1] <= limit:
                fut = pool.submit(_load, inp, method, *jobs[k + 1])
            yield name, rows, base, x
            del base, x  # the consumer drops its references too (see run_merge)


PREFETCH_OVERLAP_BYTES = 256 << 20  # read ahead while computing only if both fit in this (or the largest job)


def _job_bytes(shape: tuple[int, ...], rows: Rows, copies: int, elem: int) -> int:
    """Bytes the driver holds for one job's inputs: ``copies`` compute-dtype copies of the rows.
    Two large jobs in a row (e.g. an embedding next to an LM head) are not overlapped, so peak
    memory is set by the largest job, not by the two largest."""
    numel = math.prod(shape) if rows is None else (rows[1] - rows[0]) * math.prod(shape[1:])
    return numel * copies * elem


def _ctx(
    inp: MergeInputs,
    name: str,
    rows: Rows,
    base: torch.Tensor | None,
    x: torch.Tensor,
    stats: Mapping[str, torch.Tensor],
) -> TensorCtx:
    aux = inp.aux(name, rows)
    if x.device.type != "cpu":  # statistics are kept on the CPU; the method sees them on its device
        stats = {k: v.to(x.device) for k, v in stats.items()}
        aux = {k: v.to(x.device) for k, v in aux.items()}
    return TensorCtx(
        name=name,
        base=base,
        x=x,
        params=inp.params_for(name),
        stats=stats,
        seed=inp.seed,
        full_shape=tuple(inp.shapes[name]),
        row_start=0 if rows is None else rows[0],
        aux=aux,
    )


def _combine(a: torch.Tensor | None, b: torch.Tensor, op: str) -> torch.Tensor:
    if a is None:
        return b
    if op == "sum":
        return a + b
    return torch.maximum(a, b) if op == "max" else torch.minimum(a, b)


class _Partials:
    """One tensor's per-chunk float64 partials of one reduction, laid side by side in a buffer
    allocated once per tensor (one column per row for ``row_partials``, so ``rows_total`` columns
    hold them all; a reduction that returns fewer columns per chunk leaves the rest unused).

    ``take`` returns exactly what ``torch.cat`` of the chunks' partials would (same values, same
    contiguous layout, so the reduction over it has the same bits). Keeping the partials in one
    buffer rather than a list of small tensors matters for memory: dozens of small tensors that
    outlive the chunk buffers pinned glibc's heap, so the freed chunk buffers (kept on the heap
    once the allocator's mmap threshold has grown) were never returned, and EMR's statistics
    pass on a 168M model peaked at 1.74 GB instead of 0.48 GB.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.buf: torch.Tensor | None = None
        self.filled = 0

    def start(self, rows_total: int) -> None:
        self.buf = torch.empty((self.n, max(1, rows_total)), dtype=torch.float64)
        self.filled = 0

    def add(self, part: torch.Tensor) -> None:
        if self.buf is None:
            raise RuntimeError("_Partials.add before start")
        part = part.to(device="cpu", dtype=torch.float64)
        if part.dim() != 2 or part.shape[0] != self.n:
            raise ValueError(f"statistic partials must be (n_models, k), got {list(part.shape)}")
        end = self.filled + part.shape[1]
        if end > self.buf.shape[1]:  # more columns than rows: grow (not hit by the built-in methods)
            grown = torch.empty((self.n, max(end, 2 * self.buf.shape[1])), dtype=torch.float64)
            grown[:, : self.filled].copy_(self.buf[:, : self.filled])
            self.buf = grown
        self.buf[:, self.filled : end].copy_(part)
        self.filled = end

    def take(self) -> torch.Tensor:
        if self.buf is None:
            raise RuntimeError("_Partials.take before start")
        out = self.buf if self.filled == self.buf.shape[1] else self.buf[:, : self.filled].contiguous()
        self.buf, self.filled = None, 0
        return out


def sweeps_of(requests: Sequence[StatRequest]) -> int:
    """Sweeps over the model one statistics pass makes (without a fallback): one for reductions
    only or for presampled order statistics, two (sample, then gather) otherwise."""
    orders = [r for r in requests if isinstance(r, OrderStat)]
    return 2 if orders and not _presampled(requests) else 1


def _presampled(requests: Sequence[StatRequest]) -> bool:
    orders = [r for r in requests if isinstance(r, OrderStat)]
    return (
        bool(orders)
        and all(o.presample is not None for o in orders)
        and not any(isinstance(r, SampleCapture) for r in requests)
    )


class _Reductions:
    """The :class:`Reduce` requests of one pass over the sweep: each tensor's per-chunk float64
    partials are kept side by side (:class:`_Partials`) and reduced once when the sweep moves to
    the next tensor (so row chunking never changes the bits), then combined across tensors in
    sweep (sorted-name) order."""

    def __init__(self, inp: MergeInputs, reduces: Sequence[Reduce]) -> None:
        self.inp, self.reduces = inp, list(reduces)
        self.n = len(inp.models)
        self.totals: dict[str, torch.Tensor | None] = {r.key: None for r in self.reduces}
        self.pending = {r.key: _Partials(self.n) for r in self.reduces}
        self.current: str | None = None

    def add(self, name: str, ctx: TensorCtx) -> None:
        if not self.reduces:
            return
        if name != self.current:
            if self.current is not None:
                self._close(self.current)
            shape = self.inp.shapes[name]
            rows_total = shape[0] if len(shape) >= 2 else 1
            for r in self.reduces:
                self.pending[r.key].start(rows_total)
            self.current = name
        for r in self.reduces:
            self.pending[r.key].add(r.fn(ctx))

    def _close(self, name: str) -> None:
        for r in self.reduces:
            part = self.pending[r.key].take()
            red = (
                part.sum(dim=1)
                if r.op == "sum"
                else (part.amax(dim=1) if r.op == "max" else part.amin(dim=1))
            )
            if r.per_tensor_mean:
                red = red / max(math.prod(self.inp.shapes[name]), 1)
            self.totals[r.key] = _combine(self.totals[r.key], red, r.op)

    def finish(self, stats: dict[str, torch.Tensor]) -> None:
        """Close the last tensor and store every reduction in ``stats`` (zeros for an empty sweep)."""
        if self.current is not None and self.reduces:
            self._close(self.current)
        for r in self.reduces:
            t = self.totals[r.key]
            stats[r.key] = t if t is not None else torch.zeros(self.n, dtype=torch.float64)


def _sweep(
    inp: MergeInputs, method: MethodSpec, stats: Mapping[str, torch.Tensor]
) -> Iterator[tuple[str, TensorCtx]]:
    """One statistics sweep over the model: every tensor (row chunk) to merge, as a context whose
    ``stats`` are those of the finished passes."""
    for name, rows, base, x in _iter_loaded(inp, method, chunked=True):
        if inp.progress:
            inp.progress("stats", name)
        yield name, _ctx(inp, name, rows, base, x, stats)
        del base, x


def _run_pass(
    inp: MergeInputs,
    method: MethodSpec,
    requests: Sequence[StatRequest],
    stats: dict[str, torch.Tensor],
    captures: dict[str, torch.Tensor],
) -> None:
    """One statistics pass: a sweep for the reductions, the order statistics' samples and the
    captures, then (order statistics only) a gathering sweep; rows whose sample missed fall back
    to the radix select (two more sweeps, and four more to make float64 values exact). When every
    order statistic is presampled (from earlier captures) the first sweep is skipped and the
    reductions run in the gathering sweep."""
    reductions = _Reductions(inp, [r for r in requests if isinstance(r, Reduce)])
    orders = [r for r in requests if isinstance(r, OrderStat)]
    caps = [r for r in requests if isinstance(r, SampleCapture)]
    presampled = _presampled(requests)
    n = len(inp.models)
    total = sum(math.prod(inp.shapes[name]) for name in inp.names)  # values per row
    samplers = {o.key: SampleSelect(n, total, what=o.key) for o in orders}
    if presampled:
        for o in orders:
            assert o.presample is not None
            samplers[o.key].install_sample(o.presample(stats, captures), total)
    else:
        capturers: dict[str, SampleSelect] = {}
        for name, ctx in _sweep(inp, method, stats):
            reductions.add(name, ctx)
            for o in orders:
                samplers[o.key].add_sample(o.fn(ctx), name, check=not o.nan_free)
            for c in caps:
                values = c.fn(ctx)
                if c.key not in capturers:
                    capturers[c.key] = SampleSelect(values.shape[0], total, what=c.key)
                capturers[c.key].add_sample(values, name, check=False)
        reductions.finish(stats)
        for key, cap in capturers.items():
            captures[key] = cap.captured()
    if not orders:
        return
    ranks: dict[str, torch.Tensor] = {}
    for o in orders:
        sampler = samplers[o.key]
        if sampler.count == 0:
            raise ValueError(
                f"statistic {o.key!r} of method {method.name!r}: no values to rank (empty model?)"
            )
        ranks[o.key] = torch.full((n,), o.rank(sampler.count), dtype=torch.int64)
        sampler.set_ranks(ranks[o.key])
    for name, ctx in _sweep(inp, method, stats):
        if presampled:
            reductions.add(name, ctx)
        for o in orders:
            samplers[o.key].add_gather(o.fn(ctx), name)
    if presampled:
        reductions.finish(stats)
    missed: list[OrderStat] = []
    for o in orders:
        found = samplers[o.key].finish()
        stats[o.key] = found
        if bool(torch.isnan(found).any()):
            missed.append(o)
    if missed:
        _radix_fallback(inp, method, missed, ranks, stats)


def _radix_fallback(
    inp: MergeInputs,
    method: MethodSpec,
    orders: Sequence[OrderStat],
    ranks: Mapping[str, torch.Tensor],
    stats: dict[str, torch.Tensor],
) -> None:
    """The order statistics whose sampled window missed, by the radix select (every row)."""
    found = _select_sweeps(inp, method, {o.key: o.fn for o in orders}, ranks, stats)
    wide = [o for o in orders if stats[o.key].dtype == torch.float64]
    for o in orders:
        stats[o.key] = found[o.key]
    if wide:
        _refine_float64(inp, method, wide, ranks, stats)


def _select_sweeps(
    inp: MergeInputs,
    method: MethodSpec,
    fns: Mapping[str, Callable[[TensorCtx], torch.Tensor]],
    ranks: Mapping[str, torch.Tensor],
    stats: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Exact float32 order statistics of the values ``fns`` yield: two sweeps over the data."""
    selects = {k: RadixSelect(len(inp.models), what=k) for k in fns}
    for level in (1, 2):
        for name, ctx in _sweep(inp, method, stats):
            for k, fn in fns.items():
                sel = selects[k]
                (sel.add_level1 if level == 1 else sel.add_level2)(fn(ctx), name)
        if level == 1:
            for k, sel in selects.items():
                sel.finish_level1(ranks[k])
    return {k: sel.finish_level2() for k, sel in selects.items()}


def _refine_float64(
    inp: MergeInputs,
    method: MethodSpec,
    orders: Sequence[OrderStat],
    ranks: Mapping[str, torch.Tensor],
    stats: dict[str, torch.Tensor],
) -> None:
    """Make the order statistics whose ``fn`` yields float64 exact in float64 (4 more sweeps).

    The radix select ranks float32 values; rounding to float32 is monotone, so the exact float64
    value x* of the rank lies among the values v whose float32 rounding equals the float32 result
    v32. Their residuals v - v32 are exact in float64 (Sterbenz) and carry at most ~30 significant
    bits, so two more selections recover them: the float32 rounding r1 of x* - v32, then the
    (exactly representable) rest r2 = x* - v32 - r1, each time mapping values below the candidate
    set to -inf and above it to +inf so the rank is unchanged. x* = v32 + (r1 + r2), exactly, for
    |values| between ~1e-29 and the float32 range (beyond it: within float32 rounding).
    """
    f32, f64, inf = torch.float32, torch.float64, float("inf")
    coarse = {o.key: stats[o.key].to(f32)[:, None] for o in orders}

    def residual(o: OrderStat, ctx: TensorCtx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values = o.fn(ctx).to(f64)
        v32 = coarse[o.key].to(values.device)
        res = values - v32.to(f64)
        return values.to(f32), v32, torch.where(torch.isnan(res), 0.0, res)

    def round1(o: OrderStat) -> Callable[[TensorCtx], torch.Tensor]:
        def fn(ctx: TensorCtx) -> torch.Tensor:
            rounded, v32, res = residual(o, ctx)
            return torch.where(rounded < v32, -inf, torch.where(rounded > v32, inf, res.to(f32)))

        return fn

    r1 = _select_sweeps(inp, method, {o.key: round1(o) for o in orders}, ranks, stats)

    def round2(o: OrderStat) -> Callable[[TensorCtx], torch.Tensor]:
        def fn(ctx: TensorCtx) -> torch.Tensor:
            rounded, v32, res = residual(o, ctx)
            first = r1[o.key].to(res.device)[:, None]
            r = res.to(f32)
            below = (rounded < v32) | ((rounded == v32) & (r < first))
            above = (rounded > v32) | ((rounded == v32) & (r > first))
            return torch.where(below, -inf, torch.where(above, inf, (res - first.to(f64)).to(f32)))

        return fn

    r2 = _select_sweeps(inp, method, {o.key: round2(o) for o in orders}, ranks, stats)
    for o in orders:
        stats[o.key] = coarse[o.key][:, 0].to(f64) + (r1[o.key].to(f64) + r2[o.key].to(f64))


def run_merge(
    inp: MergeInputs,
    method: MethodSpec,
    emit: Callable[[str, Rows, Any], None],
) -> MergeOutcome:
    """Run the statistics passes, then the apply pass; ``emit`` receives what ``apply`` returns for
    each merged tensor/chunk, in the compute dtype, on ``inp.device`` (casting and moving to the CPU
    is the output writer's job)."""
    if len(inp.models) < 1:
        raise ValueError("no models to merge")
    stats: dict[str, torch.Tensor] = {}
    captures: dict[str, torch.Tensor] = {}  # values at the sampling positions (SampleCapture)
    for requests in method.passes(inp.model_params):
        _run_pass(inp, method, requests, stats, captures)
    captures.clear()
    apply_inp = inp
    if inp.skip_apply:  # statistics above saw every tensor; the results of these are on disk already
        apply_inp = dataclasses.replace(inp, names=[n for n in inp.names if n not in inp.skip_apply])
    for name, rows, base, x in _iter_loaded(
        apply_inp, method, chunked=method.is_row_chunkable(inp.model_params)
    ):
        if inp.progress:
            inp.progress("apply", name)
        out = method.apply(_ctx(inp, name, rows, base, x, stats))
        _check_finite_output(inp, method, name, rows, out)
        emit(name, rows, out)
        del base, x, out  # free this job's buffers before the generator loads the next one
    return MergeOutcome(stats=stats, extras=method.finalize(stats, inp.model_params))
