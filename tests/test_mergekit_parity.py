"""Parity with mergekit 0.1.5 (`mergekit.merge_methods.api`), the oracle for mergekit-named methods.

mergekit is an optional test oracle (`scripts/setup.sh --test` installs it with --no-deps).
Conventions: `merge_tensors([base, m1, ..., mn], method, parameters=..., base_index=0)`; per-input
parameters of the task-arithmetic family are sequences over the *non-base* inputs; `linear` takes
one weight per input and no base. mergekit runs task-arithmetic methods in the promoted input
dtype unless `dtype=` is given, so the strict comparison calls it with `dtype=torch.float32` and
`out_dtype=<input dtype>` (what weightmerge does: fp32 arithmetic, cast back); a second, looser
comparison checks mergekit's native half-precision arithmetic.

Largest differences measured (torch 2.13 CPU, mergekit 0.1.5): 0.0 against fp32-mode mergekit for
every task-arithmetic-family method, shape and dtype below (bit-identical), 1 ulp for `linear` on
the tie-free inputs (summation order: 4.8e-7 in fp32, 0.0039 in bf16; 2 ulp, 9.5e-7, on random
normal fp32 inputs, see scripts/parity_report.py); against native bf16/fp16 mergekit at most
0.96 * eps(dtype) * max|output| (e.g. 0.0625 for bf16 dare_ties, 0.0234 for bf16 ties), from
mergekit rounding its intermediates to half precision.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mergekit")
from mergekit.merge_methods.api import merge_state_dicts as mk_merge_state_dicts
from mergekit.merge_methods.api import merge_tensors

from weightmerge.api import merge_state_dicts

SHAPES = [(), (7,), (5, 6), (2, 3, 4), (8, 16)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
N = 3
W = [0.7, 1.3, 0.4]

CASES = [
    ("task_arithmetic", {"weight": W, "lambda": 0.6}),
    ("task_arithmetic", {"weight": W, "normalize": True}),
    ("ties", {"weight": W, "density": [0.3, 0.5, 0.9]}),
    ("ties", {"weight": 1.0, "density": 0.2}),
    ("ties", {"weight": [0.7, -0.5, 1.1], "density": 0.5, "normalize": False, "lambda": 0.8}),
    ("ties", {"weight": W, "density": [0.25, 0.6, 1.0], "rescale": True}),
    ("ties", {"weight": W}),  # density 1: no trim
    ("dare_linear", {"weight": W, "density": 1.0}),
    ("dare_linear", {"weight": W, "density": 1.0, "normalize": True, "lambda": 1.5}),
    ("dare_ties", {"weight": W, "density": 1.0}),
    ("dare_ties", {"weight": [0.7, -0.5, 1.1], "density": 1.0, "normalize": True}),
]


def tie_free_inputs(shape, dtype, seed):
    """Base and N models whose task vectors have pairwise distinct magnitudes within each model,
    all exactly representable in bf16 and fp16 (multiples of 1/64 with at most 8 significant
    bits), so trimming has no ties to break and both sides see the same deltas."""
    gen = torch.Generator().manual_seed(seed)
    numel = int(torch.tensor(shape).prod()) if shape else 1
    assert numel <= 128
    base = (torch.randint(-64, 65, shape, generator=gen) / 64).to(dtype)
    models = []
    for _ in range(N):
        mag = (torch.randperm(numel, generator=gen) + 1).reshape(shape) / 64
        sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
        models.append((base.float() + sign * mag).to(dtype))
    return base, models


def ours(base, models, method, params):
    if method == "linear":
        return merge_state_dicts(None, [{"t": m} for m in models], method, params)["t"]
    return merge_state_dicts({"t": base}, [{"t": m} for m in models], method, params)["t"]


def theirs(base, models, method, params, *, dtype=None, out_dtype=None):
    if method == "linear":
        return merge_tensors(models, method, parameters=params, dtype=dtype, out_dtype=out_dtype)
    return merge_tensors(
        [base, *models], method, parameters=params, base_index=0, dtype=dtype, out_dtype=out_dtype
    )


def ulp_bound(dtype, ref, ulps):
    return ulps * torch.finfo(dtype).eps * max(1.0, float(ref.float().abs().max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("method", "params"), [*CASES, ("linear", {"weight": W}), ("linear", {"weight": W, "normalize": False})]
)
def test_parity_tie_free(method, params, shape, dtype):
    base, models = tie_free_inputs(shape, dtype, seed=len(shape) * 10 + DTYPES.index(dtype))
    got = ours(base, models, method, params)
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    strict = theirs(base, models, method, params, dtype=torch.float32, out_dtype=dtype)
    if method == "linear":  # mergekit accumulates with addcmul_ in input order: 1-ulp differences
        assert float((got.float() - strict.float()).abs().max()) <= ulp_bound(dtype, strict, 1)
    else:
        torch.testing.assert_close(got, strict, rtol=0, atol=0)
    native = theirs(base, models, method, params)
    assert native.dtype == dtype
    diff = float((got.float() - native.float()).abs().max()) if got.numel() else 0.0
    assert diff <= ulp_bound(dtype, native, 2), (method, diff)


@pytest.mark.parametrize("shape", [(64, 33), (3, 50, 7), (1000,)])
@pytest.mark.parametrize(("method", "params"), CASES)
def test_parity_random_normal_fp32(method, params, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=gen)
    models = [base + 0.01 * torch.randn(shape, generator=gen) for _ in range(N)]
    got = ours(base, models, method, params)
    torch.testing.assert_close(got, theirs(base, models, method, params), rtol=0, atol=0)


def test_parity_whole_state_dicts_with_a_buffer():
    gen = torch.Generator().manual_seed(1)
    shapes = {"a.weight": (6, 5), "a.bias": (5,), "b.scale": ()}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    base["pos_ids"] = torch.arange(4)
    models = []
    for _ in range(N):
        m = {
            k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items() if v.is_floating_point()
        }
        m["pos_ids"] = torch.arange(4)
        models.append(m)
    params = {"weight": W, "density": 0.4, "lambda": 0.9}
    got = merge_state_dicts(base, models, "ties", params)
    ref = mk_merge_state_dicts(
        {"base": base, **{f"m{i}": m for i, m in enumerate(models)}}, "ties", parameters=params, base="base"
    )
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_default_density_is_mergekits():
    """mergekit 0.1.5's task-arithmetic family defaults density to 1.0 (no trim); so do we."""
    base, models = tie_free_inputs((5, 6), torch.float32, seed=3)
    for method in ("ties", "dare_ties", "dare_linear"):
        got = ours(base, models, method, {"weight": W})
        torch.testing.assert_close(got, theirs(base, models, method, {"weight": W}), rtol=0, atol=0)
