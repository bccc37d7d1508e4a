"""ties: the worked example of docs/methods/ties.md, hand-computed cases, a literal paper
reference, properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ref_ties import ties_state_dicts
from weightmerge.api import merge_state_dicts
from weightmerge.engine.driver import MergeInputs, run_merge
from weightmerge.methods._params import resolve_params
from weightmerge.methods.registry import get_method

F64 = torch.float64

# docs/methods/ties.md#worked-example (n = 3, D = 10).
T = torch.tensor(
    [
        [0.5, -0.2, 0.1, 0.0, 0.9, -0.4, 0.3, -0.05, 0.2, 0.6],
        [-0.3, -0.1, 0.4, 0.2, 0.8, 0.1, -0.6, 0.05, -0.2, 0.7],
        [0.2, 0.3, -0.5, 0.1, -0.1, -0.3, 0.2, 0.0, 0.4, -0.8],
    ],
    dtype=F64,
)
DIS_MEAN = [0.5, 0, -0.5, 0, 0.85, 0, -0.6, 0, 0.4, 0.65]
DIS_SUM = [0.5, 0, -0.5, 0, 1.70, 0, -0.6, 0, 0.4, 1.30]


def one_tensor(rows, dtype=F64, base=None):
    rows = torch.as_tensor(rows, dtype=dtype)
    b = torch.zeros(rows.shape[1:], dtype=dtype) if base is None else torch.as_tensor(base, dtype=dtype)
    return {"t": b}, [{"t": b + r} for r in rows]


def merge(base, models, params, dtype=torch.float32, method="ties", seed=0):
    return merge_state_dicts(base, models, method, params, seed=seed, compute_dtype=dtype)


def split_xy(rows: torch.Tensor):
    base = {"x": torch.zeros(6, dtype=rows.dtype), "y": torch.zeros(4, dtype=rows.dtype)}
    return base, [{"x": r[:6].clone(), "y": r[6:].clone()} for r in rows]


# ---------------------------------------------------------------------------------------------
# Golden example, paper variant (global scope)


@pytest.mark.parametrize(("merge_func", "expected"), [("mean", DIS_MEAN), ("sum", DIS_SUM)])
def test_golden_paper_one_tensor(merge_func, expected):
    base, models = one_tensor(T)
    out = merge(base, models, {"variant": "paper", "density": 0.2, "merge_func": merge_func}, F64)
    torch.testing.assert_close(out["t"], torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("normalize", "expected"), [(True, DIS_MEAN), (False, DIS_SUM)])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_golden_paper_across_two_tensors(normalize, expected, dtype):
    """Global scope: the threshold is taken over x and y together (per tensor would differ)."""
    base, models = split_xy(T.to(dtype))
    out = merge(base, models, {"variant": "paper", "density": 0.2, "normalize": normalize}, dtype)
    got = torch.cat([out["x"], out["y"]]).to(F64)
    tol = 1e-12 if dtype == F64 else 1e-6
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=0, atol=tol)
    # per-tensor scope trims x and y separately: y = T[:, 6:] keeps floor(0.2*4)+1 = 1 entry per
    # row (0.6, 0.7, -0.8, all in column 3; their sum 0.5 > 0 elects +) -> mean(0.6, 0.7)
    per = merge(base, models, {"variant": "paper", "density": 0.2, "scope": "per_tensor"}, F64)
    torch.testing.assert_close(per["y"].to(F64), torch.tensor([0, 0, 0, 0.65], dtype=F64), rtol=0, atol=1e-6)


def test_golden_lambda_scales_and_base_added():
    b = torch.linspace(-1, 1, 10, dtype=F64)
    base, models = one_tensor(T, base=b)
    out = merge(base, models, {"variant": "paper", "density": 0.2, "lambda": 0.3, "merge_func": "sum"}, F64)
    torch.testing.assert_close(out["t"], b + 0.3 * torch.tensor(DIS_SUM, dtype=F64), rtol=0, atol=1e-12)


def test_golden_mergekit_variant_matches_on_tie_free_tensor():
    """docs/methods/ties.md: mergekit keeps exactly k = floor(0.3*10) = 3 per row = paper's k+1 at K = 0.2."""
    base, models = one_tensor(T)
    out = merge(base, models, {"density": 0.3}, F64)
    torch.testing.assert_close(out["t"], torch.tensor(DIS_MEAN, dtype=F64), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Hand-computed rules


def test_mergekit_exact_k_breaks_ties_by_lowest_index():
    base, models = one_tensor([[1.0, -2.0, 2.0, 2.0, 0.5]])
    # k = floor(0.4 * 5) = 2 of the three |2|s: indices 1 and 2
    out = merge(base, models, {"density": 0.4})
    assert out["t"].tolist() == [0.0, -2.0, 2.0, 0.0, 0.0]
    # paper: keep >= the (k+1) = 3rd largest magnitude (2) -> all three
    out = merge(base, models, {"density": 0.4, "variant": "paper", "scope": "per_tensor"})
    assert out["t"].tolist() == [0.0, -2.0, 2.0, 2.0, 0.0]


def test_mergekit_keeps_at_least_one():
    base, models = one_tensor([[0.1, -0.3, 0.2]])
    out = merge(base, models, {"density": 0.1})  # floor(0.3) = 0 -> max(1, 0) = 1
    assert out["t"].tolist() == pytest.approx([0.0, -0.3, 0.0])


def test_weighted_vote_mergekit_vs_unweighted_vote_paper():
    base, models = one_tensor([[1.0], [-0.6]])
    # mergekit: votes 0.5*1.0 + 1.0*(-0.6) = -0.1 < 0 -> model 1 alone: -0.6*1.0 / 1.0
    out = merge(base, models, {"weight": [0.5, 1.0]}, F64)
    assert out["t"].item() == pytest.approx(-0.6, abs=1e-15)
    # paper: votes 1.0 - 0.6 > 0 -> model 0 alone: 0.5*1.0 / 0.5
    out = merge(base, models, {"weight": [0.5, 1.0], "variant": "paper"}, F64)
    assert out["t"].item() == pytest.approx(1.0, abs=1e-15)
    # unnormalised: the weighted sum of agreeing deltas
    out = merge(base, models, {"weight": [0.5, 1.0], "normalize": False}, F64)
    assert out["t"].item() == pytest.approx(-0.6, abs=1e-15)
    out = merge(base, models, {"weight": [2.0, 1.0], "normalize": False}, F64)
    assert out["t"].item() == pytest.approx(2.0, abs=1e-15)


def test_normalize_divides_by_agreeing_weights():
    base, models = one_tensor([[1.0, 2.0], [3.0, -1.0], [-0.5, 4.0]])
    out = merge(base, models, {"weight": [1.0, 2.0, 4.0]}, F64)
    # entry 0: weighted 1, 6, -2 -> sum 5 > 0 -> (1 + 6) / (1 + 2); entry 1: 2, -2, 16 -> (2+16)/(1+4)
    torch.testing.assert_close(out["t"], torch.tensor([7 / 3, 18 / 5], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("rows", "mergekit", "paper"),
    [
        # entry 0 votes 0; other entries vote + -> paper majority +; mergekit always +
        ([[0.5, 0.3, 0.2], [-0.5, 0.1, 0.1]], 0.5, 0.5),
        # other entries vote - -> paper majority -: the negative delta wins entry 0
        ([[0.5, -0.3, -0.2], [-0.5, -0.1, -0.1]], 0.5, -0.5),
    ],
)
def test_zero_elected_sign(rows, mergekit, paper):
    base, models = one_tensor(rows)
    assert merge(base, models, {}, F64)["t"][0].item() == mergekit
    for scope in ("per_tensor", "global"):
        out = merge(base, models, {"variant": "paper", "scope": scope}, F64)
        assert out["t"][0].item() == paper


def test_zero_sign_majority_is_global_in_global_scope():
    """Tensor a's own entries vote 0/+, but tensor b's three negative votes make the global
    majority negative, so a[0] (vote 0) takes the negative delta only in global scope."""
    base = {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(3, dtype=F64)}
    models = [
        {"a": torch.tensor([0.5, 0.3], dtype=F64), "b": torch.tensor([-1.0, -1.0, -1.0], dtype=F64)},
        {"a": torch.tensor([-0.5, 0.1], dtype=F64), "b": torch.tensor([-1.0, -1.0, -1.0], dtype=F64)},
    ]
    glob = merge(base, models, {"variant": "paper"}, F64)
    per = merge(base, models, {"variant": "paper", "scope": "per_tensor"}, F64)
    assert glob["a"][0].item() == -0.5
    assert per["a"][0].item() == 0.5


def test_global_scope_can_zero_a_small_tensor():
    """Global vs per-tensor scope (docs/methods/ties.md) in miniature: one model, A = [1, 2, 3, 4],
    B = [0.01, 0.02], density 0.5."""
    base = {"A": torch.zeros(4, dtype=F64), "B": torch.zeros(2, dtype=F64)}
    models = [
        {"A": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64), "B": torch.tensor([0.01, 0.02], dtype=F64)}
    ]

    def run(**p):
        out = merge(base, models, {"density": 0.5, **p}, F64)
        return out["A"].tolist(), out["B"].tolist()

    # paper global: D = 6, k = 3, keep >= the 4th largest (1) -> all of A, none of B
    assert run(variant="paper") == ([1, 2, 3, 4], [0, 0])
    # paper per tensor: A keeps >= its 3rd largest, B keeps >= its 2nd largest
    assert run(variant="paper", scope="per_tensor") == ([0, 2, 3, 4], [0.01, 0.02])
    # mergekit global: exactly the 3 largest of the model
    assert run(scope="global") == ([0, 2, 3, 4], [0, 0])
    # mergekit per tensor: 2 of A, 1 of B
    assert run() == ([0, 0, 3, 4], [0, 0.02])


def test_global_threshold_is_exact_in_float64():
    """1 and 1 + 2^-40 are one float32 value; the float64 threshold still tells them apart."""
    big = 1.0 + 2.0**-40
    base = {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(1, dtype=F64)}
    models = [{"a": torch.tensor([1.0, 0.5], dtype=F64), "b": torch.tensor([big], dtype=F64)}]
    out = merge(base, models, {"density": 0.34, "scope": "global"}, F64)  # k = 1
    assert out["a"].tolist() == [0.0, 0.0]
    assert out["b"].tolist() == [big]


def test_rescale_l1_per_tensor_and_global():
    base = {"A": torch.zeros(4, dtype=F64), "B": torch.zeros(2, dtype=F64)}
    models = [
        {"A": torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=F64), "B": torch.tensor([0.5, 0.5], dtype=F64)}
    ]
    per = merge(base, models, {"density": 0.5, "rescale": True}, F64)
    # A keeps [3, -4] (L1 7 of 10) -> x 10/7; B keeps one of two equal values (lowest index) -> x 2
    torch.testing.assert_close(per["A"], torch.tensor([0, 0, 30 / 7, -40 / 7], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(per["B"], torch.tensor([1.0, 0.0], dtype=F64), rtol=0, atol=1e-15)
    glob = merge(base, models, {"density": 0.5, "rescale": True, "scope": "global"}, F64)
    # D = 6, k = 3: keeps 2, 3, 4 (L1 9 of the model's 11) -> x 11/9; B is trimmed to 0
    expect_a = torch.tensor([0, -22 / 9, 33 / 9, -44 / 9], dtype=F64)
    torch.testing.assert_close(glob["A"], expect_a, rtol=0, atol=1e-15)
    assert glob["B"].tolist() == [0.0, 0.0]


def test_per_model_density():
    base, models = one_tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    out = merge(base, models, {"density": [0.25, 1.0], "normalize": False}, F64)
    # model 0 keeps only 4.0
    assert out["t"].tolist() == [5.0, 2.0, 3.0, 4.0]
    out = merge(base, models, {"density": [0.25, 1.0], "normalize": False, "variant": "paper"}, F64)
    # paper global: model 0 k = 1 -> keeps >= its 2nd largest: 4, 3
    assert out["t"].tolist() == [5.0, 5.0, 3.0, 4.0]


# ---------------------------------------------------------------------------------------------
# Literal references


def _random_model(gen, shapes, n, scale=1.0, dtype=torch.float32):
    base = {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}
    models = [
        {k: v + scale * torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in base.items()}
        for _ in range(n)
    ]
    return base, models


SHAPES = {"w": (17, 9), "b": (9,), "s": (), "z.emb": (5, 3, 2), "a.norm": (4,)}


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("merge_func", ["mean", "sum"])
def test_paper_global_matches_literal_reference(density, merge_func):
    params = {"variant": "paper", "density": density, "merge_func": merge_func, "lambda": 0.7}
    for dtype, tol in ((F64, 1e-12), (torch.float32, 2e-6)):
        gen = torch.Generator().manual_seed(int(density * 1000) + len(merge_func))
        base, models = _random_model(gen, SHAPES, n=4, dtype=dtype)
        ref = ties_state_dicts(base, models, [density] * 4, merge_func=merge_func, lam=0.7)
        out = merge(base, models, params, dtype)
        assert sorted(out) == sorted(ref)
        for k in ref:
            torch.testing.assert_close(out[k].to(F64), ref[k], rtol=0, atol=tol)


def test_paper_global_reference_per_model_density_and_sparse_deltas():
    gen = torch.Generator().manual_seed(7)
    base, models = _random_model(gen, SHAPES, n=3, dtype=F64)
    for m in models:  # exact zeros in the task vectors (frozen entries) and one frozen tensor
        m["w"][:5] = base["w"][:5]
        m["b"] = base["b"].clone()
    dens = [0.1, 0.3, 0.6]
    ref = ties_state_dicts(base, models, dens)
    out = merge(base, models, {"variant": "paper", "density": dens}, F64)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=1e-12)


def ref_mergekit_tensor(base, tuned, weights, densities, normalize=True, lam=1.0):
    """Literal per-tensor mergekit TIES in float64 with a stable sort (lowest index wins ties)."""
    deltas = []
    for t, d in zip(tuned, densities, strict=True):
        delta = (t - base).reshape(-1).to(F64)
        if d < 1:
            k = max(1, int(d * delta.numel()))
            order = torch.sort(delta.abs(), descending=True, stable=True).indices
            keep = torch.zeros_like(delta)
            keep[order[:k]] = 1
            delta = delta * keep
        deltas.append(delta)
    out = torch.zeros_like(deltas[0])
    for p in range(out.numel()):
        votes = sum(w * dl[p] for w, dl in zip(weights, deltas, strict=True))
        sign = 1.0 if votes >= 0 else -1.0
        agree = [(w, w * dl[p]) for w, dl in zip(weights, deltas, strict=True) if w * dl[p] * sign > 0]
        total = sum(v for _, v in agree)
        div = sum(w for w, _ in agree) if normalize else 1.0
        out[p] = total / (div if div != 0 else 1.0)
    return base.to(F64) + lam * out.reshape(base.shape)


@pytest.mark.parametrize("shape", [(), (1,), (12,), (6, 5), (2, 3, 4)])
def test_mergekit_per_tensor_matches_literal_reference_with_ties(shape):
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    base = torch.randint(-3, 4, shape, generator=gen).to(F64)
    tuned = [base + torch.randint(-3, 4, shape, generator=gen).to(F64) for _ in range(3)]  # many ties
    weights, dens = [0.5, 1.5, -0.25], [0.3, 0.5, 0.8]
    for normalize in (True, False):
        out = merge(
            {"t": base},
            [{"t": t} for t in tuned],
            {"weight": weights, "density": dens, "normalize": normalize, "lambda": 1.5},
            F64,
        )
        ref = ref_mergekit_tensor(base, tuned, weights, dens, normalize, 1.5)
        torch.testing.assert_close(out["t"], ref, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Properties

CONFIGS = [
    {"variant": "mergekit"},
    {"variant": "mergekit", "scope": "global"},
    {"variant": "paper"},
    {"variant": "paper", "scope": "per_tensor"},
]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), cfg=st.sampled_from(CONFIGS))
def test_identical_experts_give_the_expert(seed, n, cfg):
    gen = torch.Generator().manual_seed(seed)
    base, (expert,) = _random_model(gen, {"w": (6, 4), "b": (5,)}, n=1)
    out = merge(base, [expert] * n, {**cfg, "density": 1.0})
    for k in base:
        torch.testing.assert_close(out[k], expert[k], rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cfg=st.sampled_from(CONFIGS), rescale=st.booleans())
def test_order_invariance(seed, cfg, rescale):
    gen = torch.Generator().manual_seed(seed)
    base, models = _random_model(gen, {"w": (7, 3), "b": (4,), "s": ()}, n=4)
    w = (torch.rand(4, generator=gen) + 0.1).tolist()
    d = (torch.rand(4, generator=gen) * 0.9 + 0.1).tolist()
    perm = torch.randperm(4, generator=gen).tolist()
    params = {**cfg, "rescale": rescale}
    a = merge(base, models, {**params, "weight": w, "density": d})
    b = merge(
        base,
        [models[i] for i in perm],
        {**params, "weight": [w[i] for i in perm], "density": [d[i] for i in perm]},
    )
    for k in base:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def run_chunked(base, models, method, params, rows, seed=0, dtype=torch.float32):
    """Drive the merge loop with row-chunking (as the streaming engine does); returns
    (merged dict, number of emitted pieces)."""
    spec = get_method(method)
    resolved = resolve_params(spec, params, len(models))
    names = sorted(base)

    def reader(sd):
        return lambda name, r: sd[name] if r is None else sd[name][r[0] : r[1]]

    pieces: dict[str, list] = {k: [] for k in names}

    def emit(name, r, t):
        pieces[name].append((0 if r is None else r[0], t))

    inp = MergeInputs(
        names=names,
        shapes={k: tuple(base[k].shape) for k in names},
        base=reader(base),
        models=[reader(m) for m in models],
        params_for=lambda _n: resolved,
        model_params=resolved,
        seed=seed,
        compute_dtype=dtype,
        chunk_rows=lambda _n: rows,
    )
    run_merge(inp, spec, emit)
    out = {
        k: torch.cat([t.reshape(-1, *base[k].shape[1:]) for _, t in sorted(v, key=lambda p: p[0])])
        .reshape(base[k].shape)
        .to(base[k].dtype)
        for k, v in pieces.items()
    }
    return out, sum(len(v) for v in pieces.values())


@pytest.mark.parametrize("variant", ["mergekit", "paper"])
@pytest.mark.parametrize("rescale", [False, True])
def test_global_scope_row_chunked_equals_whole(variant, rescale):
    gen = torch.Generator().manual_seed(3)
    base, models = _random_model(gen, {"w": (13, 5), "v": (4, 2, 3), "b": (6,)}, n=3)
    params = {"variant": variant, "scope": "global", "density": [0.2, 0.4, 0.7], "rescale": rescale}
    whole = merge(base, models, params)
    chunked, pieces = run_chunked(base, models, "ties", params, rows=3)
    assert pieces > 3  # really chunked
    for k in base:
        assert torch.equal(whole[k], chunked[k]), k


def test_per_tensor_scope_is_not_chunked():
    spec = get_method("ties")
    p = resolve_params(spec, {}, 2)
    assert not spec.is_row_chunkable(p)
    assert spec.is_row_chunkable(resolve_params(spec, {"variant": "paper"}, 2))
    gen = torch.Generator().manual_seed(4)
    base, models = _random_model(gen, {"w": (9, 4)}, n=2)
    _, pieces = run_chunked(base, models, "ties", {"density": 0.3}, rows=2)
    assert pieces == 1


@pytest.mark.parametrize("cfg", CONFIGS)
def test_bf16_in_bf16_out_and_close_to_fp32(cfg):
    gen = torch.Generator().manual_seed(5)
    base, models = _random_model(gen, {"w": (8, 8)}, n=3)
    b16 = {k: v.to(torch.bfloat16) for k, v in base.items()}
    m16 = [{k: v.to(torch.bfloat16) for k, v in m.items()} for m in models]
    out = merge(b16, m16, {**cfg, "density": 1.0})
    assert out["w"].dtype == torch.bfloat16
    ref = merge(
        {k: v.float() for k, v in b16.items()},
        [{k: v.float() for k, v in m.items()} for m in m16],
        {**cfg, "density": 1.0},
    )
    assert torch.equal(out["w"], ref["w"].to(torch.bfloat16))


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("rescale", [False, True])
def test_all_zero_task_vectors_give_base(cfg, rescale):
    gen = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(5, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    out = merge(base, [base, base], {**cfg, "density": 0.3, "rescale": rescale})
    for k in base:
        assert torch.isfinite(out[k]).all()
        assert torch.equal(out[k], base[k])


def test_inputs_are_not_mutated():
    gen = torch.Generator().manual_seed(8)
    base, models = _random_model(gen, {"w": (5, 3)}, n=2)
    copies = [{k: v.clone() for k, v in m.items()} for m in [base, *models]]
    for cfg in CONFIGS:
        merge(base, models, {**cfg, "density": 0.4, "rescale": True})
    for orig, copy in zip([base, *models], copies, strict=True):
        assert all(torch.equal(orig[k], copy[k]) for k in orig)


# ---------------------------------------------------------------------------------------------
# Bad input


def _two():
    return one_tensor([[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval(density):
    with pytest.raises(ValueError, match="density"):
        merge(*_two(), {"density": density})
    with pytest.raises(ValueError, match="density"):
        merge(*_two(), {"density": [0.5, density]})


def test_wrong_length_per_model_lists():
    with pytest.raises(ValueError, match=r"'weight'.*3 values.*2 models"):
        merge(*_two(), {"weight": [1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match=r"'density'.*1 values"):
        merge(*_two(), {"density": [0.5]})


def test_unknown_variant_and_scope_suggest():
    with pytest.raises(ValueError, match=r"did you mean 'paper'"):
        merge(*_two(), {"variant": "papr"})
    with pytest.raises(ValueError, match=r"did you mean 'per_tensor'"):
        merge(*_two(), {"scope": "per-tensor"})
    with pytest.raises(ValueError, match=r"unknown parameter 'densty'.*did you mean 'density'"):
        merge(*_two(), {"densty": 0.5})


def test_merge_func_contradicting_normalize():
    with pytest.raises(ValueError, match="contradicts"):
        merge(*_two(), {"merge_func": "sum", "normalize": True})
    out = merge(*_two(), {"merge_func": "sum", "normalize": False})  # consistent is fine
    assert out["t"].tolist() == [4.0, 6.0]


def test_nan_task_vector_is_refused():
    base, models = one_tensor([[1.0, float("nan")], [3.0, 4.0]])
    with pytest.raises(ValueError, match=r"'t'.*non-finite values \(NaN"):  # the driver's input check
        merge(base, models, {"density": 0.5})
    with pytest.raises(ValueError, match="NaN"):
        merge(base, models, {"density": 0.5, "variant": "paper"})


def test_global_scope_refuses_a_per_tensor_density():
    spec = get_method("ties")
    model_level = resolve_params(spec, {"scope": "global", "density": 0.5}, 1)
    other = resolve_params(spec, {"scope": "global", "density": 0.25}, 1)
    base = {"t": torch.zeros(4)}
    inp = MergeInputs(
        names=["t"],
        shapes={"t": (4,)},
        base=lambda n, r: base[n],
        models=[lambda n, r: torch.arange(4.0)],
        params_for=lambda _n: other,
        model_params=model_level,
    )
    with pytest.raises(ValueError, match="density may not vary per tensor"):
        run_merge(inp, spec, lambda *a: None)


# ---------------------------------------------------------------------------------------------
# The fused per-tensor path (mergekit variant, no rescale) equals the reference bit for bit


@pytest.mark.parametrize("kind", ["normal", "ties", "bf16"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 1.5, -0.25]])
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_per_tensor_equals_reference(monkeypatch, kind, weights, normalize):
    from weightmerge.methods import _ties_fused
    from weightmerge.methods import ties as ties_mod

    monkeypatch.setattr(_ties_fused, "SELECT_DIRECT", 500)  # rows above this are sampled
    monkeypatch.setattr(_ties_fused, "SAMPLE_SIZE", 64)
    gen = torch.Generator().manual_seed(len(kind) + len(weights))
    shape = (60, 97)
    if kind == "ties":
        x = torch.randint(-3, 4, (3, *shape), generator=gen).float()
    elif kind == "bf16":
        x = (torch.randn(3, *shape, generator=gen) * 0.01).to(torch.bfloat16).float()
    else:
        x = torch.randn(3, *shape, generator=gen)
    base = torch.randn(shape, generator=gen)
    w = torch.tensor(weights)
    for dens in ([0.2, 0.2, 0.2], [0.05, 0.5, 1.0], [0.9, 0.0001, 0.3]):
        plain = x.clone()
        ties_mod.trim_per_tensor(plain, dens, variant="mergekit", rescale=False, name="t")
        ref = ties_mod.ties_combine(base, plain, w, variant="mergekit", lam=1.3, normalize=normalize)
        ranks = [ties_mod.threshold_rank(numel=x[0].numel(), density=d, variant="mergekit") for d in dens]
        out = _ties_fused.per_tensor(base, x.clone(), ranks, w, lam=1.3, normalize=normalize, name="t")
        assert torch.equal(out, ref), dens


def test_fused_selection_is_exact_when_the_sample_misses(monkeypatch):
    from weightmerge.methods import _ties_fused

    monkeypatch.setattr(_ties_fused, "SELECT_DIRECT", 10)
    mag = torch.sort(torch.rand(5000, generator=torch.Generator().manual_seed(0))).values  # sorted
    for rank in (1, 77, 2500, 4999, 5000):
        thr, n_gt, n_eq = _ties_fused.kth_largest_counts(mag, rank, name="t")
        assert thr == torch.kthvalue(mag, 5000 - rank + 1).values
        assert n_gt == int((mag > thr).sum()) and n_eq == int((mag == thr).sum())
    with pytest.raises(ValueError, match="NaN in the task vectors of tensor 't'"):
        _ties_fused.kth_largest_counts(torch.tensor([1.0, math.nan] * 20), 3, name="t")
