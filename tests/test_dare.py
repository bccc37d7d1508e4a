"""dare_linear / dare_ties: a literal reference built on the seeded draws, hand-computed cases,
statistical and determinism properties, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_ties import run_chunked
from weightmerge.api import merge_state_dicts
from weightmerge.methods._params import resolve_params
from weightmerge.methods._random import uniform
from weightmerge.methods.registry import get_method

F64 = torch.float64
METHODS = ["dare_linear", "dare_ties"]


def merge(base, models, method, params, seed=0, dtype=torch.float32):
    return merge_state_dicts(base, models, method, params, seed=seed, compute_dtype=dtype)


def random_sds(seed, shapes, n, dtype=torch.float32, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}
    models = [
        {k: v + scale * torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in base.items()}
        for _ in range(n)
    ]
    return base, models


def ref_dare(base, models, method, *, seed, weights, densities, lam=1.0, normalize=False, rescale="l1"):
    """Literal float64 reference, element by element, from docs/methods/dare.md and the draws' contract:
    entry j of tensor `name` of model i is kept iff uniform(seed, name, i, 0, N, N)[j] < density_i."""
    out = {}
    for name in sorted(base):
        b = base[name].to(F64).reshape(-1)
        N = b.numel()
        deltas = []
        for i, m in enumerate(models):
            d = m[name].to(F64).reshape(-1) - b
            if densities[i] < 1:
                u = uniform(seed, name, i, 0, N, N)
                kept = torch.tensor(
                    [d[j].item() if u[j] < densities[i] else 0.0 for j in range(N)], dtype=F64
                )
                if rescale == "l1":
                    before, after = d.abs().sum().item(), kept.abs().sum().item()
                    if before >= 1e-7 and after >= 1e-7:
                        kept = kept * (before / after)
                elif rescale == "inverse_keep":
                    kept = kept / densities[i]
                d = kept
            deltas.append(weights[i] * d)
        mixed = torch.zeros(N, dtype=F64)
        for j in range(N):
            vals = [dl[j].item() for dl in deltas]
            if method == "dare_linear":
                total, div = sum(vals), sum(weights)
                div = div if abs(div) >= 1e-8 else 1.0
            else:
                sign = 1.0 if sum(vals) >= 0 else -1.0
                agree = [i for i, v in enumerate(vals) if v * sign > 0]
                total = sum(vals[i] for i in agree)
                div = sum(weights[i] for i in agree) or 1.0
            mixed[j] = total / div if normalize else total
        out[name] = (b + lam * mixed).reshape(base[name].shape)
    return out


SHAPES = {"w": (9, 7), "b": (7,), "s": (), "v": (2, 3, 4)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rescale", ["l1", "inverse_keep", "none"])
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_literal_reference(method, rescale, normalize):
    base, models = random_sds(11, SHAPES, n=3, dtype=F64)
    kw = {"weights": [0.6, 1.2, 0.9], "densities": [0.3, 0.7, 1.0], "lam": 0.8}
    params = {
        "weight": kw["weights"],
        "density": kw["densities"],
        "lambda": 0.8,
        "normalize": normalize,
        "rescale": rescale,
    }
    ref = ref_dare(base, models, method, seed=5, normalize=normalize, rescale=rescale, **kw)
    out = merge(base, models, method, params, seed=5, dtype=F64)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=1e-12)


def test_density_one_hand_computed():
    base = {"t": torch.tensor([1.0, 1.0, 1.0], dtype=F64)}
    models = [
        {"t": torch.tensor([2.0, 0.0, 1.5], dtype=F64)},
        {"t": torch.tensor([0.5, 3.0, 1.0], dtype=F64)},
    ]
    # deltas [1, -1, 0.5] and [-0.5, 2, 0]; weights 2 and 1
    lin = merge(base, models, "dare_linear", {"weight": [2.0, 1.0]}, dtype=F64)
    assert lin["t"].tolist() == [1 + 1.5, 1 + 0.0, 1 + 1.0]
    lin = merge(
        base, models, "dare_linear", {"weight": [2.0, 1.0], "normalize": True, "lambda": 0.5}, dtype=F64
    )
    torch.testing.assert_close(
        lin["t"], torch.tensor([1 + 0.25, 1.0, 1 + 1 / 6], dtype=F64), rtol=0, atol=1e-15
    )
    # consensus of weighted deltas [2, -2, 1] and [-0.5, 2, 0]: signs +, + (sum 0 -> +), +
    ties = merge(base, models, "dare_ties", {"weight": [2.0, 1.0]}, dtype=F64)
    assert ties["t"].tolist() == [1 + 2.0, 1 + 2.0, 1 + 1.0]
    ties = merge(base, models, "dare_ties", {"weight": [2.0, 1.0], "normalize": True}, dtype=F64)
    assert ties["t"].tolist() == [1 + 1.0, 1 + 2.0, 1 + 0.5]


def test_l1_rescale_hand_computed():
    """One model; find which entries the seed keeps, then check the L1-matching factor by hand."""
    base = {"t": torch.zeros(8, dtype=F64)}
    delta = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0], dtype=F64)
    keep = uniform(0, "t", 0, 0, 8, 8) < 0.5
    assert 0 < int(keep.sum()) < 8  # this seed drops some and keeps some
    factor = 36.0 / delta[keep].abs().sum().item()
    out = merge(base, [{"t": delta}], "dare_linear", {"density": 0.5}, dtype=F64)
    expected = torch.where(keep, delta * factor, torch.zeros_like(delta))
    torch.testing.assert_close(out["t"], expected, rtol=0, atol=1e-14)
    out = merge(base, [{"t": delta}], "dare_linear", {"density": 0.5, "rescale": "inverse_keep"}, dtype=F64)
    torch.testing.assert_close(out["t"], torch.where(keep, delta * 2, 0.0), rtol=0, atol=0)
    out = merge(base, [{"t": delta}], "dare_linear", {"density": 0.5, "rescale": "none"}, dtype=F64)
    torch.testing.assert_close(out["t"], torch.where(keep, delta, 0.0), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_bits_whatever_the_tensor_order_or_set(method):
    base, models = random_sds(12, SHAPES, n=3)
    params = {"density": [0.3, 0.5, 0.9], "weight": [1.0, 0.5, 2.0]}
    a = merge(base, models, method, params, seed=42)
    rev = [dict(reversed(list(m.items()))) for m in [base, *models]]
    b = merge(rev[0], rev[1:], method, params, seed=42)
    only_w = merge({"w": base["w"]}, [{"w": m["w"]} for m in models], method, params, seed=42)
    for k in base:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(a["w"], only_w["w"])


@pytest.mark.parametrize("method", METHODS)
def test_different_seed_or_model_index_gives_different_masks(method):
    base = {"t": torch.zeros(200)}
    expert = {"t": torch.ones(200)}
    a = merge(base, [expert], method, {"density": 0.5, "rescale": "none"}, seed=1)
    b = merge(base, [expert], method, {"density": 0.5, "rescale": "none"}, seed=2)
    assert not torch.equal(a["t"], b["t"])
    # two identical experts draw different masks (seeded by model index): the sum is not 2x one mask
    two = merge(base, [expert, expert], method, {"density": 0.5, "rescale": "none"}, seed=1)
    assert set(two["t"].unique().tolist()) == {0.0, 1.0, 2.0}


def test_kept_fraction_is_density():
    base = {"t": torch.zeros(100_000)}
    out = merge(
        base, [{"t": torch.ones(100_000)}], "dare_linear", {"density": 0.3, "rescale": "none"}, seed=3
    )
    frac = out["t"].mean().item()
    assert abs(frac - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 100_000)


def test_inverse_keep_is_unbiased_over_seeds():
    """E[keep * delta / p] = delta: the mean over S seeds is within 5 standard errors everywhere."""
    base = {"t": torch.zeros(64, dtype=F64)}
    delta = torch.linspace(-1, 1, 64, dtype=F64)
    p, S = 0.4, 1500
    total = torch.zeros(64, dtype=F64)
    for seed in range(S):
        total += merge(
            base,
            [{"t": delta}],
            "dare_linear",
            {"density": p, "rescale": "inverse_keep"},
            seed=seed,
            dtype=F64,
        )["t"]
    mean = total / S
    stderr = delta.abs() * math.sqrt((1 - p) / p / S)
    assert bool(((mean - delta).abs() <= 5 * stderr + 1e-12).all())
    # and it really is random: a single draw is far from delta
    assert not torch.allclose(merge(base, [{"t": delta}], "dare_linear", {"density": p})["t"].to(F64), delta)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rescale", ["inverse_keep", "none"])
def test_row_chunked_equals_whole(method, rescale):
    base, models = random_sds(13, {"w": (11, 5), "v": (7, 2, 3), "b": (4,)}, n=3)
    params = {"density": [0.3, 0.6, 1.0], "rescale": rescale, "weight": [1.0, 0.7, 0.2]}
    whole = merge(base, models, method, params, seed=9)
    chunked, pieces = run_chunked(base, models, method, params, rows=2, seed=9)
    assert pieces > 3
    for k in base:
        assert torch.equal(whole[k], chunked[k]), k


@pytest.mark.parametrize("method", METHODS)
def test_l1_rescale_is_not_chunked(method):
    spec = get_method(method)
    assert not spec.is_row_chunkable(resolve_params(spec, {}, 2))
    assert spec.is_row_chunkable(resolve_params(spec, {"rescale": "inverse_keep"}, 2))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), method=st.sampled_from(METHODS))
def test_identical_experts_at_density_one_give_the_expert(seed, n, method):
    base, (expert,) = random_sds(seed, {"w": (5, 4), "b": (3,)}, n=1)
    out = merge(base, [expert] * n, method, {"density": 1.0, "normalize": True})
    for k in base:
        torch.testing.assert_close(out[k], expert[k], rtol=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), method=st.sampled_from(METHODS), normalize=st.booleans())
def test_order_invariance_at_density_one(seed, method, normalize):
    base, models = random_sds(seed, {"w": (4, 3), "s": ()}, n=3)
    w = [0.3, 1.1, 0.7]
    perm = [2, 0, 1]
    a = merge(base, models, method, {"weight": w, "normalize": normalize})
    b = merge(
        base, [models[i] for i in perm], method, {"weight": [w[i] for i in perm], "normalize": normalize}
    )
    for k in base:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_in_bf16_out(method):
    base, models = random_sds(14, {"w": (6, 6)}, n=2, dtype=torch.bfloat16)
    out = merge(base, models, method, {"density": 0.5}, seed=1)
    assert out["w"].dtype == torch.bfloat16
    ref = merge(
        {k: v.float() for k, v in base.items()},
        [{k: v.float() for k, v in m.items()} for m in models],
        method,
        {"density": 0.5},
        seed=1,
    )
    assert torch.equal(out["w"], ref["w"].to(torch.bfloat16))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rescale", ["l1", "inverse_keep", "none"])
def test_all_zero_task_vectors_give_base(method, rescale):
    base, _ = random_sds(15, {"w": (4, 3), "s": ()}, n=0)
    out = merge(base, [base, base], method, {"density": 0.2, "rescale": rescale, "normalize": True})
    for k in base:
        assert torch.isfinite(out[k]).all()
        assert torch.equal(out[k], base[k])


# ---------------------------------------------------------------------------------------------
# Bad input


def _two():
    return {"t": torch.zeros(2)}, [{"t": torch.ones(2)}, {"t": torch.ones(2)}]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("density", [0.0, -1.0, 1.01])
def test_density_outside_unit_interval(method, density):
    with pytest.raises(ValueError, match=r"'density'.*\(0, 1\]"):
        merge(*_two(), method, {"density": density})


@pytest.mark.parametrize("method", METHODS)
def test_bad_lists_and_choices(method):
    with pytest.raises(ValueError, match=r"'density'.*3 values.*2 models"):
        merge(*_two(), method, {"density": [0.5, 0.5, 0.5]})
    with pytest.raises(ValueError, match=r"did you mean 'inverse_keep'"):
        merge(*_two(), method, {"rescale": "inverse-keep"})
    with pytest.raises(TypeError, match="'weight'"):
        merge(*_two(), method, {"weight": "1"})
