"""EMR-Merging: the worked example of docs/methods/emr.md, a literal reference (tests/ref_emr.py),
the fusion-bench oracle, properties (reconstruction, order, chunking), bad input."""

from __future__ import annotations

import pytest
import torch

from conftest import require
from ref_emr import emr_state_dicts
from weightmerge.api import merge_state_dicts
from weightmerge.emr.result import EMRResult, EMRTensor
from weightmerge.engine.driver import MergeInputs, run_merge
from weightmerge.methods._params import resolve_params
from weightmerge.methods.registry import get_method

F64 = torch.float64
# docs/methods/emr.md: x = T[:, :6], y = T[:, 6:] of docs/methods/ties.md#worked-example
T_GOLDEN = torch.tensor(
    [
        [0.5, -0.2, 0.1, 0.0, 0.9, -0.4, 0.3, -0.05, 0.2, 0.6],
        [-0.3, -0.1, 0.4, 0.2, 0.8, 0.1, -0.6, 0.05, -0.2, 0.7],
        [0.2, 0.3, -0.5, 0.1, -0.1, -0.3, 0.2, 0.0, 0.4, -0.8],
    ],
    dtype=F64,
)
UNIFIED_X = [0.5, -0.2, -0.5, 0.2, 0.9, -0.4]
UNIFIED_Y = [-0.6, -0.05, 0.4, 0.7]
# M_0 from docs/methods/emr.md; M_1, M_2 by hand: elected signs x [+,-,-,+,+,-], y [-,-,+,+]
MASKS_X = [[1, 1, 0, 0, 1, 1], [0, 1, 0, 1, 1, 0], [1, 0, 1, 1, 0, 1]]
MASKS_Y = [[0, 1, 1, 1], [1, 0, 0, 1], [0, 0, 1, 0]]
RESCALERS = {"per_tensor_mean": [1.026846, 1.3, 1.636364], "global": [1.031746, 1.326923, 1.45]}
SHAPES = {"attn.w": (6, 5), "bias": (7,), "emb": (4, 3, 2), "zz.scale": (3, 3)}


def golden_inputs() -> tuple[dict, list[dict]]:
    # insertion order y, x: the rescalers must not depend on it
    base = {"y": torch.zeros(4, dtype=F64), "x": torch.zeros(6, dtype=F64)}
    return base, [{"y": T_GOLDEN[i, 6:].clone(), "x": T_GOLDEN[i, :6].clone()} for i in range(3)]


def random_models(seed: int, n: int, dtype: torch.dtype = F64, shapes: dict | None = None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or SHAPES
    base = {k: torch.randn(s, generator=g, dtype=F64).to(dtype) for k, s in shapes.items()}
    models = []
    for _ in range(n):
        m = {}
        for j, (k, s) in enumerate(sorted(shapes.items())):
            d = torch.randn(s, generator=g, dtype=F64) * 0.01 * (2**j)
            d = torch.where(torch.rand(s, generator=g) < 0.1, 0.0, d)
            m[k] = (base[k].to(F64) + d).to(dtype)
        models.append(m)
    return base, models


def dyadic_models(seed: int, n: int) -> tuple[dict, list[dict]]:
    """float32 values on a 1/64 grid: every delta, sum and reconstruction is exact in float32, and
    some columns sum to exactly 0 (the zero -> -1 election rule then matters)."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randint(-64, 64, s, generator=g).float() / 64 for k, s in SHAPES.items()}
    models = [
        {k: base[k] + torch.randint(-3, 4, s, generator=g).float() / 64 for k, s in SHAPES.items()}
        for _ in range(n)
    ]
    return base, models


def emr(base, models, *, dtype=torch.float32, **params) -> EMRResult:
    out = merge_state_dicts(base, models, "emr", params, compute_dtype=dtype)
    assert isinstance(out, EMRResult)
    return out


def run_driver(base: dict, models: list[dict], params: dict, *, rows: int | None, dtype=F64):
    """(unified, masks (n, *shape) per tensor, rescalers) through the driver with row-chunking."""
    spec = get_method("emr")
    names = sorted(base)
    resolved = resolve_params(spec, params, len(models))
    pieces: dict[str, list] = {k: [] for k in names}

    def reader(sd):
        return lambda name, r: sd[name] if r is None else sd[name][r[0] : r[1]]

    def emit(name: str, r, out) -> None:
        assert isinstance(out, EMRTensor)
        pieces[name].append((0 if r is None else r[0], out.unified.clone(), out.masks.clone()))

    inp = MergeInputs(
        names=names,
        shapes={k: tuple(base[k].shape) for k in names},
        base=reader(base),
        models=[reader(m) for m in models],
        params_for=lambda _n: resolved,
        model_params=resolved,
        compute_dtype=dtype,
        chunk_rows=lambda _n: rows,
    )
    outcome = run_merge(inp, spec, emit)
    unified, masks = {}, {}
    for k, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        if rows is not None and len(base[k].shape) >= 2 and rows < base[k].shape[0]:
            assert len(parts) > 1, f"{k} was not chunked"
        unified[k] = torch.cat([u for _, u, _ in parts])
        masks[k] = torch.cat([m for _, _, m in parts], dim=1)
    return unified, masks, outcome.extras["rescalers"]


# ---------------------------------------------------------------------------------------------
# The worked example of docs/methods/emr.md


@pytest.mark.parametrize("rescale", ["per_tensor_mean", "global"])
def test_golden(rescale: str) -> None:
    base, models = golden_inputs()
    out = emr(base, models, dtype=F64, rescale=rescale)
    assert out.unified["x"].tolist() == UNIFIED_X
    assert out.unified["y"].tolist() == UNIFIED_Y
    for t in range(3):
        assert out.masks[t]["x"].tolist() == [bool(v) for v in MASKS_X[t]]
        assert out.masks[t]["y"].tolist() == [bool(v) for v in MASKS_Y[t]]
        assert out.masks[t]["x"].dtype == torch.bool
    assert out.rescalers == pytest.approx(RESCALERS[rescale], abs=5e-7)
    assert all(isinstance(r, float) for r in out.rescalers)


@pytest.mark.parametrize("rescale", ["per_tensor_mean", "global"])
def test_reference_reproduces_the_golden(rescale: str) -> None:
    base, models = golden_inputs()
    unified, masks, resc = emr_state_dicts(base, models, rescale=rescale)
    assert unified["x"].tolist() == UNIFIED_X and unified["y"].tolist() == UNIFIED_Y
    assert [m["y"].int().tolist() for m in masks] == MASKS_Y
    assert resc == pytest.approx(RESCALERS[rescale], abs=5e-7)


def test_golden_reconstruction() -> None:
    base, models = golden_inputs()
    out = emr(base, models, dtype=F64)
    rec = out.task_state_dict(0)
    lam = RESCALERS["per_tensor_mean"][0]
    want_x = [lam * u * m for u, m in zip(UNIFIED_X, MASKS_X[0], strict=True)]
    torch.testing.assert_close(rec["x"], torch.tensor(want_x, dtype=F64), atol=1e-6, rtol=0)
    with pytest.raises(IndexError):
        out.task_state_dict(3)


# ---------------------------------------------------------------------------------------------
# Literal reference and the fusion-bench oracle


@pytest.mark.parametrize("rescale", ["per_tensor_mean", "global"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_reference(rescale: str, dtype: torch.dtype) -> None:
    base, models = random_models(3, 4, dtype)
    out = emr(base, models, dtype=dtype, rescale=rescale)
    unified, masks, resc = emr_state_dicts(base, models, rescale=rescale)
    tol = 1e-12 if dtype == F64 else 1e-6
    for k in base:
        torch.testing.assert_close(out.unified[k].to(F64), unified[k], atol=tol, rtol=tol)
        for t in range(4):
            assert torch.equal(out.masks[t][k], masks[t][k]), (k, t)
    assert out.rescalers == pytest.approx(resc, rel=tol)
    assert len(set(out.rescalers)) == 4


@pytest.mark.slow  # imports fusion_bench
def test_matches_fusion_bench() -> None:
    """fusion-bench 0.2.33 ``emr_merge`` (a port of the reference code: per-tensor-mean rescalers,
    accumulated in float32)."""
    utils = require("fusion_bench.method.emr_merging.utils")
    base, models = random_models(5, 4, torch.float32)
    out = emr(base, models)
    task_vectors = [{k: m[k] - base[k] for k in sorted(base)} for m in models]
    unified, masks, rescalers = utils.emr_merge(task_vectors)
    for k in base:
        torch.testing.assert_close(out.unified[k], unified[k], atol=1e-7, rtol=1e-6)
        for t in range(4):
            assert torch.equal(out.masks[t][k], masks[k][t]), (k, t)
    assert out.rescalers == pytest.approx(rescalers.tolist(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("rescale", ["per_tensor_mean", "global"])
def test_identical_experts_reconstruct_exactly(rescale: str) -> None:
    base, models = dyadic_models(7, 1)
    out = emr(base, models * 3, rescale=rescale)
    assert out.rescalers == [1.0, 1.0, 1.0]
    for t in range(3):
        rec = out.task_state_dict(t)
        for k in base:
            assert torch.equal(rec[k], models[0][k]), (t, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_single_task_reconstructs_the_expert(dtype: torch.dtype) -> None:
    base, models = dyadic_models(9, 1)
    out = emr(base, models, dtype=dtype)
    assert out.rescalers == [1.0]
    rec = out.task_state_dict(0)
    for k in base:
        assert torch.equal(rec[k], models[0][k]), k
        assert torch.equal(out.masks[0][k], models[0][k] != base[k])


@pytest.mark.parametrize("rescale", ["per_tensor_mean", "global"])
def test_permuting_models_permutes_masks_and_rescalers(rescale: str) -> None:
    base, models = dyadic_models(11, 4)
    ref = emr(base, models, rescale=rescale)
    perm = [3, 1, 0, 2]
    got = emr(base, [models[i] for i in perm], rescale=rescale)
    assert got.rescalers == pytest.approx([ref.rescalers[i] for i in perm], rel=1e-12)
    for k in base:
        assert torch.equal(got.unified[k], ref.unified[k])
        for j, i in enumerate(perm):
            assert torch.equal(got.masks[j][k], ref.masks[i][k])


@pytest.mark.parametrize("rescale", ["per_tensor_mean", "global"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_chunked_equals_whole_bit_for_bit(rescale: str, dtype: torch.dtype) -> None:
    shapes = {"a": (9, 4), "b": (11,), "c": (5, 2, 3)}
    base, models = random_models(13, 3, dtype, shapes)
    params = {"rescale": rescale}
    u0, m0, r0 = run_driver(base, models, params, rows=None, dtype=dtype)
    for rows in (1, 4):
        u, m, r = run_driver(base, models, params, rows=rows, dtype=dtype)
        assert r == r0
        for k in shapes:
            assert torch.equal(u[k], u0[k]) and torch.equal(m[k], m0[k]), (rows, k)
    api = emr(base, models, dtype=dtype, rescale=rescale)
    assert api.rescalers == r0
    for k in shapes:
        assert torch.equal(api.unified[k], u0[k])


def test_all_zero_task_vectors() -> None:
    base, _ = random_models(17, 1, torch.float32)
    out = emr(base, [dict(base), dict(base)])
    assert out.rescalers == [1.0, 1.0]
    for t in range(2):
        rec = out.task_state_dict(t)
        for k in base:
            assert not out.masks[t][k].any()
            assert torch.equal(rec[k], base[k])
            assert bool(torch.isfinite(out.unified[k]).all())


def test_a_task_that_agrees_nowhere_gets_rescaler_one_and_reconstructs_the_base() -> None:
    base = {"w": torch.zeros(5)}
    models = [{"w": torch.full((5,), 0.25)}, {"w": torch.full((5,), -1.0)}]
    for rescale in ("per_tensor_mean", "global"):
        out = emr(base, models, rescale=rescale)
        assert out.rescalers == [1.0, 1.0]  # task 0: denominator 0; task 1: 1.0 / 1.0
        assert torch.equal(out.task_state_dict(0)["w"], base["w"])
        assert torch.equal(out.task_state_dict(1)["w"], models[1]["w"])


def test_bf16_in_bf16_out() -> None:
    base, models = random_models(19, 3, torch.bfloat16)
    out = emr(base, models)
    assert all(u.dtype == torch.float32 for u in out.unified.values())  # the compute dtype
    unified, _, resc = emr_state_dicts(base, models, rescale="per_tensor_mean")
    assert out.rescalers == pytest.approx(resc, rel=1e-6)
    for t in range(3):
        rec = out.task_state_dict(t)
        for k in base:
            assert rec[k].dtype == torch.bfloat16
            want = base[k].to(F64) + resc[t] * out.masks[t][k] * unified[k]
            torch.testing.assert_close(rec[k].to(F64), want, atol=0.02, rtol=0.01)


def test_copied_tensors_pass_through() -> None:
    base, models = random_models(23, 2, torch.float32)
    base["step"] = torch.tensor(3)
    for m in models:
        m["step"] = torch.tensor(3)
    out = emr(base, models, exclude=["^bias$"])
    assert "bias" not in out.unified and "step" not in out.unified
    rec = out.task_state_dict(1)
    assert torch.equal(rec["bias"], base["bias"]) and torch.equal(rec["step"], base["step"])


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input() -> None:
    base, models = random_models(29, 2, torch.float32)
    with pytest.raises(ValueError, match=r"did you mean 'global'"):
        emr(base, models, rescale="globl")
    with pytest.raises(ValueError, match=r"unknown parameter 'lambda'"):
        emr(base, models, **{"lambda": 0.5})
    with pytest.raises(ValueError, match="needs a base"):
        merge_state_dicts(None, models, "emr")
    models[0]["emb"] = models[0]["emb"].clone()
    models[0]["emb"][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="'emb'"):
        emr(base, models)
