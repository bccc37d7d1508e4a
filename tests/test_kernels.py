"""The fused numba kernels (weightmerge/kernels/) and the paths built on them (TIES' fused CPU path,
DARE-TIES, the engine's sampled selection) against the reference torch code: same bits (compared
as integers, so -0.0 and +0.0 differ), same errors; and the driver's read-ahead memory rule."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from weightmerge import kernels, merge_state_dicts
from weightmerge.engine import driver
from weightmerge.methods import _ties_fused
from weightmerge.methods import ties as ties_mod


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@pytest.fixture
def torch_only(monkeypatch):
    """Run the reference torch code: the kernels report themselves unavailable."""

    def disable() -> None:
        monkeypatch.setattr(kernels, "_module", lambda: None)

    return disable


def test_kernels_are_enabled_here():
    """The parity tests below compare two paths only if numba really runs: fail, not pass, if not."""
    if os.environ.get("WEIGHTMERGE_KERNELS") == "0":
        pytest.skip("WEIGHTMERGE_KERNELS=0 disables the kernels on purpose")
    assert kernels.enabled()
    assert kernels.usable(torch.zeros(3), torch.zeros(3, dtype=torch.float32))
    assert not kernels.usable(torch.zeros(3, dtype=torch.bfloat16))
    assert not kernels.usable(torch.zeros(3), torch.zeros(3, dtype=torch.float64))  # mixed dtypes


def _case(kind: str, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (50, 131)
    if kind == "ties":  # many exact ties at every threshold, exact zeros, both zero signs
        x = torch.randint(-3, 4, (4, *shape), generator=gen).to(dtype)
        x[x == 0] = torch.tensor(-0.0, dtype=dtype)
        x[:, ::7] = 0.0
    elif kind == "bf16":
        x = (torch.randn(4, *shape, generator=gen) * 0.01).to(torch.bfloat16).to(dtype)
    else:
        x = torch.randn(4, *shape, generator=gen, dtype=dtype)
        x[1, 3, 4] = math.inf
        x[2, 5, 6] = -math.inf
    base = torch.randn(shape, generator=gen, dtype=dtype)
    base[0, :10] = -0.0  # -0 + +0 = +0: the zero sign of the merged delta shows here
    return x, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["ties", "bf16", "normal"])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (0.5, 2.0, 1.0, 0.25), (1.0, -0.7, 0.0, 1.5)])
def test_ties_kernel_equals_torch_bit_for_bit(monkeypatch, dtype, kind, weights):
    """The fused per-tensor path against the reference (trim, then mergekit's sign test)."""
    monkeypatch.setattr(_ties_fused, "SELECT_DIRECT", 500)  # rows above this are sampled
    monkeypatch.setattr(_ties_fused, "SAMPLE_SIZE", 64)
    gen = torch.Generator().manual_seed(len(kind) * 31 + int(sum(weights) * 100))
    x, base = _case(kind, dtype, gen)
    w = torch.tensor(weights, dtype=dtype)
    cases = [([0.2] * 4, 1.0, True), ([0.05, 0.5, 1.0, 0.3], 0.7, False), ([0.9, 1e-4, 0.3, 1.0], 1.3, True)]
    for d, lam, nz in cases:
        got = _ties_fused.per_tensor(base, x.clone(), _ranks(x, d), w, lam=lam, normalize=nz, name="t")
        plain = x.clone()
        ties_mod.trim_per_tensor(plain, d, variant="mergekit", rescale=False, name="t")
        want = ties_mod.ties_combine(base, plain, w, variant="mergekit", lam=lam, normalize=nz)
        assert _same(got, want), (d, lam, nz)


def _ranks(x: torch.Tensor, densities: list[float]) -> list[int | None]:
    return [ties_mod.threshold_rank(numel=x[0].numel(), density=d, variant="mergekit") for d in densities]


def test_ties_kernel_errors_on_nan_like_torch():
    x = torch.randn(3, 40, 30)
    base = torch.zeros(40, 30)
    w = torch.ones(3)
    for dens in ([0.2, 0.2, 0.2], [0.2, 1.0, 0.2]):  # NaN in a trimmed row, then in an untrimmed one
        bad = x.clone()
        bad[1, 7, 3] = math.nan
        with pytest.raises(ValueError, match=r"NaN in the task vectors of tensor 'blk\.w'"):
            _ties_fused.per_tensor(base, bad, _ranks(bad, dens), w, lam=1.0, normalize=True, name="blk.w")
        with pytest.raises(ValueError, match=r"NaN in the task vectors of tensor 'blk\.w'"):
            ties_mod.trim_per_tensor(bad, dens, variant="mergekit", rescale=False, name="blk.w")


@pytest.mark.parametrize(
    "params", [{"density": 0.2}, {"density": [0.1, 1.0, 0.5], "weight": [1.0, -0.5, 2.0]}]
)
def test_ties_per_tensor_merge_equals_reference_bit_for_bit(torch_only, params):
    """Through the method: the fused choice and the forced reference give the same merge."""
    gen = torch.Generator().manual_seed(13)
    base = {"a": torch.randn(70, 40, generator=gen), "b": torch.randn(500, generator=gen)}
    models = [{n: v + torch.randint(-2, 3, v.shape, generator=gen).float() for n, v in base.items()}]
    models += [{n: v + torch.randn(v.shape, generator=gen) for n, v in base.items()} for _ in range(2)]
    fast = merge_state_dicts(base, models, "ties", params)
    torch_only()
    ref = merge_state_dicts(base, models, "ties", params)
    assert isinstance(fast, dict) and isinstance(ref, dict)
    for k in base:
        assert _same(fast[k], ref[k]), k


@pytest.mark.parametrize("cap", [1, 50, 10_000])
def test_window_gather_counts_and_gathers_exactly(cap):
    gen = torch.Generator().manual_seed(cap)
    row = (torch.randn(20_011, generator=gen) * 3).round() / 4  # heavy ties at the bounds
    row[::13] = -row[::13]
    mag = row.abs()
    for lo, hi in ((0.5, 1.25), (None, 0.75), (1.0, None), (None, None), (2.0, 1.0)):
        lo_t = None if lo is None else torch.tensor(lo)
        hi_t = None if hi is None else torch.tensor(hi)
        below, cand, pos, nan = kernels.window_gather(row, lo_t, hi_t, cap=cap)  # small caps: retried
        inside = torch.ones_like(mag, dtype=torch.bool)
        if lo is not None:
            inside &= mag >= lo
        if hi is not None:
            inside &= mag <= hi
        assert not nan and cand is not None
        assert below == (0 if lo is None else int((mag < lo).sum()))
        assert torch.equal(torch.sort(cand).values, torch.sort(mag[inside]).values)
        assert pos is not None  # the flat indices of the gathered entries, in the row's order
        assert torch.equal(pos, inside.nonzero()[:, 0]) and torch.equal(cand, mag[pos])
    row[17_000] = math.nan
    assert kernels.window_gather(row, torch.tensor(0.5), torch.tensor(1.0), cap=cap)[3]


def test_nth_equal_abs():
    row = torch.tensor([0.5, -1.0, 1.0, 2.0, -1.0, 1.0, 0.0])
    assert [kernels.nth_equal_abs(row, torch.tensor(1.0), k) for k in range(5)] == [1, 2, 4, 5, 7]
    assert kernels.nth_equal_abs(row, torch.tensor(0.0), 0) == 6


@pytest.mark.parametrize("rescale", ["l1", "inverse_keep", "none"])
@pytest.mark.parametrize("normalize", [False, True])
def test_dare_ties_kernel_equals_torch_bit_for_bit(torch_only, rescale, normalize):
    gen = torch.Generator().manual_seed(7)
    base = {"a": torch.randn(64, 33, generator=gen), "b": torch.randn(300, generator=gen)}
    base["a"][0, :5] = -0.0
    models = [{k: v + torch.randn(v.shape, generator=gen) * 0.1 for k, v in base.items()} for _ in range(3)]
    params = {"density": [0.3, 0.5, 1.0], "weight": [1.0, 0.5, -0.25], "lambda": 0.8}
    params |= {"rescale": rescale, "normalize": normalize}
    fast = merge_state_dicts(base, models, "dare_ties", params, seed=3)
    torch_only()
    ref = merge_state_dicts(base, models, "dare_ties", params, seed=3)
    assert isinstance(fast, dict) and isinstance(ref, dict)
    for k in base:
        assert _same(fast[k], ref[k]), k


def test_read_ahead_skips_two_large_jobs_in_a_row(monkeypatch):
    """Two jobs whose inputs together exceed both the read-ahead budget and the largest job are
    not overlapped: the second is read only after the first was consumed (peak = one large job)."""
    monkeypatch.setattr(driver, "PREFETCH_OVERLAP_BYTES", 1000)
    shapes = {"big1": (20, 10), "big2": (20, 10), "s1": (3,), "s2": (3,)}  # 200 * 3 copies * 4 B
    events: list[str] = []

    def reader(name: str, rows: driver.Rows) -> torch.Tensor:
        events.append(f"read {name}")
        return torch.zeros(shapes[name])

    from weightmerge.methods.registry import get_method

    inp = driver.MergeInputs(
        names=["big1", "big2", "s1", "s2"],
        shapes=shapes,
        base=reader,
        models=[reader],
        params_for=lambda _n: {},
        model_params={},
        prefetch=True,
    )
    prefetched_s2 = False
    for name, _rows, _base, _x in driver._iter_loaded(inp, get_method("task_arithmetic"), chunked=False):
        events.append(f"use {name}")
        if name == "s1":  # small jobs are still read ahead: s2's read starts while s1 is in use
            deadline = time.monotonic() + 5.0
            while "read s2" not in events and time.monotonic() < deadline:
                time.sleep(0.005)
            prefetched_s2 = "read s2" in events
    assert events.index("use big1") < events.index("read big2")  # not read ahead while big1 was in use
    assert prefetched_s2


@pytest.mark.parametrize("variant", ["paper", "mergekit"])
@pytest.mark.parametrize(
    "params",
    [
        {"density": 0.2},
        {"density": [0.1, 1.0, 0.5], "weight": [1.0, -0.5, 0.0], "lambda": 0.7},
        {"density": [0.3, 0.3, 0.3], "weight": [2.0, 0.5, 1.0], "normalize": False, "lambda": 1.2},
    ],
)
def test_ties_global_kernel_equals_torch_bit_for_bit(torch_only, variant, params):
    gen = torch.Generator().manual_seed(11)
    base = {"a": torch.randn(70, 40, generator=gen), "b": torch.randn(500, generator=gen)}
    base["a"][0, :5] = -0.0
    models = []
    for k in range(3):  # integer-valued deltas: ties at the global threshold and zero vote sums
        models.append(
            {n: v + torch.randint(-2, 3, v.shape, generator=gen).float() * (k + 1) for n, v in base.items()}
        )
    full = {"variant": variant, "scope": "global", **params}
    fast = merge_state_dicts(base, models, "ties", full)
    torch_only()
    ref = merge_state_dicts(base, models, "ties", full)
    assert isinstance(fast, dict) and isinstance(ref, dict)
    for k in base:
        assert _same(fast[k], ref[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cap", [None, 40, 400])
def test_sample_select_gather_kernel_equals_torch(torch_only, dtype, cap):
    from weightmerge.engine.select import SampleSelect

    gen = torch.Generator().manual_seed(5)
    data = (torch.randn(3, 30_000, generator=gen, dtype=dtype) * 4).round() / 8  # ties at lo and hi
    data[0] = torch.randn(30_000, generator=gen, dtype=dtype)  # no ties: ~1400 values in its window
    data[1] = torch.sort(data[1]).values  # a sorted row: a stratified sample still brackets it
    data[2, :100] = -math.inf
    ranks = torch.tensor([14_999, 14_999, 29_999])

    def run() -> tuple[torch.Tensor, SampleSelect]:
        sel = SampleSelect(3, 30_000, cap=cap)
        for c0 in range(0, 30_000, 7_001):
            sel.add_sample(data[:, c0 : c0 + 7_001])
        sel.set_ranks(ranks)
        for c0 in range(0, 30_000, 7_001):
            sel.add_gather(data[:, c0 : c0 + 7_001])
        counters = (sel.below.clone(), sel.eq_lo.clone(), sel.eq_hi.clone(), list(sel.kept), list(sel.failed))
        return sel.finish(), counters

    fast, fast_counts = run()
    torch_only()
    ref, ref_counts = run()
    assert torch.equal(torch.isnan(fast), torch.isnan(ref))
    assert torch.equal(torch.nan_to_num(fast), torch.nan_to_num(ref))
    for a, b in zip(fast_counts, ref_counts, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    want = torch.sort(data, dim=1).values[torch.arange(3), ranks]
    ok = ~torch.isnan(ref)
    assert torch.equal(ref[ok], want[ok] + 0.0)
    if cap is None:
        assert bool(ok.all())  # room enough: nothing missed
    if cap is not None:
        assert not bool(ok[0])  # a window holding more than cap values fails (the caller falls back)


def test_zero_sign_votes_kernel_equals_torch(torch_only):
    from weightmerge.methods.base import TensorCtx

    gen = torch.Generator().manual_seed(2)
    x = torch.randint(-2, 3, (3, 40, 25), generator=gen).float()  # many zero sums
    x[0, 0, :3] = -0.0
    stats = {ties_mod._thr_key(0.3): torch.tensor([1.0, 2.0, 1.5], dtype=torch.float64)}
    dens = (0.3, 0.3, 1.0)

    def votes() -> torch.Tensor:
        ctx = TensorCtx(name="w", base=None, x=x.clone(), params={}, stats=stats, seed=0, full_shape=(40, 25))
        return ties_mod._zero_sign_votes(ctx, densities=dens, rescale=False)

    fast = votes()
    torch_only()
    ref = votes()
    assert _same(fast, ref)
    assert bool((ref != 0).any()) and bool((ref == 0).any())


@pytest.mark.parametrize(
    ("params", "fused"),
    [
        ({"density": 0.3}, "per_tensor"),
        ({"density": 0.3, "scope": "global"}, "global_scope"),
        ({"density": 0.3, "variant": "paper"}, "global_scope"),
        ({"density": 0.3, "rescale": True}, None),
        ({"density": 0.3, "variant": "paper", "scope": "per_tensor"}, None),
    ],
)
def test_ties_takes_the_fused_path_exactly_where_it_applies(monkeypatch, params, fused):
    """The fused-versus-reference tests above are only worth something if merges really take the
    fused path where it applies (and the reference elsewhere)."""
    calls: list[str] = []
    for fn in ("per_tensor", "global_scope"):
        real = getattr(_ties_fused, fn)
        monkeypatch.setattr(_ties_fused, fn, lambda *a, _f=fn, _r=real, **k: calls.append(_f) or _r(*a, **k))
    gen = torch.Generator().manual_seed(3)
    base = {"a": torch.randn(20, 30, generator=gen), "b": torch.randn(30, generator=gen)}
    models = [{n: v + torch.randn(v.shape, generator=gen) for n, v in base.items()} for _ in range(3)]
    merge_state_dicts(base, models, "ties", params)
    assert calls == ([] if fused is None else [fused] * 2)
    monkeypatch.setenv("WEIGHTMERGE_KERNELS", "0")
    monkeypatch.setattr(kernels, "_module", kernels._module.__wrapped__)  # uncached: reads the variable
    calls.clear()
    merge_state_dicts(base, models, "ties", params)
    assert calls == []


def test_warm_up_compiles_every_kernel_or_reports_them_off(monkeypatch):
    if os.environ.get("WEIGHTMERGE_KERNELS") == "0":
        pytest.skip("WEIGHTMERGE_KERNELS=0 disables the kernels on purpose")
    assert kernels.warm_up()
    monkeypatch.setattr(kernels, "_module", lambda: None)
    assert not kernels.warm_up()


@pytest.mark.slow  # two fresh processes import torch and numba
def test_numba_cache_dir_holds_the_compiled_kernels(tmp_path):
    """NUMBA_CACHE_DIR (docs/engine.md): where an install that cannot write next to its sources
    keeps the compiled kernels; a second process loads them instead of compiling. One small kernel
    stands for all (they share the cache locator: cache=True on each)."""
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    code = "import numpy as np\nfrom weightmerge.kernels import _numba as k\n"
    code += "k.nth_equal_abs(np.zeros(3), 0.0, 0)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    (index,) = [p.name for p in tmp_path.rglob("*.nbi")]
    assert index.startswith("_numba.nth_equal_abs-")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.nbc")}
    assert before
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.nbc")} == before  # loaded, not rewritten
