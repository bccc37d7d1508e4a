"""tsv_m, iso_c, iso_cts: parity with fusion-bench 0.2.33 (a test-only oracle, run in float64),
properties (weights, lambda, non-matrix averaging, float32 vs float64), streamed == in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import require
from weightmerge.api import merge_state_dicts
from weightmerge.methods.iso_cts import subspace_sizes

F64 = torch.float64
# matrices wide, tall and square (k = 9, 7, 8), a vector and a 3-D tensor (averaged)
SHAPES = {"a.wide": (9, 14), "b.tall": (15, 7), "c.sq": (8, 8), "d.bias": (9,), "e.conv": (2, 3, 4)}


def realistic(seed: int, n: int, dtype: torch.dtype = F64, shapes: dict | None = None):
    """Base + task vectors as fine-tuning makes them: a shared low-rank part, a task-specific
    low-rank part and dense noise (so every task vector and every sum is full rank)."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or SHAPES
    base = {k: torch.randn(s, generator=g, dtype=F64) for k, s in shapes.items()}
    shared = {}
    for k, s in shapes.items():
        shared[k] = (
            torch.randn(s[0], 2, generator=g, dtype=F64) @ torch.randn(2, s[1], generator=g, dtype=F64)
            if len(s) == 2
            else torch.randn(s, generator=g, dtype=F64)
        ) * 0.02
    models = []
    for _ in range(n):
        m = {}
        for k, s in shapes.items():
            if len(s) == 2:
                low = torch.randn(s[0], 3, generator=g, dtype=F64) @ torch.randn(
                    3, s[1], generator=g, dtype=F64
                )
                d = shared[k] + 0.05 * low + 0.01 * torch.randn(s, generator=g, dtype=F64)
            else:
                d = shared[k] + 0.03 * torch.randn(s, generator=g, dtype=F64)
            m[k] = (base[k] + d).to(dtype)
        models.append(m)
    return {k: v.to(dtype) for k, v in base.items()}, models


def task_vectors(base: dict, models: list[dict]) -> list[dict]:
    return [{k: m[k] - base[k] for k in base} for m in models]


RTOL, ATOL = 1e-5, 1e-9  # parity with fusion-bench, element-wise (entries are ~1e-2 .. 1)


def assert_rel(got: dict, want: dict, rel: float = 1e-5) -> None:
    """Relative Frobenius error of every tensor at most ``rel``."""
    assert sorted(got) == sorted(want)
    for k in want:
        g, w = got[k].to(F64), want[k].to(F64)
        err = float((g - w).norm() / w.norm())
        assert err <= rel, f"{k}: relative error {err:.3g}"


def assert_parity(got: dict, want: dict) -> None:
    """Element-wise rtol 1e-5 (which implies 1e-5 relative per tensor), keys equal."""
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k].to(F64), want[k].to(F64), rtol=RTOL, atol=ATOL, msg=k)


def merged_tv(base: dict, merged: dict) -> dict:
    return {k: merged[k] - base[k] for k in base}


# ---------------------------------------------------------------------------------------------
# fusion-bench parity (float64)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_tsv_m_matches_fusion_bench(n: int) -> None:
    tsvm = require("fusion_bench.method.task_singular_vector.utils.TSVM_utils")
    base, models = realistic(1 + n, n)
    weights = [1.0, 0.5, 1.5, 0.8][:n]
    lam = 0.7
    got = merge_state_dicts(base, models, "tsv_m", {"weight": weights, "lambda": lam}, compute_dtype=F64)
    tvs = [
        {k: w * v for k, v in tv.items()} for w, tv in zip(weights, task_vectors(base, models), strict=True)
    ]
    want = tsvm.compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")
    assert_parity(merged_tv(base, got), {k: lam * v for k, v in want.items()})


@pytest.mark.parametrize("n", [2, 4])
def test_iso_c_matches_fusion_bench(n: int) -> None:
    iso = require("fusion_bench.method.isotropic_merging.iso_utils")
    base, models = realistic(10 + n, n)
    got = merge_state_dicts(base, models, "iso_c", {"lambda": 1.3}, compute_dtype=F64)
    want = iso.iso_c(task_vectors(base, models), accelerator="cpu")
    assert_parity(merged_tv(base, got), {k: 1.3 * v for k, v in want.items()})


@pytest.mark.parametrize(("n", "frac"), [(2, 0.8), (3, 0.8), (4, 0.5), (3, 1.0)])
def test_iso_cts_matches_fusion_bench(n: int, frac: float) -> None:
    iso = require("fusion_bench.method.isotropic_merging.iso_utils")
    base, models = realistic(20 + n, n)
    got = merge_state_dicts(
        base, models, "iso_cts", {"lambda": 1.5, "common_fraction": frac}, compute_dtype=F64
    )
    want = iso.iso_cts(task_vectors(base, models), common_space_fraction=frac, accelerator="cpu")
    assert_parity(merged_tv(base, got), {k: 1.5 * v for k, v in want.items()})


# ---------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_non_matrices_are_averaged_and_lambda_scales_everything(method: str) -> None:
    base, models = realistic(31, 3)
    one = merge_state_dicts(base, models, method, {"lambda": 1.0}, compute_dtype=F64)
    two = merge_state_dicts(base, models, method, {"lambda": 2.0}, compute_dtype=F64)
    tvs = task_vectors(base, models)
    for k in ("d.bias", "e.conv"):
        want = sum(tv[k] for tv in tvs) / 3
        torch.testing.assert_close(one[k] - base[k], want, rtol=1e-12, atol=1e-14)
    for k in base:
        torch.testing.assert_close(two[k] - base[k], 2 * (one[k] - base[k]), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_float32_compute_is_close_to_float64(method: str) -> None:
    """The SVDs run in float64 either way: float32 compute differs only by input/output rounding."""
    base, models = realistic(41, 3, torch.float32)
    f32 = merge_state_dicts(base, models, method, compute_dtype=torch.float32)
    f64 = merge_state_dicts(base, models, method, compute_dtype=F64)
    assert_rel(merged_tv(base, f32), merged_tv(base, f64), rel=1e-5)


def test_tsv_m_single_task_and_tiny_rank() -> None:
    """One task: r = k, every triplet kept, polar factors are U and V themselves: tau_m = tau.
    A matrix with fewer singular values than tasks (r = 0) keeps the base."""
    base, models = realistic(51, 1)
    out = merge_state_dicts(base, models, "tsv_m", compute_dtype=F64)
    for k in ("a.wide", "b.tall", "c.sq"):
        torch.testing.assert_close(out[k], models[0][k], rtol=1e-12, atol=1e-12)
    shapes = {"thin": (2, 6)}
    base, models = realistic(52, 3, shapes=shapes)
    out = merge_state_dicts(base, models, "tsv_m", compute_dtype=F64)
    assert torch.equal(out["thin"], base["thin"])


def test_iso_c_flattens_the_spectrum() -> None:
    base, models = realistic(61, 3)
    out = merge_state_dicts(base, models, "iso_c", compute_dtype=F64)
    for k in ("a.wide", "b.tall", "c.sq"):
        s_sum = torch.linalg.svdvals(sum(m[k] - base[k] for m in models))
        s_out = torch.linalg.svdvals(out[k] - base[k])
        torch.testing.assert_close(s_out, torch.full_like(s_out, float(s_sum.mean())), rtol=1e-10, atol=0)


def test_iso_cts_subspace_sizes() -> None:
    assert subspace_sizes(k=768, n_tasks=8, common_fraction=0.8) == (616, 19)  # 154/8 -> 19
    assert subspace_sizes(k=10, n_tasks=3, common_fraction=0.8) == (7, 1)  # 2/3 -> 1
    assert subspace_sizes(k=10, n_tasks=4, common_fraction=0.8) == (10, 0)  # 2/4 -> 0 (half to even)
    assert subspace_sizes(k=3, n_tasks=2, common_fraction=0.0) == (1, 1)  # round(1.5) = 2 capped at 1
    for k in range(1, 40):
        for t in range(1, 6):
            c, p = subspace_sizes(k=k, n_tasks=t, common_fraction=0.8)
            assert c >= 0 and p >= 0 and c + t * p == k


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_bad_input_names_the_tensor(method: str) -> None:
    base, models = realistic(71, 2)
    models[1]["b.tall"][3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"b\.tall"):
        merge_state_dicts(base, models, method)


@pytest.mark.parametrize(
    ("method", "params"),
    [("tsv_m", {"lambda": 0.8}), ("iso_c", {"lambda": 1.2}), ("iso_cts", {"common_fraction": 0.5})],
)
def test_stream_equals_in_memory(tmp_path: Path, method: str, params: dict) -> None:
    from test_engine_stream import assert_same, run_case

    got, expected, _ = run_case(tmp_path, method, params, ("sharded", "single", "bin"))
    assert_same(got, expected)
