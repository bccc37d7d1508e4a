"""breadcrumbs(_ties), della(_linear), model_stock, slerp, nearswap, passthrough: hand-computed
cases, literal references, properties, chunking, bad input, and parity with mergekit 0.1.5.

Parity: `merge_tensors([base, m1, ...], method, parameters=..., base_index=0)` on random float32
tensors; weightmerge computes in float32 like mergekit does for float32 inputs, and the results are
bit-identical. DELLA's draws are replayed into mergekit by replacing `torch.bernoulli` with our
seeded uniforms (u < p), which makes the comparison exact too.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import require
from test_ties import run_chunked
from weightmerge.api import merge_state_dicts
from weightmerge.methods._random import uniform
from weightmerge.methods.della import della_keep_probability

F64 = torch.float64
T = torch.tensor


def ours(base, models, method, params, *, seed=0, dtype=None):
    """Merge one tensor "t"; computes in float64 for float64 inputs, else float32."""
    b = None if base is None else {"t": base}
    dtype = dtype or (F64 if models[0].dtype == F64 else torch.float32)
    return merge_state_dicts(b, [{"t": m} for m in models], method, params, seed=seed, compute_dtype=dtype)[
        "t"
    ]


def random_case(shape, n, *, seed, dtype=torch.float32, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    return base, [base + scale * torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


# ================================================================ breadcrumbs

DELTA10 = [0.1, -0.5, 0.3, 0.9, -0.2, 0.05, 0.7, -0.4, 0.6, 0.8]


def test_breadcrumbs_hand_computed_trim():
    # N = 10, density .5, gamma .2: t = 5, n_top = 2, n_bot = 3 -> keep ascending ranks 3..7:
    # |.| = .3 .4 .5 .6 .7 (indices 2, 7, 1, 8, 6); the two largest (.9, .8) and three smallest go.
    out = ours(
        torch.zeros(10, dtype=F64), [T(DELTA10, dtype=F64)], "breadcrumbs", {"density": 0.5, "gamma": 0.2}
    )
    want = T([0, -0.5, 0.3, 0, 0, 0, 0.7, -0.4, 0.6, 0], dtype=F64)
    assert torch.equal(out, want)
    # rescale: L1 4.55 before, 2.5 after
    out = ours(
        torch.zeros(10, dtype=F64),
        [T(DELTA10, dtype=F64)],
        "breadcrumbs",
        {"density": 0.5, "gamma": 0.2, "rescale": True},
        dtype=F64,
    )
    torch.testing.assert_close(out, want * (4.55 / 2.5), rtol=1e-14, atol=0)


def test_breadcrumbs_outlier_cut_shrinks_to_keep_density():
    # density .9, gamma .3: t = 9, n_top = 3, n_bot = max(0, 10 - 12) = 0 -> keep the 9 smallest
    out = ours(
        torch.zeros(10, dtype=F64), [T(DELTA10, dtype=F64)], "breadcrumbs", {"density": 0.9, "gamma": 0.3}
    )
    want = T(DELTA10, dtype=F64)
    want[3] = 0.0
    assert torch.equal(out, want)
    # density 1: untouched even with gamma; density 0: nothing kept
    d = T(DELTA10, dtype=F64)
    assert torch.equal(
        ours(torch.zeros(10, dtype=F64), [d], "breadcrumbs", {"density": 1.0, "gamma": 0.5}), d
    )
    zero = ours(torch.zeros(10, dtype=F64), [d], "breadcrumbs", {"density": 0.0})
    assert torch.equal(zero, torch.zeros(10, dtype=F64))


def test_breadcrumbs_ties_hand_computed():
    # N = 4, density .5, gamma .25: t = 2, n_top = 1, n_bot = 1 -> keep ascending ranks 1, 2
    d1 = T([1.0, -2.0, 3.0, -4.0], dtype=F64)  # keeps -2, 3
    d2 = T([-1.0, 2.0, 2.5, 4.0], dtype=F64)  # keeps 2, 2.5
    base = T([10.0, 20.0, 30.0, 40.0], dtype=F64)
    p = {"density": 0.5, "gamma": 0.25}
    # sum of trimmed = [0, 0, 5.5, 0]: elected +1 everywhere (a zero sum elects +1);
    # agreeing: model 1 only at 2 (3); model 2 at 1 (2) and 2 (2.5)
    out = ours(base, [base + d1, base + d2], "breadcrumbs_ties", p, dtype=F64)
    torch.testing.assert_close(out, base + T([0.0, 2.0, 5.5, 0.0], dtype=F64), rtol=0, atol=1e-13)
    out = ours(base, [base + d1, base + d2], "breadcrumbs_ties", {**p, "normalize": True}, dtype=F64)
    torch.testing.assert_close(out, base + T([0.0, 2.0, 2.75, 0.0], dtype=F64), rtol=0, atol=1e-13)
    # plain breadcrumbs sums both trimmed vectors, lambda scales the sum
    out = ours(base, [base + d1, base + d2], "breadcrumbs", {**p, "lambda": 0.5}, dtype=F64)
    torch.testing.assert_close(out, base + 0.5 * T([0.0, 0.0, 5.5, 0.0], dtype=F64), rtol=0, atol=1e-13)


def ref_breadcrumbs(base, models, *, weights, densities, gammas, ties, normalize=False, lam=1.0):
    """Literal float64 reference from spec section 6 (python lists and sorted())."""
    b = base.to(F64).reshape(-1).tolist()
    n_el = len(b)
    trimmed = []
    for m, d, g in zip(models, densities, gammas, strict=True):
        delta = [x - y for x, y in zip(m.to(F64).reshape(-1).tolist(), b, strict=True)]
        if d < 1:
            t, n_top = int(d * n_el), int(g * n_el)
            n_bot = max(0, n_el - t - n_top)
            order = sorted(range(n_el), key=lambda j: (abs(delta[j]), j))
            kept = set(order[n_bot : n_bot + t])
            delta = [v if j in kept else 0.0 for j, v in enumerate(delta)]
        trimmed.append(delta)
    out = []
    for j in range(n_el):
        vals = [w * tr[j] for w, tr in zip(weights, trimmed, strict=True)]
        if ties:
            sign = 1.0 if sum(vals) >= 0 else -1.0
            agree = [v * sign > 0 for v in vals]
            mixed = sum(v for v, a in zip(vals, agree, strict=True) if a)
            div = sum(w for w, a in zip(weights, agree, strict=True) if a) or 1.0
        else:
            mixed = sum(vals)
            div = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        out.append(b[j] + lam * (mixed / div if normalize else mixed))
    return torch.tensor(out, dtype=F64).reshape(base.shape)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs_matches_literal_reference(method, normalize):
    base, models = random_case((6, 9), 3, seed=1, dtype=F64)
    p = {"weight": [0.7, -0.4, 1.2], "density": [0.3, 0.55, 1.0], "gamma": [0.05, 0.1, 0.0], "lambda": 0.8}
    got = ours(base, models, method, {**p, "normalize": normalize}, dtype=F64)
    want = ref_breadcrumbs(
        base,
        models,
        weights=p["weight"],
        densities=p["density"],
        gammas=p["gamma"],
        ties=method == "breadcrumbs_ties",
        normalize=normalize,
        lam=0.8,
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear"])
def test_identical_models_give_the_base(method):
    base, _ = random_case((5, 4), 1, seed=2)
    p = {"density": 0.5, "epsilon": 0.1} if "della" in method else {"density": 0.5, "gamma": 0.1}
    out = ours(base, [base.clone(), base.clone()], method, p)
    assert torch.equal(out, base)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_model_order_invariance(method):
    base, models = random_case((7, 5), 3, seed=3, dtype=F64)
    p = {"weight": [0.5, 1.0, 2.0], "density": [0.4, 0.6, 0.8], "gamma": [0.1, 0.0, 0.05], "normalize": True}
    perm = [2, 0, 1]
    q = {k: [v[i] for i in perm] if isinstance(v, list) else v for k, v in p.items()}
    a = ours(base, models, method, p, dtype=F64)
    b = ours(base, [models[i] for i in perm], method, q, dtype=F64)
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


# ================================================================ della


def test_della_keep_probability_hand_computed():
    # |.| = [.3, .1, .2] -> ranks [2, 0, 1], m = 3 -> rank_norm [1, 0, .5]; d .5, e .1
    p = della_keep_probability(T([-0.3, 0.1, 0.2], dtype=F64), density=0.5, epsilon=0.1)
    torch.testing.assert_close(p, T([0.6, 0.4, 0.5], dtype=F64), rtol=0, atol=1e-15)
    # 2-D: each row ranked on its own
    p = della_keep_probability(T([[1.0, 3.0, 2.0], [-5.0, 4.0, 6.0]], dtype=F64), density=0.5, epsilon=0.2)
    torch.testing.assert_close(p, T([[0.3, 0.7, 0.5], [0.5, 0.3, 0.7]], dtype=F64), rtol=0, atol=1e-15)
    # rows of one element: rank_norm 1/2 -> p = density (mergekit gives NaN there)
    p = della_keep_probability(T([[2.0], [3.0]], dtype=F64), density=0.4, epsilon=0.1)
    torch.testing.assert_close(p, T([[0.4], [0.4]], dtype=F64), rtol=0, atol=1e-15)


def ref_della(base, models, *, seed, name, weights, densities, epsilons, ties, normalize, rescale, mode="l1"):
    """Literal float64 reference from spec section 7 with our seeded draws (keep iff u < p)."""
    shape = base.shape
    rows_shape = shape if len(shape) >= 2 else (1, max(1, base.numel()))
    n_el = base.numel()
    b = base.to(F64).reshape(-1).tolist()
    processed = []
    for i, (m, d, e) in enumerate(zip(models, densities, epsilons, strict=True)):
        delta = [x - y for x, y in zip(m.to(F64).reshape(-1).tolist(), b, strict=True)]
        if d < 1:
            u = uniform(seed, name, i, 0, n_el, n_el).tolist()
            idx = torch.arange(n_el).reshape(rows_shape)  # flat index of each element
            prob = [0.0] * n_el
            m_len = rows_shape[1]
            for line in idx.movedim(1, -1).reshape(-1, m_len).tolist():  # every vector along dim 1
                order = sorted(line, key=lambda j: (abs(delta[j]), line.index(j)))
                for r, j in enumerate(order):
                    prob[j] = (d - e) + 2 * e * (r / (m_len - 1) if m_len > 1 else 0.5)
            kept = [delta[j] if u[j] < prob[j] else 0.0 for j in range(n_el)]
            if rescale and mode == "inverse_keep":
                kept = [kept[j] / prob[j] for j in range(n_el)]
            elif rescale:
                before, after = sum(abs(v) for v in delta), sum(abs(v) for v in kept)
                if before >= 1e-7 and after >= 1e-7:
                    kept = [v * before / after for v in kept]
            delta = kept
        processed.append(delta)
    out = []
    for j in range(n_el):
        vals = [w * p[j] for w, p in zip(weights, processed, strict=True)]
        if ties:
            sign = 1.0 if sum(vals) >= 0 else -1.0
            agree = [v * sign > 0 for v in vals]
            mixed = sum(v for v, a in zip(vals, agree, strict=True) if a)
            div = sum(w for w, a in zip(weights, agree, strict=True) if a) or 1.0
        else:
            mixed = sum(vals)
            div = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        out.append(b[j] + (mixed / div if normalize else mixed))
    return torch.tensor(out, dtype=F64).reshape(shape)


@pytest.mark.parametrize(
    ("method", "shape", "rescale", "mode"),
    [
        ("della", (6, 8), True, "l1"),
        ("della", (11,), True, "inverse_keep"),
        ("della_linear", (3, 4, 5), False, "l1"),
        ("della_linear", (6, 8), True, "inverse_keep"),
    ],
)
def test_della_matches_literal_reference(method, shape, rescale, mode):
    base, models = random_case(shape, 3, seed=4, dtype=F64)
    p = {"weight": [0.6, 1.1, -0.3], "density": [0.4, 0.7, 0.5], "epsilon": [0.1, 0.2, 0.05]}
    got = ours(base, models, method, {**p, "rescale": rescale, "rescale_mode": mode}, seed=5, dtype=F64)
    want = ref_della(
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
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_della_keep_rates_follow_magnitude_ranks():
    # one model, base 0, no rescale: the output's non-zeros are the kept entries
    n_el = 200_000
    g = torch.Generator().manual_seed(6)
    delta = torch.randn(n_el, generator=g) + 0.0
    out = ours(torch.zeros(n_el), [delta], "della_linear", {"density": 0.4, "epsilon": 0.2, "rescale": False})
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.4) < 0.005
    order = torch.argsort(delta.abs())
    low, high = (
        kept[order[: n_el // 10]].float().mean().item(),
        kept[order[-n_el // 10 :]].float().mean().item(),
    )
    # p rises linearly from 0.2 to 0.6 with the rank: deciles average 0.22 and 0.58
    assert abs(low - 0.22) < 0.01
    assert abs(high - 0.58) < 0.01
    assert torch.equal(out[kept], delta[kept])


def test_della_seeded_and_deterministic():
    base, models = random_case((8, 8), 2, seed=7)
    p = {"density": 0.5, "epsilon": 0.1}
    a = ours(base, models, "della", p, seed=1)
    assert torch.equal(a, ours(base, models, "della", p, seed=1))
    assert not torch.equal(a, ours(base, models, "della", p, seed=2))


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("params", [{"rescale": False}, {"rescale": True, "rescale_mode": "inverse_keep"}])
def test_della_chunked_equals_whole(method, params):
    base, models = random_case((13, 6), 3, seed=8)
    base = {"w": base, "b": base[0].clone()}
    models = [{"w": m, "b": m[1].clone()} for m in models]
    p = {"density": [0.3, 0.5, 0.8], "epsilon": 0.1, **params}
    whole = merge_state_dicts(base, models, method, p, seed=3)
    chunked, pieces = run_chunked(base, models, method, p, rows=4, seed=3)
    assert pieces == 4 + 1
    for k in whole:
        assert torch.equal(whole[k], chunked[k]), k


def test_della_bounds():
    base, models = random_case((4,), 2, seed=9)
    with pytest.raises(ValueError, match=r"density 0\.9 \+/- epsilon 0\.15 must lie in \(0, 1\)"):
        ours(base, models, "della", {"density": 0.9})
    with pytest.raises(ValueError, match=r"model 1"):
        ours(base, models, "della", {"density": [0.5, 0.1], "epsilon": 0.1})
    with pytest.raises(ValueError, match=r"'epsilon'.*must be in"):
        ours(base, models, "della", {"density": 0.5, "epsilon": 0.5})
    # density 1 and 0 need no epsilon bound: untouched / zeroed
    assert torch.equal(ours(base, models[:1], "della_linear", {"density": 1.0, "epsilon": 0.4}), models[0])
    assert torch.equal(ours(base, models[:1], "della_linear", {"density": 0.0}), base)


# ================================================================ model_stock


def test_model_stock_hand_computed():
    z = torch.zeros(2, dtype=F64)
    # orthogonal offsets: cos 0 -> t 0 -> the base
    assert torch.equal(ours(z, [T([1.0, 0.0], dtype=F64), T([0.0, 1.0], dtype=F64)], "model_stock", {}), z)
    # cos = 1/sqrt2 -> t = 2c / (1 + c) = 2 (sqrt2 - 1); mean offset [1, .5]
    out = ours(z, [T([1.0, 0.0], dtype=F64), T([1.0, 1.0], dtype=F64)], "model_stock", {}, dtype=F64)
    t = 2 * (math.sqrt(2) - 1)
    torch.testing.assert_close(out, T([t, t / 2], dtype=F64), rtol=1e-14, atol=0)
    # opposite offsets: 1 + (N-1) cos = 0 -> the base
    base = T([3.0, -1.0], dtype=F64)
    out = ours(base, [base + T([1.0, 0.0]), base - T([1.0, 0.0])], "model_stock", {}, dtype=F64)
    assert torch.equal(out, base)
    # N = 3 averages the pairwise cosines: (0 + 2/sqrt2)/3 = sqrt2/3; t = 3c / (1 + 2c)
    z3 = torch.zeros(3, dtype=F64)
    ms = [T([1.0, 0.0, 0.0], dtype=F64), T([0.0, 1.0, 0.0], dtype=F64), T([1.0, 1.0, 0.0], dtype=F64)]
    c = math.sqrt(2) / 3
    t3 = 3 * c / (1 + 2 * c)
    out = ours(z3, ms, "model_stock", {}, dtype=F64)
    torch.testing.assert_close(out, T([2 / 3, 2 / 3, 0.0], dtype=F64) * t3, rtol=1e-14, atol=0)


def test_model_stock_filter_wise_rows():
    base = torch.zeros(2, 2, dtype=F64)
    m1 = T([[1.0, 0.0], [1.0, 0.0]], dtype=F64)
    m2 = T([[0.0, 1.0], [1.0, 1.0]], dtype=F64)
    out = ours(base, [m1, m2], "model_stock", {"filter_wise": True}, dtype=F64)
    t = 2 * (math.sqrt(2) - 1)
    # row 0 orthogonal -> t 0; row 1 cos 1/sqrt2
    torch.testing.assert_close(out, T([[0.0, 0.0], [t, t / 2]], dtype=F64), rtol=1e-14, atol=0)


def test_model_stock_properties():
    base, models = random_case((6, 5), 3, seed=10, dtype=F64)
    same = ours(base, [models[0]] * 3, "model_stock", {}, dtype=F64)  # cos 1 -> t 1 -> the model
    torch.testing.assert_close(same, models[0], rtol=1e-14, atol=1e-14)
    a = ours(base, models, "model_stock", {}, dtype=F64)
    b = ours(base, models[::-1], "model_stock", {}, dtype=F64)
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="at least 2 models"):
        ours(base, models[:1], "model_stock", {})


def test_model_stock_filter_wise_chunked_equals_whole():
    base, models = random_case((9, 4), 3, seed=11)
    base, models = {"w": base}, [{"w": m} for m in models]
    whole = merge_state_dicts(base, models, "model_stock", {"filter_wise": True})
    chunked, pieces = run_chunked(base, models, "model_stock", {"filter_wise": True}, rows=2)
    assert pieces == 5
    assert torch.equal(whole["w"], chunked["w"])


# ================================================================ slerp, nearswap, passthrough


def test_slerp_hand_computed():
    v0, v1 = T([1.0, 0.0], dtype=F64), T([0.0, 1.0], dtype=F64)
    h = math.sqrt(0.5)
    torch.testing.assert_close(ours(v0, [v1], "slerp", {"t": 0.5}, dtype=F64), T([h, h], dtype=F64))
    # un-normalised tensors: the coefficients multiply the raw tensors
    torch.testing.assert_close(ours(2 * v0, [v1], "slerp", {"t": 0.5}, dtype=F64), T([2 * h, h], dtype=F64))
    # t = 1/3 of a right angle: [cos 30deg, sin 30deg]
    out = ours(v0, [v1], "slerp", {"t": 1 / 3}, dtype=F64)
    torch.testing.assert_close(out, T([math.cos(math.pi / 6), 0.5], dtype=F64), rtol=1e-14, atol=1e-14)
    assert torch.equal(ours(v0, [v1], "slerp", {"t": 0.0}, dtype=F64), v0)
    torch.testing.assert_close(ours(v0, [v1], "slerp", {"t": 1.0}, dtype=F64), v1, rtol=0, atol=1e-15)
    # collinear -> linear interpolation
    out = ours(T([1.0, 1.0], dtype=F64), [T([2.0, 2.0], dtype=F64)], "slerp", {"t": 0.25}, dtype=F64)
    torch.testing.assert_close(out, T([1.25, 1.25], dtype=F64), rtol=0, atol=1e-15)
    # a zero tensor is not NaN
    out = ours(torch.zeros(3), [torch.ones(3)], "slerp", {"t": 0.5})
    assert bool(torch.isfinite(out).all())


def test_slerp_bad_input():
    base, models = random_case((3,), 2, seed=12)
    with pytest.raises(ValueError, match="at most 1 models"):
        ours(base, models, "slerp", {"t": 0.5})
    with pytest.raises(ValueError, match="needs parameter 't'"):
        ours(base, models[:1], "slerp", {})
    with pytest.raises(ValueError, match="needs a base model"):
        ours(None, models[:1], "slerp", {"t": 0.5})


def test_nearswap_hand_computed():
    a = torch.zeros(4, dtype=F64)
    b = T([0.05, 0.2, -1.0, 0.0], dtype=F64)
    # w = clamp(.1 / |a - b|) = [1, .5, .1, 1]
    out = ours(a, [b], "nearswap", {"t": 0.1}, dtype=F64)
    torch.testing.assert_close(out, T([0.05, 0.1, -0.1, 0.0], dtype=F64), rtol=0, atol=1e-15)
    assert torch.equal(ours(a, [b], "nearswap", {"t": 0.0}, dtype=F64), a)
    with pytest.raises(ValueError, match=r"'t'.*must be in"):
        ours(a, [b], "nearswap", {"t": -1.0})


def test_nearswap_and_passthrough_chunked_equal_whole():
    base, models = random_case((10, 3), 1, seed=13)
    base, models = {"w": base}, [{"w": m} for m in models]
    for method, p in [("nearswap", {"t": 0.05}), ("passthrough", {"scale": 2.0})]:
        whole = merge_state_dicts(base, models, method, p)
        chunked, pieces = run_chunked(base, models, method, p, rows=3)
        assert pieces == 4
        assert torch.equal(whole["w"], chunked["w"])


def test_passthrough():
    m = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    out = merge_state_dicts(None, [m], "passthrough")
    assert all(torch.equal(out[k], m[k]) for k in m)
    out = merge_state_dicts(None, [m], "passthrough", {"scale": 0.5})
    assert all(torch.equal(out[k], m[k] * 0.5) for k in m)
    with pytest.raises(ValueError, match="at most 1 models"):
        merge_state_dicts(None, [m, m], "passthrough")


def test_bad_trim_parameters():
    base, models = random_case((4,), 1, seed=14)
    with pytest.raises(ValueError, match=r"'gamma'.*must be in \[0, 1\]"):
        ours(base, models, "breadcrumbs", {"gamma": 1.5})
    with pytest.raises(ValueError, match=r"'density'.*must be in \[0, 1\]"):
        ours(base, models, "breadcrumbs_ties", {"density": -0.1})
    with pytest.raises(ValueError, match="needs a base model"):
        ours(None, models, "breadcrumbs", {})


# ================================================================ parity with mergekit 0.1.5

SHAPES = [(), (7,), (5, 6), (2, 3, 4), (40, 16)]
W3 = [0.7, 1.3, 0.4]
PARITY = [
    ("breadcrumbs", {"weight": W3, "density": 0.5, "gamma": 0.1}),
    ("breadcrumbs", {"weight": 1.0, "density": [0.3, 0.6, 0.9], "rescale": True}),
    ("breadcrumbs", {"weight": W3, "density": 0.9, "gamma": 0.3, "normalize": True}),
    ("breadcrumbs_ties", {"weight": [0.7, -1.3, 0.4], "density": 0.5, "gamma": 0.05, "lambda": 0.7}),
    ("breadcrumbs_ties", {"weight": W3, "density": [0.2, 0.5, 1.0], "normalize": True, "rescale": True}),
    ("della", {"weight": W3, "density": 1.0}),
    ("della_linear", {"weight": W3, "density": 1.0, "normalize": True}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
]


def mergekit_tensors():
    return require("mergekit.merge_methods.api").merge_tensors


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("method", "params"), PARITY)
def test_parity_with_mergekit(method, params, shape):
    merge_tensors = mergekit_tensors()
    base, models = random_case(shape, 3, seed=20)
    want = merge_tensors([base, *models], method, parameters=params, base_index=0)
    assert torch.equal(ours(base, models, method, params), want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 4])
def test_parity_model_stock_n(shape, n):
    merge_tensors = mergekit_tensors()
    base, models = random_case(shape, n, seed=21)
    for p in ({}, {"filter_wise": True}):
        want = merge_tensors([base, *models], "model_stock", parameters=p, base_index=0)
        assert torch.equal(ours(base, models, "model_stock", p), want)


@pytest.mark.parametrize("shape", [s for s in SHAPES if math.prod(s) > 1])  # mergekit: NaN for 1 element
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("della", {"weight": W3, "density": 0.5, "epsilon": 0.2}),
        ("della", {"weight": [0.7, -1.3, 0.4], "density": [0.3, 0.5, 0.7], "epsilon": 0.1, "rescale": False}),
        ("della_linear", {"weight": W3, "density": 0.6, "epsilon": 0.15}),
        ("della_linear", {"weight": W3, "density": [0.4, 0.5, 0.6], "normalize": True, "lambda": 1.5}),
    ],
)
def test_parity_della_with_replayed_draws(method, params, shape, monkeypatch):
    """mergekit draws torch.bernoulli(p) once per model, in model order; replaying our seeded
    uniforms there (keep iff u < p) must reproduce our merge bit for bit."""
    merge_tensors = mergekit_tensors()
    base, models = random_case(shape, 3, seed=22)
    seen: list[torch.Tensor] = []

    def replay(p, *args, **kwargs):
        n_el = p.numel()
        seen.append(p.clone())
        return (uniform(7, "t", len(seen) - 1, 0, n_el, n_el).reshape(p.shape) < p).to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", replay)
    want = merge_tensors([base, *models], method, parameters=params, base_index=0)
    monkeypatch.undo()
    assert len(seen) == 3
    got = ours(base, models, method, params, seed=7)
    assert torch.equal(got, want)
    d = params["density"]
    d0 = d[0] if isinstance(d, list) else d
    e0 = params.get("epsilon", 0.15)
    prob = della_keep_probability(models[0] - base, density=d0, epsilon=e0)
    assert torch.equal(prob.reshape(seen[0].shape), seen[0])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 1.4])
def test_parity_slerp_nearswap(shape, t):
    merge_tensors = mergekit_tensors()
    base, models = random_case(shape, 1, seed=23, scale=1.0)
    want = merge_tensors([base, models[0]], "slerp", parameters={"t": t}, base_index=0)
    assert torch.equal(ours(base, models, "slerp", {"t": t}), want)
    near = base * 1.00001  # collinear: the lerp branch
    want = merge_tensors([base, near], "slerp", parameters={"t": t}, base_index=0)
    assert torch.equal(ours(base, [near], "slerp", {"t": t}), want)
    want = merge_tensors([base, models[0]], "nearswap", parameters={"t": t}, base_index=0)
    assert torch.equal(ours(base, models, "nearswap", {"t": t}), want)


def test_parity_passthrough():
    merge_tensors = mergekit_tensors()
    x = torch.randn(4, 5)
    for scale in (None, 0.5):
        params = {} if scale is None else {"scale": scale}
        want = merge_tensors([x], "passthrough", parameters=params)
        assert torch.equal(merge_state_dicts(None, [{"t": x}], "passthrough", params)["t"], want)


# ================================================================ sce, nuslerp, multislerp, karcher


def test_sce_hand_computed():
    base = torch.zeros(4, dtype=F64)
    t1 = T([1.0, -2.0, 0.5, 0.0], dtype=F64)
    t2 = T([3.0, 1.0, -0.5, 0.0], dtype=F64)
    # elected [+, -, + (zero sum), +]; agreeing: t1 at 0, 1, 2; t2 at 0.
    # mean squares 1.3125 and 2.5625 -> c = [21/62, 41/62]; entry 0 = (21*1 + 41*3)/62 = 72/31
    out = ours(base, [t1, t2], "sce", {})
    torch.testing.assert_close(out, T([72 / 31, -2.0, 0.5, 0.0], dtype=F64), rtol=1e-14, atol=1e-15)
    # select_topk .5: variances [1, 2.25, .25, 0] -> k = floor(3 * .5) = 1 -> entry 1 only
    out = ours(base, [t1, t2], "sce", {"select_topk": 0.5})
    torch.testing.assert_close(out, T([0.0, -2.0, 0.0, 0.0], dtype=F64), rtol=0, atol=1e-15)
    # tiny task vectors (mean squares summing below 1e-6): equal weights, entry 0 = (1 + 3)/2 * 1e-4
    out = ours(base, [t1 * 1e-4, t2 * 1e-4], "sce", {})
    torch.testing.assert_close(out, T([2e-4, -2e-4, 0.5e-4, 0.0], dtype=F64), rtol=1e-12, atol=1e-18)


def test_nuslerp_hand_computed():
    v0, v1 = T([1.0, 0.0], dtype=F64), T([0.0, 1.0], dtype=F64)
    h = math.sqrt(0.5)
    torch.testing.assert_close(ours(None, [v0, v1], "nuslerp", {}), T([h, h], dtype=F64))
    # weights [2, 1] -> t = 1/3 -> [cos 30deg, sin 30deg]; weights summing to 0 -> t = 1/2
    out = ours(None, [v0, v1], "nuslerp", {"weight": [2.0, 1.0]})
    torch.testing.assert_close(out, T([math.cos(math.pi / 6), 0.5], dtype=F64), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(ours(None, [v0, v1], "nuslerp", {"weight": [1.0, -1.0]}), T([h, h], dtype=F64))
    # with a base: slerp of the task vectors
    b = T([5.0, -5.0], dtype=F64)
    torch.testing.assert_close(ours(b, [b + v0, b + v1], "nuslerp", {}), b + T([h, h], dtype=F64))
    # per row: row 0 orthogonal, row 1 collinear (lerp)
    m0 = T([[1.0, 0.0], [1.0, 1.0]], dtype=F64)
    m1 = T([[0.0, 1.0], [2.0, 2.0]], dtype=F64)
    out = ours(None, [m0, m1], "nuslerp", {"nuslerp_flatten": False})
    torch.testing.assert_close(out, T([[h, h], [1.5, 1.5]], dtype=F64), rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="at most 2 models"):
        ours(None, [v0, v1, v0], "nuslerp", {})


def test_multislerp_hand_computed():
    h = math.sqrt(0.5)
    v0, v1 = T([2.0, 0.0], dtype=F64), T([0.0, 4.0], dtype=F64)
    # orthogonal, equal weights: the tangent vectors cancel, direction [h, h], mean norm 3
    out = ours(None, [v0, v1], "multislerp", {})
    torch.testing.assert_close(out, T([3 * h, 3 * h], dtype=F64), rtol=1e-7, atol=0)
    b = T([1.0, 1.0], dtype=F64)
    out = ours(b, [b + v0, b + v1], "multislerp", {})
    torch.testing.assert_close(out, b + T([3 * h, 3 * h], dtype=F64), rtol=1e-7, atol=0)
    assert torch.equal(ours(b, [v0], "multislerp", {}), v0)  # one model: unchanged
    with pytest.raises(ValueError, match="sum to 0"):
        ours(None, [v0, v1], "multislerp", {"weight": [1.0, -1.0]})
    with pytest.raises(ValueError, match=r"direction of tensor 't' is zero"):
        ours(None, [v0, -v0, v0], "multislerp", {"weight": [1.0, 2.0, 1.0]})


def test_karcher_hand_computed():
    e0, e1 = T([1.0, 0.0], dtype=F64), T([0.0, 1.0], dtype=F64)
    # on a circle the Karcher mean of angles {0, 0, 90deg} is their arithmetic mean, 30deg
    out = ours(None, [e0, e0, e1], "karcher", {})
    torch.testing.assert_close(out, T([math.cos(math.pi / 6), 0.5], dtype=F64), rtol=0, atol=1e-6)
    # a zero tensor leaves the direction alone but counts in the mean norm (2/3)
    h = math.sqrt(0.5)
    out = ours(None, [e0, e1, torch.zeros(2, dtype=F64)], "karcher", {})
    torch.testing.assert_close(out, T([h, h], dtype=F64) * 2 / 3, rtol=1e-12, atol=1e-12)
    assert torch.equal(ours(None, [torch.zeros(2), torch.zeros(2)], "karcher", {}), torch.zeros(2))
    with pytest.raises(ValueError, match=r"'tol'.*must be in"):
        ours(None, [e0, e1], "karcher", {"tol": 0.0})


def test_nuslerp_rows_chunked_equals_whole():
    base, models = random_case((9, 5), 2, seed=30)
    base, models = {"w": base}, [{"w": m} for m in models]
    p = {"weight": [0.3, 0.8], "nuslerp_flatten": False}
    whole = merge_state_dicts(base, models, "nuslerp", p)
    chunked, pieces = run_chunked(base, models, "nuslerp", p, rows=4)
    assert pieces == 3
    assert torch.equal(whole["w"], chunked["w"])


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_sce_nuslerp_multislerp_karcher(shape):
    merge_tensors = mergekit_tensors()
    for scale in (0.1, 3e-4):  # 3e-4: sce's equal-weight fallback
        base, models = random_case(shape, 3, seed=31, scale=scale)
        for p in ({}, {"select_topk": 0.3}, {"select_topk": 0.0}):
            want = merge_tensors([base, *models], "sce", parameters=p, base_index=0)
            assert torch.equal(ours(base, models, "sce", p), want), p
    base, models = random_case(shape, 2, seed=32)
    for p in (
        {"weight": [0.3, 0.9]},
        {"weight": [1.0, 1.0], "nuslerp_flatten": False},
        {"weight": [0.2, 0.5], "nuslerp_flatten": False, "nuslerp_row_wise": True},
    ):
        want = merge_tensors([base, *models], "nuslerp", parameters=p, base_index=0)
        assert torch.equal(ours(base, models, "nuslerp", p), want), p
        assert torch.equal(ours(None, models, "nuslerp", p), merge_tensors(models, "nuslerp", parameters=p))
    base, models = random_case(shape, 3, seed=33)
    for p in ({"weight": [0.3, 0.9, 0.5]}, {"weight": [1.0, 2.5, 1.0], "normalize_weights": False}):
        want = merge_tensors([base, *models], "multislerp", parameters=p, base_index=0)
        assert torch.equal(ours(base, models, "multislerp", p), want), p
        assert torch.equal(
            ours(None, models, "multislerp", p), merge_tensors(models, "multislerp", parameters=p)
        )
    for p in ({}, {"max_iter": 3}):
        assert torch.equal(
            ours(None, models, "karcher", p), merge_tensors(models, "karcher", parameters=p)
        ), p
