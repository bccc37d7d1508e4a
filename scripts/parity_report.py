#!/usr/bin/env python
"""Parity report: for every merge method, the largest difference between weightmerge and an
independent reference, as a markdown table (and optionally JSON).

The references are the ones the test suite already uses, imported from ``tests/`` (nothing is
re-implemented here): mergekit 0.1.5 as an installed oracle (called as in
tests/test_mergekit_parity.py and tests/test_mergekit_extras.py), the literal references
tests/ref_ties.py, tests/ref_pcb.py and tests/ref_emr.py, the literal references defined in
tests/test_dare.py, tests/test_ties.py, tests/test_fisher.py, tests/test_regmean.py and
tests/test_mergekit_extras.py, and fusion-bench's ``emr_merge``, TSV-M, ``iso_c``, ``iso_cts``,
``wudi_merging`` and ``DOGE_TA_Algorithm``. Inputs come from the tests' own generators, on the
tests' shapes plus larger ones ((64, 33), (3, 50, 7), (1000,) and a multi-tensor state dict for
the global methods) where the tests' tolerances are scale-free.

Columns:

* cases: comparisons made (one merge of one input set with one parameter set against the reference);
* largest abs difference: max |weightmerge - reference| over every element of every case;
* largest difference: in ulps of weightmerge's result dtype at the tensor's scale, i.e.
  max|diff| / spacing(dtype, max|reference|) per tensor (so 1 ulp of float32 on a tensor whose
  largest entry is 2.5 is 2.4e-7), or relative for scalars (EMR rescalers), or the number of
  differing entries for boolean masks;
* tolerance: what the corresponding test asserts (``exact`` = bit-identical, same dtype;
  ``atol/rtol`` as torch.testing.assert_close; ``N ulp`` = N * eps(dtype) * max(1, max|ref|) as in
  test_mergekit_parity.ulp_bound; ``rel`` for scalars).

Exit status 1 if any case exceeds its tolerance or a reference fails to run, else 0.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/parity_report.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "tests", ROOT / "src"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16

# Registered methods with no independent reference in the test suite (method -> why). Every other
# registered method must appear in the report; tests/test_parity_report.py checks this.
NO_REFERENCE: dict[str, str] = {}

# Larger inputs than most tests use; the tests' tolerances do not depend on the size.
BIG_SHAPES = [(64, 33), (3, 50, 7), (1000,)]
MULTI = {"blk.b": (1000,), "blk.v": (3, 50, 7), "blk.w": (64, 33), "scale": ()}

MK = "mergekit 0.1.5"


# ------------------------------------------------------------------------------------------ checks


@dataclass(frozen=True)
class Tol:
    kind: str  # "exact" | "close" | "ulp" | "rel"
    atol: float = 0.0
    rtol: float = 0.0
    ulps: float = 0.0
    note: str = ""  # shown after the tolerance, e.g. when no test asserts it

    def describe(self) -> str:
        if self.note:
            return f"{replace(self, note='').describe()} ({self.note})"
        if self.kind == "exact":
            return "exact"
        if self.kind == "ulp":
            return f"{self.ulps:g} ulp"
        if self.kind == "rel":
            return f"rel {self.rtol:g}"
        return f"atol {self.atol:g}, rtol {self.rtol:g}"


EXACT = Tol("exact")


def close(atol: float, rtol: float = 0.0, note: str = "") -> Tol:
    return Tol("close", atol=atol, rtol=rtol, note=note)


def ulp(n: float, note: str = "") -> Tol:
    return Tol("ulp", ulps=n, note=note)


def rel(r: float) -> Tol:
    return Tol("rel", rtol=r)


def spacing(dtype: torch.dtype, mag: float) -> float:
    """The distance between adjacent ``dtype`` values at magnitude ``mag``."""
    fi = torch.finfo(dtype)
    if mag < fi.tiny:
        return fi.eps * fi.tiny
    return fi.eps * 2.0 ** math.floor(math.log2(mag))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Row:
    method: str
    reference: str
    dtype: str
    metric: str  # "ulp" | "rel" | "mismatches"
    tolerances: set[str] = field(default_factory=set)
    cases: int = 0
    max_abs: float = 0.0
    max_metric: float = 0.0
    failures: list[str] = field(default_factory=list)


class Report:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], Row] = {}
        self.errors: list[str] = []

    def _row(self, method: str, reference: str, dtype: torch.dtype, metric: str, tol: Tol) -> Row:
        key = (method, reference, dtype_name(dtype))
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = Row(method, reference, dtype_name(dtype), metric)
        row.tolerances.add(tol.describe())
        return row

    def tensors(
        self,
        method: str,
        reference: str,
        dtype: torch.dtype,
        got: Mapping[str, torch.Tensor] | torch.Tensor,
        want: Mapping[str, torch.Tensor] | torch.Tensor,
        tol: Tol,
        case: str,
    ) -> None:
        """One case: ``got`` against ``want`` (a tensor or dicts of tensors, compared key by key)."""
        row = self._row(method, reference, dtype, "ulp", tol)
        row.cases += 1
        if isinstance(got, torch.Tensor) or isinstance(want, torch.Tensor):
            got, want = {"t": got}, {"t": want}
        problems = []
        if sorted(got) != sorted(want):
            problems.append(f"keys differ: {sorted(got)} vs {sorted(want)}")
        for k in sorted(set(got) & set(want)):
            a, b = got[k], want[k]
            diff, ulps, ok, why = compare(a, b, tol)
            row.max_abs = max(row.max_abs, diff)
            row.max_metric = max(row.max_metric, ulps)
            if not ok:
                problems.append(f"{k}: {why}")
        if problems:
            row.failures.append(f"{case}: " + "; ".join(problems))

    def masks(
        self,
        method: str,
        reference: str,
        dtype: torch.dtype,
        got: Mapping[str, torch.Tensor],
        want: Mapping[str, torch.Tensor],
        case: str,
    ) -> None:
        """One case of boolean masks: must be equal; counts the differing entries."""
        row = self._row(method, reference, dtype, "mismatches", EXACT)
        row.cases += 1
        bad = 0
        for k in sorted(want):
            a, b = got[k], want[k]
            if a.shape != b.shape:
                bad += b.numel()
                continue
            bad += int((a.bool() != b.bool()).sum())
        row.max_metric = max(row.max_metric, bad)
        row.max_abs = max(row.max_abs, 1.0 if bad else 0.0)
        if bad:
            row.failures.append(f"{case}: {bad} mask entries differ")

    def scalars(
        self,
        method: str,
        reference: str,
        dtype: torch.dtype,
        got: Sequence[float],
        want: Sequence[float],
        tol: Tol,
        case: str,
    ) -> None:
        row = self._row(method, reference, dtype, "rel", tol)
        row.cases += 1
        if len(got) != len(want):
            row.failures.append(f"{case}: {len(got)} values vs {len(want)}")
            return
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            d = abs(float(a) - float(b))
            r = d / abs(float(b)) if b != 0 else (0.0 if d == 0 else math.inf)
            row.max_abs = max(row.max_abs, d)
            row.max_metric = max(row.max_metric, r)
            if not d <= tol.rtol * abs(float(b)):
                row.failures.append(f"{case}: value {i}: {a!r} vs {b!r} (rel {r:.3g} > {tol.rtol:g})")

    def error(self, group: str, err: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-3))
        self.errors.append(f"{group}: {type(err).__name__}: {err}\n{tb}")

    @property
    def failed(self) -> bool:
        return bool(self.errors) or any(r.failures for r in self.rows.values())


def compare(a: torch.Tensor, b: torch.Tensor, tol: Tol) -> tuple[float, float, bool, str]:
    """(max abs difference, in ulps of a's dtype at b's scale, within tolerance?, why not)."""
    if tuple(a.shape) != tuple(b.shape):
        return math.inf, math.inf, False, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    x, y = a.detach().to(F64), b.detach().to(F64)
    d = (x - y).abs()
    both_nan = torch.isnan(x) & torch.isnan(y)
    d = torch.where(both_nan, 0.0, torch.nan_to_num(d, nan=math.inf))
    diff = float(d.max()) if d.numel() else 0.0
    mag = float(y.abs().nan_to_num(0.0).max()) if y.numel() else 0.0
    ulps = diff / spacing(a.dtype, mag) if a.is_floating_point() else diff
    if tol.kind == "exact":
        if a.dtype != b.dtype:
            return diff, ulps, False, f"dtype {a.dtype} vs {b.dtype}"
        ok = diff == 0.0
        why = f"not bit-identical (max diff {diff:.3g})"
    elif tol.kind == "ulp":
        bound = tol.ulps * torch.finfo(a.dtype).eps * max(1.0, mag)
        ok = diff <= bound
        why = f"max diff {diff:.3g} > {bound:.3g} ({tol.ulps:g} ulp bound)"
    elif tol.kind == "close":
        excess = d - (tol.atol + tol.rtol * y.abs())
        ok = bool((excess <= 0).all()) if d.numel() else True
        why = f"max diff {diff:.3g} beyond atol {tol.atol:g} + rtol {tol.rtol:g}"
    else:
        raise ValueError(tol.kind)
    return diff, ulps, ok, why


def first_per_method(cases: Sequence[tuple[str, dict]]) -> list[tuple[str, dict]]:
    seen: set[str] = set()
    out = []
    for method, params in cases:
        if method not in seen:
            seen.add(method)
            out.append((method, params))
    return out


def pick(seq: Sequence, quick: bool, n: int = 1) -> list:
    return list(seq[:n]) if quick else list(seq)


# ------------------------------------------------------------------------------- reference groups


def group_mergekit_task_arithmetic(rep: Report, quick: bool) -> None:
    """linear, task_arithmetic, ties (mergekit variant), dare_linear/dare_ties at density 1."""
    import test_mergekit_parity as P

    strict_ref = f"{MK} merge_tensors (fp32 arithmetic)"
    native_ref = f"{MK} merge_tensors (native half-precision arithmetic)"
    linear = [("linear", {"weight": P.W}), ("linear", {"weight": P.W, "normalize": False})]
    cases = [*P.CASES, *linear]
    if quick:
        cases = first_per_method(cases)
    # tie-free inputs, every dtype of the test (test_parity_tie_free)
    for method, params in cases:
        for shape in P.SHAPES if not quick else [(5, 6)]:
            for dtype in P.DTYPES:
                base, models = P.tie_free_inputs(shape, dtype, seed=len(shape) * 10 + P.DTYPES.index(dtype))
                got = P.ours(base, models, method, params)
                strict = P.theirs(base, models, method, params, dtype=F32, out_dtype=dtype)
                tol = ulp(1) if method == "linear" else EXACT
                label = f"tie-free {shape} {params}"
                rep.tensors(method, strict_ref, dtype, got, strict, tol, label)
                if dtype != F32:  # for float32 inputs native arithmetic is the fp32 one above
                    native = P.theirs(base, models, method, params)
                    rep.tensors(method, native_ref, dtype, got, native, ulp(2), label)
    # random normal float32 (test_parity_random_normal_fp32: bit-identical). The test leaves linear
    # out; it is measured here against the 2-ulp bound the tests use for rounding-order differences
    # (its 1-ulp bound holds on the tie-free inputs only: random inputs reach 2 ulp).
    normal_ref = f"{MK} merge_tensors (fp32 arithmetic, random normal inputs)"
    for method, params in cases:
        for shape in pick(BIG_SHAPES, quick):
            gen = torch.Generator().manual_seed(sum(shape))
            base = torch.randn(shape, generator=gen)
            models = [base + 0.01 * torch.randn(shape, generator=gen) for _ in range(P.N)]
            got = P.ours(base, models, method, params)
            tol = ulp(2, "no test asserts this") if method == "linear" else EXACT
            want = P.theirs(base, models, method, params)
            rep.tensors(method, normal_ref, F32, got, want, tol, f"{shape} {params}")
    if quick:
        return
    # whole multi-tensor state dicts with an integer buffer (test_parity_whole_state_dicts_with_a_buffer)
    gen = torch.Generator().manual_seed(1)
    base = {k: torch.randn(s, generator=gen) for k, s in MULTI.items()}
    base["pos_ids"] = torch.arange(4)
    models = []
    for _ in range(P.N):
        m = {
            k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items() if v.is_floating_point()
        }
        m["pos_ids"] = torch.arange(4)
        models.append(m)
    sd_ref = f"{MK} merge_state_dicts"
    for method, params in P.CASES:
        got = P.merge_state_dicts(base, models, method, params)
        want = P.mk_merge_state_dicts(
            {"base": base, **{f"m{i}": m for i, m in enumerate(models)}},
            method,
            parameters=params,
            base="base",
        )
        rep.tensors(method, sd_ref, F32, got, want, EXACT, f"state dict {params}")


def group_ties_literal(rep: Report, quick: bool) -> None:
    """Paper TIES, global scope (tests/ref_ties.py) and mergekit-variant TIES with tied magnitudes
    (test_ties.ref_mergekit_tensor)."""
    import test_ties as TT
    from ref_ties import ties_state_dicts

    ref = "tests/ref_ties.py (paper TIES, global)"
    shape_sets = [TT.SHAPES] if quick else [TT.SHAPES, MULTI]
    for density in pick([0.05, 0.2, 0.5, 0.97, 1.0], quick, 2):
        for merge_func in pick(["mean", "sum"], quick):
            params = {"variant": "paper", "density": density, "merge_func": merge_func, "lambda": 0.7}
            for shapes in shape_sets:
                for dtype, tol in ((F64, 1e-12), (F32, 2e-6)):
                    seed = int(density * 1000) + len(merge_func) + (shapes is MULTI)
                    gen = torch.Generator().manual_seed(seed)
                    base, models = TT._random_model(gen, shapes, n=4, dtype=dtype)
                    want = ties_state_dicts(base, models, [density] * 4, merge_func=merge_func, lam=0.7)
                    got = TT.merge(base, models, params, dtype)
                    rep.tensors("ties", ref, dtype, got, want, close(tol), f"{params} {len(shapes)} tensors")
    if not quick:  # per-model densities, exact zeros in the task vectors, one frozen tensor
        gen = torch.Generator().manual_seed(7)
        base, models = TT._random_model(gen, TT.SHAPES, n=3, dtype=F64)
        for m in models:
            m["w"][:5] = base["w"][:5]
            m["b"] = base["b"].clone()
        dens = [0.1, 0.3, 0.6]
        want = ties_state_dicts(base, models, dens)
        got = TT.merge(base, models, {"variant": "paper", "density": dens}, F64)
        rep.tensors("ties", ref, F64, got, want, close(1e-12), "per-model density, sparse deltas")

    ref = "tests/test_ties.py ref_mergekit_tensor (literal, tied magnitudes)"
    shapes = [(), (1,), (12,), (6, 5), (2, 3, 4)]
    for shape in [(6, 5)] if quick else [*shapes, *BIG_SHAPES]:
        gen = torch.Generator().manual_seed(sum(shape) + len(shape))
        base = torch.randint(-3, 4, shape, generator=gen).to(F64)
        tuned = [base + torch.randint(-3, 4, shape, generator=gen).to(F64) for _ in range(3)]
        weights, dens = [0.5, 1.5, -0.25], [0.3, 0.5, 0.8]
        for normalize in (True, False):
            params = {"weight": weights, "density": dens, "normalize": normalize, "lambda": 1.5}
            got = TT.merge({"t": base}, [{"t": t} for t in tuned], params, F64)["t"]
            want = TT.ref_mergekit_tensor(base, tuned, weights, dens, normalize, 1.5)
            rep.tensors("ties", ref, F64, got, want, close(1e-12), f"{shape} normalize={normalize}")


def group_dare_literal(rep: Report, quick: bool) -> None:
    """dare_linear / dare_ties on the seeded draws (test_dare.ref_dare)."""
    import test_dare as D

    ref = "tests/test_dare.py ref_dare (literal, seeded draws)"
    kw = {"weights": [0.6, 1.2, 0.9], "densities": [0.3, 0.7, 1.0], "lam": 0.8}
    shape_sets = [D.SHAPES] if quick else [D.SHAPES, MULTI]
    for method in D.METHODS:
        for rescale in pick(["l1", "inverse_keep", "none"], quick):
            for normalize in pick([False, True], quick):
                params = {
                    "weight": kw["weights"],
                    "density": kw["densities"],
                    "lambda": 0.8,
                    "normalize": normalize,
                    "rescale": rescale,
                }
                for shapes in shape_sets:
                    base, models = D.random_sds(11 + (shapes is MULTI), shapes, n=3, dtype=F64)
                    want = D.ref_dare(
                        base, models, method, seed=5, normalize=normalize, rescale=rescale, **kw
                    )
                    got = D.merge(base, models, method, params, seed=5, dtype=F64)
                    rep.tensors(method, ref, F64, got, want, close(1e-12), f"{params} {len(shapes)} tensors")


def group_pcb_literal(rep: Report, quick: bool) -> None:
    """PCB (tests/ref_pcb.py): inter A/B/C, global and per_tensor, defaults, DARE pre-processing, bf16."""
    import test_pcb as PC
    from ref_pcb import pcb_state_dicts
    from weightmerge.api import merge_state_dicts

    ref = "tests/ref_pcb.py (literal)"
    shape_sets = [PC.SHAPES] if quick else [PC.SHAPES, MULTI]
    for shapes in shape_sets:
        for scope in pick(["global", "per_tensor"], quick):
            for inter in pick(["A", "B", "C"], quick):
                for dtype, tol in ((F64, 1e-12), (F32, 2e-6)):
                    base, models = PC.random_models(11, 4, dtype, shapes)
                    lam = [1.0, 0.5, 1.5, 0.8]
                    params = {
                        "keep_ratio": 0.2,
                        "clamp_ratio": 0.05,
                        "lambda": lam,
                        "inter": inter,
                        "scope": scope,
                    }
                    got = merge_state_dicts(base, models, "pcb", params, compute_dtype=dtype)
                    want = pcb_state_dicts(
                        base, models, keep_ratio=0.2, clamp_ratio=0.05, lam=lam, inter=inter, scope=scope
                    )
                    rep.tensors(
                        "pcb", ref, dtype, got, want, close(tol, tol), f"{params} {len(shapes)} tensors"
                    )
            if quick:
                continue
            base, models = PC.random_models(5, 3, F64, shapes)  # defaults
            got = merge_state_dicts(base, models, "pcb", {"scope": scope}, compute_dtype=F64)
            want = pcb_state_dicts(base, models, scope=scope)
            rep.tensors("pcb", ref, F64, got, want, close(1e-12, 1e-12), f"defaults {scope}")
            base, models = PC.random_models(7, 3, F64, shapes)  # DARE pre-processing
            p, seed = 0.3, 42
            params = {"keep_ratio": 0.3, "dare_drop_rate": p, "scope": scope}
            got = merge_state_dicts(base, models, "pcb", params, seed=seed, compute_dtype=F64)
            drops = PC.dare_masks(models, base, p, seed)
            want = pcb_state_dicts(base, models, keep_ratio=0.3, scope=scope, drop=drops, drop_rate=p)
            rep.tensors("pcb", ref, F64, got, want, close(1e-12, 1e-12), f"{params}")
        # bfloat16 in, bfloat16 out (test_bf16_in_bf16_out)
        base, models = PC.random_models(37, 3, BF16, shapes)
        got = merge_state_dicts(base, models, "pcb", {"keep_ratio": 0.3})
        want = pcb_state_dicts(base, models, keep_ratio=0.3)
        want = {k: v.to(BF16) for k, v in want.items()}
        rep.tensors("pcb", ref, BF16, got, want, close(0.02, 0.01), "bf16 keep_ratio=0.3")


def group_emr_literal(rep: Report, quick: bool) -> None:
    """EMR (tests/ref_emr.py), both rescale modes: unified, masks, rescalers, task_state_dict."""
    import test_emr as E
    from ref_emr import emr_state_dicts

    ref = "tests/ref_emr.py (literal)"
    shape_sets = [E.SHAPES] if quick else [E.SHAPES, MULTI]
    for shapes in shape_sets:
        for rescale in pick(["per_tensor_mean", "global"], quick):
            for dtype, tol in ((F64, 1e-12), (F32, 1e-6)):
                base, models = E.random_models(3, 4, dtype, shapes)
                out = E.emr(base, models, dtype=dtype, rescale=rescale)
                unified, masks, resc = emr_state_dicts(base, models, rescale=rescale)
                case = f"{rescale} {len(shapes)} tensors"
                rep.tensors("emr", f"{ref}: unified", dtype, out.unified, unified, close(tol, tol), case)
                for t in range(len(models)):
                    rep.masks("emr", f"{ref}: masks", dtype, out.masks[t], masks[t], f"{case} task {t}")
                rep.scalars("emr", f"{ref}: rescalers", dtype, out.rescalers, resc, rel(tol), case)
                for t in range(len(models)):
                    rec = out.task_state_dict(t)
                    want = {k: base[k].to(F64) + unified[k] * masks[t][k].to(F64) * resc[t] for k in base}
                    tol_rec = close(tol, tol, "the unified tolerance; asserted for bf16 only")
                    label = f"{case} task {t}"
                    rep.tensors("emr", f"{ref}: task_state_dict", dtype, rec, want, tol_rec, label)
        # bfloat16 (test_bf16_in_bf16_out: the reconstruction uses weightmerge's masks, as the test does)
        base, models = E.random_models(19, 3, BF16, shapes)
        out = E.emr(base, models)
        unified, _, resc = emr_state_dicts(base, models, rescale="per_tensor_mean")
        case = f"bf16 {len(shapes)} tensors"
        rep.scalars("emr", f"{ref}: rescalers", BF16, out.rescalers, resc, rel(1e-6), case)
        for t in range(len(models)):
            rec = out.task_state_dict(t)
            want = {k: base[k].to(F64) + unified[k] * out.masks[t][k].to(F64) * resc[t] for k in base}
            rep.tensors(
                "emr", f"{ref}: task_state_dict", BF16, rec, want, close(0.02, 0.01), f"{case} task {t}"
            )


def group_emr_fusion_bench(rep: Report, quick: bool) -> None:
    """fusion-bench 0.2.33 emr_merge (test_emr.test_matches_fusion_bench), float32."""
    if quick:  # importing fusion_bench alone takes ~10 s
        return
    from fusion_bench.method.emr_merging.utils import emr_merge

    import test_emr as E

    ref = "fusion-bench 0.2.33 emr_merge"
    for shapes in (E.SHAPES, MULTI):
        base, models = E.random_models(5, 4, F32, shapes)
        out = E.emr(base, models)
        task_vectors = [{k: m[k] - base[k] for k in sorted(base)} for m in models]
        unified, masks, rescalers = emr_merge(task_vectors)
        case = f"{len(shapes)} tensors"
        rep.tensors("emr", f"{ref}: unified", F32, out.unified, unified, close(1e-7, 1e-6), case)
        for t in range(len(models)):
            want = {k: masks[k][t] for k in base}
            rep.masks("emr", f"{ref}: masks", F32, out.masks[t], want, f"{case} task {t}")
        rep.scalars("emr", f"{ref}: rescalers", F32, out.rescalers, rescalers.tolist(), rel(1e-5), case)


def group_svd_fusion_bench(rep: Report, quick: bool) -> None:
    """fusion-bench 0.2.33 TSV-M, Iso-C and Iso-CTS (tests/test_svd_methods.py), float64, on low-rank
    + noise task vectors. Run in quick mode too: they are these methods' only reference."""
    from fusion_bench.method.isotropic_merging import iso_utils
    from fusion_bench.method.task_singular_vector.utils import TSVM_utils

    import test_svd_methods as S
    from weightmerge.api import merge_state_dicts

    tol = close(S.ATOL, S.RTOL)
    big = {"a.w": (64, 33), "b.w": (40, 80), "c.v": (3, 50, 7), "d.b": (1000,)}
    for shapes in [S.SHAPES] + ([] if quick else [big]):
        for n in [3] if quick else [2, 4]:
            base, models = S.realistic(7 + n, n, shapes=shapes)
            tvs = S.task_vectors(base, models)
            case = f"{len(shapes)} tensors, {n} models"
            w = [1.0, 0.5, 1.5, 0.8][:n]
            got = merge_state_dicts(base, models, "tsv_m", {"weight": w, "lambda": 0.7}, compute_dtype=F64)
            scaled = [{k: wi * v for k, v in tv.items()} for wi, tv in zip(w, tvs, strict=True)]
            want = TSVM_utils.compute_and_sum_svd_mem_reduction(scaled, accelerator="cpu")
            want = {k: base[k] + 0.7 * v for k, v in want.items()}
            rep.tensors("tsv_m", "fusion-bench 0.2.33 TSV-M", F64, got, want, tol, case)
            got = merge_state_dicts(base, models, "iso_c", {"lambda": 1.3}, compute_dtype=F64)
            want = {k: base[k] + 1.3 * v for k, v in iso_utils.iso_c(tvs, accelerator="cpu").items()}
            rep.tensors("iso_c", "fusion-bench 0.2.33 iso_c", F64, got, want, tol, case)
            got = merge_state_dicts(base, models, "iso_cts", {"common_fraction": 0.6}, compute_dtype=F64)
            want = iso_utils.iso_cts(tvs, common_space_fraction=0.6, accelerator="cpu")
            want = {k: base[k] + v for k, v in want.items()}
            rep.tensors("iso_cts", "fusion-bench 0.2.33 iso_cts", F64, got, want, tol, case)


def group_consensus_cart(rep: Report, quick: bool) -> None:
    """consensus_ta against fusion-bench 0.2.33's flat TALL-mask utilities, cart against the
    literal reference of tests/test_consensus_cart.py; float64."""
    from fusion_bench.method.tall_mask import utils as tall

    import test_consensus_cart as C
    import test_svd_methods as S
    from weightmerge.api import merge_state_dicts

    big = {"a.w": (64, 33), "b.w": (40, 80), "c.v": (3, 50, 7), "d.b": (1000,)}
    for shapes in [S.SHAPES] + ([] if quick else [big]):
        for n in [3] if quick else [2, 4]:
            base, models = S.realistic(17 + n, n, shapes=shapes)
            case = f"{len(shapes)} tensors, {n} models"
            keys = sorted(base)

            def flat(sd: Mapping[str, torch.Tensor], keys: list[str] = keys) -> torch.Tensor:
                return torch.cat([sd[k].reshape(-1) for k in keys])

            p = {"lambda": 0.4, "mask_lambda": 0.5, "k": 2}
            got = merge_state_dicts(base, models, "consensus_ta", p, compute_dtype=F64)
            tv = torch.stack([flat(t) for t in S.task_vectors(base, models)])
            masks = tall.generate_task_masks(
                tv, torch.stack([flat(m) for m in models]), flat(base), tall_mask_lambda=0.5
            )
            want = flat(base) + 0.4 * ((masks.sum(dim=0) >= 2) * tv.sum(dim=0))
            ref = "fusion-bench 0.2.33 tall_mask.utils (flat)"
            rep.tensors("consensus_ta", ref, F64, flat(got), want, close(1e-14, 1e-12), case)
            got = merge_state_dicts(base, models, "cart", {"rank_ratio": 0.3}, compute_dtype=F64)
            want = C.cart_literal(models, rank_ratio=0.3, prior=2.0)
            rep.tensors(
                "cart", "tests/test_consensus_cart.py (literal)", F64, got, want, close(1e-12, 1e-10), case
            )


def group_wudi_doge_fusion_bench(rep: Report, quick: bool) -> None:
    """wudi (25 Adam steps) and doge_ta (fusion-bench's fixed 400 steps) against fusion-bench
    0.2.33 (tests/test_wudi_doge.py), float64."""
    from fusion_bench.method.doge_ta.doge_ta import DOGE_TA_Algorithm
    from fusion_bench.method.wudi.wudi import wudi_merging

    import test_svd_methods as S
    import test_wudi_doge as W
    from weightmerge.api import merge_state_dicts

    for n in [3] if quick else [2, 4]:
        base, models = S.realistic(40 + n, n)
        got = merge_state_dicts(base, models, "wudi", {"steps": 25}, compute_dtype=F64)
        want = wudi_merging(S.task_vectors(base, models), accelerator="cpu", iter_num=25)
        want = {k: base[k] + v.detach() for k, v in want.items()}
        rep.tensors(
            "wudi", "fusion-bench 0.2.33 wudi_merging", F64, got, want, close(W.WUDI_ATOL), f"{n} models"
        )
        base, models = S.realistic(50 + n, n, shapes=W.DOGE_SHAPES)
        pool = {"_pretrained_": W.as_module(base), **{f"m{i}": W.as_module(m) for i, m in enumerate(models)}}
        want = DOGE_TA_Algorithm(subspace=6, K=30, lamda=0.07).run(pool).state_dict()
        want = {k: v.detach() for k, v in want.items()}
        got = merge_state_dicts(base, models, "doge_ta", compute_dtype=F64)
        rep.tensors(
            "doge_ta", "fusion-bench 0.2.33 DOGE_TA_Algorithm", F64, got, want, close(1e-12), f"{n} models"
        )


def group_fisher_literal(rep: Report, quick: bool) -> None:
    """fisher (test_fisher.reference_fisher, element by element in float64)."""
    import test_fisher as FI
    from weightmerge.api import merge_state_dicts

    ref = "tests/test_fisher.py reference_fisher (literal)"
    shape_sets = [None] if quick else [None, MULTI]
    for shapes in shape_sets:
        for normalize in pick([True, False], quick):
            for n in pick([2, 3], quick):
                models, fisher = FI._random_case(n, seed=10 + n, shapes=shapes)
                weights = [0.3, 1.7, 0.9][:n]
                got = FI._merge(models, fisher, weight=weights, normalize_fisher_weight=normalize)
                want = FI.reference_fisher(models, fisher, weights, normalize=normalize, eps=1e-6)
                case = f"n={n} normalize={normalize} shapes={shapes}"
                rep.tensors("fisher", ref, F64, got, want, close(1e-12, 1e-12), case)
        models, fisher = FI._random_case(3, seed=3, shapes=shapes)
        models32 = [{k: v.float() for k, v in m.items()} for m in models]
        got = merge_state_dicts(None, models32, "fisher", {"fisher": fisher})
        want = FI.reference_fisher(models, fisher, [1, 1, 1], normalize=True, eps=1e-6)
        rep.tensors("fisher", ref, F32, got, want, close(1e-6, 1e-5), f"float32 shapes={shapes}")


def _regmean_big_case(n: int, seed: int):
    import test_regmean as R

    g = torch.Generator().manual_seed(seed)
    shapes = {"big.weight": (64, 33), "proj.weight": (50, 7), "v": (3, 50, 7), "b": (1000,)}
    models = [{k: torch.randn(s, generator=g, dtype=F64) for k, s in shapes.items()} for _ in range(n)]
    grams = [{"big": R._gram(g, 33), "proj": R._gram(g, 7)} for _ in range(n)]
    return models, grams


def group_regmean_numpy(rep: Report, quick: bool) -> None:
    """regmean (test_regmean.reference_regmean: numpy float64, explicit inverse)."""
    import numpy as np

    import test_regmean as R
    from weightmerge.api import merge_state_dicts

    ref = "tests/test_regmean.py reference_regmean (numpy)"
    avg_ref = "numpy mean (tensors without a Gram)"
    cases: list[tuple[str, Callable]] = [("test shapes", R._random_case)]
    if not quick:
        cases.append(("big shapes", _regmean_big_case))
    for label, make in cases:
        for alpha in pick([1.0, 0.9, 0.25], quick):
            for n in pick([2, 4], quick):
                models, grams = make(n, seed=n)
                got = R._merge(models, grams, reduce_non_diagonal_ratio=alpha)
                case = f"{label} alpha={alpha} n={n}"
                for mod in grams[0]:
                    want = R.reference_regmean(
                        [m[f"{mod}.weight"].numpy() for m in models], [g[mod].numpy() for g in grams], alpha
                    )
                    w = torch.from_numpy(np.ascontiguousarray(want))
                    rep.tensors(
                        "regmean", ref, F64, got[f"{mod}.weight"], w, close(1e-10, 1e-10), f"{case} {mod}"
                    )
                for k in models[0]:
                    if k.removesuffix(".weight") in grams[0]:
                        continue
                    want_avg = torch.from_numpy(np.mean([m[k].numpy() for m in models], axis=0))
                    rep.tensors("regmean", avg_ref, F64, got[k], want_avg, close(1e-14, 1e-14), f"{case} {k}")
        models, grams = make(3, seed=30)
        m32 = [{k: v.float() for k, v in m.items()} for m in models]
        got = merge_state_dicts(None, m32, "regmean", {"gram": grams})
        for mod in pick(list(grams[0]), quick):
            want = R.reference_regmean(
                [m[f"{mod}.weight"].numpy() for m in models], [g[mod].numpy() for g in grams], 1.0
            )
            w = torch.from_numpy(np.ascontiguousarray(want))
            rep.tensors("regmean", ref, F32, got[f"{mod}.weight"], w, close(1e-5, 1e-4), f"{label} f32 {mod}")


def _mergekit_merge_tensors():
    from mergekit.merge_methods.api import merge_tensors

    return merge_tensors


def group_breadcrumbs(rep: Report, quick: bool) -> None:
    """breadcrumbs(_ties): mergekit (test_parity_with_mergekit) and ref_breadcrumbs (literal)."""
    import test_mergekit_extras as X

    merge_tensors = _mergekit_merge_tensors()
    ref = f"{MK} merge_tensors"
    parity = [(m, p) for m, p in X.PARITY if m.startswith("breadcrumbs")]
    for method, params in first_per_method(parity) if quick else parity:
        for shape in [(5, 6)] if quick else [*X.SHAPES, *BIG_SHAPES]:
            base, models = X.random_case(shape, 3, seed=20)
            want = merge_tensors([base, *models], method, parameters=params, base_index=0)
            rep.tensors(
                method, ref, F32, X.ours(base, models, method, params), want, EXACT, f"{shape} {params}"
            )
    ref = "tests/test_mergekit_extras.py ref_breadcrumbs (literal)"
    p = {"weight": [0.7, -0.4, 1.2], "density": [0.3, 0.55, 1.0], "gamma": [0.05, 0.1, 0.0], "lambda": 0.8}
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        for normalize in pick([False, True], quick):
            for shape in [(6, 9)] if quick else [(6, 9), *BIG_SHAPES]:
                base, models = X.random_case(shape, 3, seed=1, dtype=F64)
                got = X.ours(base, models, method, {**p, "normalize": normalize}, dtype=F64)
                want = X.ref_breadcrumbs(
                    base,
                    models,
                    weights=p["weight"],
                    densities=p["density"],
                    gammas=p["gamma"],
                    ties=method == "breadcrumbs_ties",
                    normalize=normalize,
                    lam=0.8,
                )
                rep.tensors(
                    method, ref, F64, got, want, close(1e-12, 1e-12), f"{shape} normalize={normalize}"
                )


class _ReplayBernoulli:
    """Stands in for torch.bernoulli inside mergekit's DELLA: keep iff our seeded uniform < p."""

    def __init__(self, seed: int, name: str) -> None:
        self.seed, self.name, self.calls = seed, name, 0

    def __call__(self, p: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        from weightmerge.methods._random import uniform

        n_el = p.numel()
        u = uniform(self.seed, self.name, self.calls, 0, n_el, n_el).reshape(p.shape)
        self.calls += 1
        return (u < p).to(p.dtype)


def group_della(rep: Report, quick: bool) -> None:
    """della(_linear): mergekit at density 1, mergekit with replayed draws, ref_della (literal)."""
    import test_mergekit_extras as X

    merge_tensors = _mergekit_merge_tensors()
    ref = f"{MK} merge_tensors"
    for method, params in [(m, p) for m, p in X.PARITY if m.startswith("della")]:
        for shape in [(5, 6)] if quick else [*X.SHAPES, *BIG_SHAPES]:
            base, models = X.random_case(shape, 3, seed=20)
            want = merge_tensors([base, *models], method, parameters=params, base_index=0)
            rep.tensors(
                method, ref, F32, X.ours(base, models, method, params), want, EXACT, f"{shape} {params}"
            )
    ref = f"{MK} merge_tensors (draws replayed)"
    replayed = [
        ("della", {"weight": X.W3, "density": 0.5, "epsilon": 0.2}),
        ("della", {"weight": [0.7, -1.3, 0.4], "density": [0.3, 0.5, 0.7], "epsilon": 0.1, "rescale": False}),
        ("della_linear", {"weight": X.W3, "density": 0.6, "epsilon": 0.15}),
        ("della_linear", {"weight": X.W3, "density": [0.4, 0.5, 0.6], "normalize": True, "lambda": 1.5}),
    ]
    shapes = [s for s in [*X.SHAPES, *BIG_SHAPES] if math.prod(s) > 1]  # mergekit: NaN for 1 element
    for method, params in first_per_method(replayed) if quick else replayed:
        for shape in [(5, 6)] if quick else shapes:
            base, models = X.random_case(shape, 3, seed=22)
            replay = _ReplayBernoulli(7, "t")
            saved = torch.bernoulli
            torch.bernoulli = replay
            try:
                want = merge_tensors([base, *models], method, parameters=params, base_index=0)
            finally:
                torch.bernoulli = saved
            got = X.ours(base, models, method, params, seed=7)
            if replay.calls != 3:
                rep.errors.append(f"della replay {shape} {params}: {replay.calls} draws, expected 3")
            rep.tensors(method, ref, F32, got, want, EXACT, f"{shape} {params}")
    ref = "tests/test_mergekit_extras.py ref_della (literal, seeded draws)"
    configs = [
        ("della", (6, 8), True, "l1"),
        ("della", (11,), True, "inverse_keep"),
        ("della_linear", (3, 4, 5), False, "l1"),
        ("della_linear", (6, 8), True, "inverse_keep"),
    ]
    if not quick:
        configs += [
            (m, s, True, mode) for m in ("della", "della_linear") for s in BIG_SHAPES for mode in ("l1",)
        ]
    p = {"weight": [0.6, 1.1, -0.3], "density": [0.4, 0.7, 0.5], "epsilon": [0.1, 0.2, 0.05]}
    for method, shape, rescale, mode in [configs[0], configs[2]] if quick else configs:
        base, models = X.random_case(shape, 3, seed=4, dtype=F64)
        params = {**p, "rescale": rescale, "rescale_mode": mode}
        got = X.ours(base, models, method, params, seed=5, dtype=F64)
        want = X.ref_della(
            base,
            models,
            seed=5,
            name="t",
            weights=p["weight"],
            densities=p["density"],
            epsilons=p["epsilon"],
            ties=method == "della",
            normalize=method == "della",
            rescale=rescale,
            mode=mode,
        )
        rep.tensors(method, ref, F64, got, want, close(1e-12, 1e-12), f"{shape} rescale={rescale} {mode}")


def group_mergekit_others(rep: Report, quick: bool) -> None:
    """model_stock, slerp, nearswap, passthrough, sce, nuslerp, multislerp, karcher vs mergekit
    (test_mergekit_extras parity tests), bit for bit in float32."""
    import test_mergekit_extras as X
    from weightmerge.api import merge_state_dicts

    merge_tensors = _mergekit_merge_tensors()
    ref = f"{MK} merge_tensors"
    shapes = [(5, 6)] if quick else [*X.SHAPES, *BIG_SHAPES]

    def check(method: str, got: torch.Tensor, want: torch.Tensor, case: str) -> None:
        rep.tensors(method, ref, F32, got, want, EXACT, case)

    for shape in shapes:
        for n, seed in ((2, 21), (3, 20), (4, 21)) if not quick else ((3, 20),):
            base, models = X.random_case(shape, n, seed=seed)
            for p in ({}, {"filter_wise": True}):
                want = merge_tensors([base, *models], "model_stock", parameters=p, base_index=0)
                check("model_stock", X.ours(base, models, "model_stock", p), want, f"{shape} n={n} {p}")
        base, models = X.random_case(shape, 1, seed=23, scale=1.0)
        near = base * 1.00001  # collinear: the lerp branch
        for t in pick([0.0, 0.3, 1.0, 1.4], quick, 2):
            want = merge_tensors([base, models[0]], "slerp", parameters={"t": t}, base_index=0)
            check("slerp", X.ours(base, models, "slerp", {"t": t}), want, f"{shape} t={t}")
            want = merge_tensors([base, near], "slerp", parameters={"t": t}, base_index=0)
            check("slerp", X.ours(base, [near], "slerp", {"t": t}), want, f"{shape} t={t} collinear")
            want = merge_tensors([base, models[0]], "nearswap", parameters={"t": t}, base_index=0)
            check("nearswap", X.ours(base, models, "nearswap", {"t": t}), want, f"{shape} t={t}")
        x = torch.randn(shape, generator=torch.Generator().manual_seed(24))
        for params in ({}, {"scale": 0.5}):
            want = merge_tensors([x], "passthrough", parameters=params)
            got = merge_state_dicts(None, [{"t": x}], "passthrough", params)["t"]
            check("passthrough", got, want, f"{shape} {params}")
        for scale in pick([0.1, 3e-4], quick):  # 3e-4: sce's equal-weight fallback
            base, models = X.random_case(shape, 3, seed=31, scale=scale)
            for p in ({}, {"select_topk": 0.3}, {"select_topk": 0.0}):
                want = merge_tensors([base, *models], "sce", parameters=p, base_index=0)
                check("sce", X.ours(base, models, "sce", p), want, f"{shape} scale={scale} {p}")
        base, models = X.random_case(shape, 2, seed=32)
        for p in (
            {"weight": [0.3, 0.9]},
            {"weight": [1.0, 1.0], "nuslerp_flatten": False},
            {"weight": [0.2, 0.5], "nuslerp_flatten": False, "nuslerp_row_wise": True},
        ):
            want = merge_tensors([base, *models], "nuslerp", parameters=p, base_index=0)
            check("nuslerp", X.ours(base, models, "nuslerp", p), want, f"{shape} base {p}")
            want = merge_tensors(models, "nuslerp", parameters=p)
            check("nuslerp", X.ours(None, models, "nuslerp", p), want, f"{shape} no base {p}")
        base, models = X.random_case(shape, 3, seed=33)
        for p in ({"weight": [0.3, 0.9, 0.5]}, {"weight": [1.0, 2.5, 1.0], "normalize_weights": False}):
            want = merge_tensors([base, *models], "multislerp", parameters=p, base_index=0)
            check("multislerp", X.ours(base, models, "multislerp", p), want, f"{shape} base {p}")
            want = merge_tensors(models, "multislerp", parameters=p)
            check("multislerp", X.ours(None, models, "multislerp", p), want, f"{shape} no base {p}")
        for p in ({}, {"max_iter": 3}):
            want = merge_tensors(models, "karcher", parameters=p)
            check("karcher", X.ours(None, models, "karcher", p), want, f"{shape} {p}")


GROUPS: list[Callable[[Report, bool], None]] = [
    group_mergekit_task_arithmetic,
    group_ties_literal,
    group_dare_literal,
    group_pcb_literal,
    group_emr_literal,
    group_emr_fusion_bench,
    group_svd_fusion_bench,
    group_consensus_cart,
    group_wudi_doge_fusion_bench,
    group_fisher_literal,
    group_regmean_numpy,
    group_breadcrumbs,
    group_della,
    group_mergekit_others,
]


# ------------------------------------------------------------------------------------------ output


def fmt_abs(x: float) -> str:
    return "0.0" if x == 0 else f"{x:.3g}"


def fmt_metric(row: Row) -> str:
    if row.metric == "mismatches":
        return f"{int(row.max_metric)} mismatches"
    if row.metric == "rel":
        return "0.0 rel" if row.max_metric == 0 else f"{row.max_metric:.2g} rel"
    return "0 ulp" if row.max_metric == 0 else f"{row.max_metric:.3g} ulp"


DTYPE_ORDER = {"float64": 0, "float32": 1, "bfloat16": 2, "float16": 3}


def sorted_rows(rep: Report) -> list[Row]:
    from weightmerge.methods.registry import METHODS

    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(
        rep.rows.values(),
        key=lambda r: (order.get(r.method, len(order)), r.reference, DTYPE_ORDER.get(r.dtype, 9)),
    )


def markdown(rep: Report) -> str:
    lines = [
        "| method | reference | dtype | cases | largest abs difference | largest difference (ulps / rel) "
        "| tolerance (as the tests assert) | ok |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in sorted_rows(rep):
        lines.append(
            f"| {r.method} | {r.reference} | {r.dtype} | {r.cases} | {fmt_abs(r.max_abs)} | "
            f"{fmt_metric(r)} | {'; '.join(sorted(r.tolerances))} | {'FAIL' if r.failures else 'ok'} |"
        )
    return "\n".join(lines)


def covered_methods(rep: Report) -> set[str]:
    return {r.method for r in rep.rows.values() if r.cases}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a reduced set of cases (seconds; for the tests)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows and failures as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from weightmerge.methods.registry import METHODS

    rep = Report()
    t0 = time.perf_counter()
    timings = {}
    for group in GROUPS:
        g0 = time.perf_counter()
        try:
            group(rep, args.quick)
        except Exception as err:
            rep.error(group.__name__, err)
        except BaseException as err:  # pytest.skip (e.g. an oracle missing) is not an Exception
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            rep.error(group.__name__, err)
        timings[group.__name__] = round(time.perf_counter() - g0, 3)
    elapsed = time.perf_counter() - t0

    missing = sorted(set(METHODS) - covered_methods(rep) - set(NO_REFERENCE))
    for m in missing:
        rep.errors.append(f"method {m!r} has no comparison in the report and is not in NO_REFERENCE")

    print(f"## weightmerge parity report{' (quick)' if args.quick else ''}\n")
    print(markdown(rep))
    if NO_REFERENCE:
        print(
            "\nNo independent reference: " + ", ".join(f"{k} ({v})" for k, v in sorted(NO_REFERENCE.items()))
        )
    n_cases = sum(r.cases for r in rep.rows.values())
    print(f"\n{n_cases} cases, {len(rep.rows)} rows, {elapsed:.1f} s, torch {torch.__version__}")
    failures = [f"{r.method} | {r.reference} | {r.dtype}: {f}" for r in sorted_rows(rep) for f in r.failures]
    if failures or rep.errors:
        print(f"\nFAILED: {len(failures)} case(s) beyond tolerance, {len(rep.errors)} error(s)")
        for f in failures[:50]:
            print(f"- {f}")
        for e in rep.errors:
            print(f"- ERROR {e}")
    if args.json:
        payload = {
            "quick": args.quick,
            "seconds": round(elapsed, 3),
            "group_seconds": timings,
            "torch": torch.__version__,
            "rows": [
                {
                    "method": r.method,
                    "reference": r.reference,
                    "dtype": r.dtype,
                    "cases": r.cases,
                    "max_abs_diff": r.max_abs,
                    "max_diff": r.max_metric,
                    "max_diff_unit": r.metric,
                    "tolerance": sorted(r.tolerances),
                    "failures": r.failures,
                }
                for r in sorted_rows(rep)
            ],
            "no_reference": NO_REFERENCE,
            "errors": rep.errors,
            "ok": not rep.failed,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
