"""PCB-Merging: the worked example of docs/methods/pcb.md, a literal reference (tests/ref_pcb.py),
properties, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from ref_pcb import pcb_state_dicts, pcb_vector
from weightmerge.api import merge_state_dicts
from weightmerge.engine.driver import MergeInputs, run_merge
from weightmerge.methods import pcb
from weightmerge.methods._params import resolve_params
from weightmerge.methods._random import uniform
from weightmerge.methods.registry import get_method

F64 = torch.float64
# docs/methods/ties.md#worked-example: n = 3 task vectors of D = 10
T_GOLDEN = torch.tensor(
    [
        [0.5, -0.2, 0.1, 0.0, 0.9, -0.4, 0.3, -0.05, 0.2, 0.6],
        [-0.3, -0.1, 0.4, 0.2, 0.8, 0.1, -0.6, 0.05, -0.2, 0.7],
        [0.2, 0.3, -0.5, 0.1, -0.1, -0.3, 0.2, 0.0, 0.4, -0.8],
    ],
    dtype=F64,
)
TAU_C001 = [0, 0, 0, 0, 0.65, -0.3, 0, 0, 0.4, 0.658932]
TAU_C01 = [0, 0, 0, 0, 0.65, -0.3, 0, 0, 0.4, 0.658536]
W_C001 = {(0, 4): 1.0, (0, 9): 0.260675, (1, 4): 1.0, (1, 9): 0.374059, (2, 5): 0.414826, (2, 8): 1.0}
W_C01 = {(0, 4): 1.0, (0, 9): 0.265818, (1, 4): 1.0, (1, 9): 0.375261, (2, 5): 0.368691, (2, 8): 1.0}
SHAPES = {"attn.w": (6, 5), "bias": (7,), "emb": (4, 3, 2), "zz.scale": (3, 3)}


def golden_inputs(split: bool) -> tuple[dict, list[dict]]:
    if not split:
        return {"w": torch.zeros(10, dtype=F64)}, [{"w": T_GOLDEN[i].clone()} for i in range(3)]
    # insertion order b, a: global scope must still concatenate in sorted key order (a, b)
    base = {"b": torch.zeros(2, 3, dtype=F64), "a": torch.zeros(4, dtype=F64)}
    models = [{"b": T_GOLDEN[i, 4:].reshape(2, 3).clone(), "a": T_GOLDEN[i, :4].clone()} for i in range(3)]
    return base, models


def flat_golden(out: dict) -> torch.Tensor:
    return out["w"] if "w" in out else torch.cat([out["a"], out["b"].reshape(-1)])


def random_models(
    seed: int, n: int, dtype: torch.dtype = F64, shapes: dict | None = None
) -> tuple[dict, list[dict]]:
    """Base + n experts; tensors have different delta scales, some exact zeros and shared directions."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or SHAPES
    base = {k: torch.randn(s, generator=g, dtype=F64).to(dtype) for k, s in shapes.items()}
    scale = {k: 0.003 * (3**j) for j, k in enumerate(sorted(shapes))}
    shared = {k: torch.randn(s, generator=g, dtype=F64) for k, s in shapes.items()}
    models = []
    for _ in range(n):
        m = {}
        for k, s in shapes.items():
            d = (torch.randn(s, generator=g, dtype=F64) + 0.7 * shared[k]) * scale[k]
            d = torch.where(torch.rand(s, generator=g) < 0.05, 0.0, d)
            m[k] = (base[k].to(F64) + d).to(dtype)
        models.append(m)
    return base, models


def assert_dicts_close(got: dict, want: dict, *, atol: float, rtol: float) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k].to(F64), want[k].to(F64), atol=atol, rtol=rtol, msg=k)


def run_driver(base: dict, models: list[dict], params: dict, *, rows: int | None, dtype=F64, seed=0) -> dict:
    """Merge through the shared driver with row-chunking; returns the merged tensors (compute dtype)."""
    spec = get_method("pcb")
    names = sorted(base)
    resolved = resolve_params(spec, params, len(models))
    pieces: dict[str, list] = {k: [] for k in names}

    def reader(sd):
        return lambda name, r: sd[name] if r is None else sd[name][r[0] : r[1]]

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
    run_merge(inp, spec, lambda name, r, out: pieces[name].append((0 if r is None else r[0], out.clone())))
    out = {}
    for k, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        if rows is not None and len(base[k].shape) >= 2 and rows < base[k].shape[0]:
            assert len(parts) > 1, f"{k} was not chunked"
        out[k] = torch.cat([p.reshape(-1, *base[k].shape[1:]) for _, p in parts]).reshape(base[k].shape)
    return out


# ---------------------------------------------------------------------------------------------
# The worked example of docs/methods/pcb.md (variant A, r = 0.3)


@pytest.mark.parametrize("split", [False, True], ids=["one_tensor", "two_tensors"])
@pytest.mark.parametrize(("c", "tau"), [(0.01, TAU_C001), (0.1, TAU_C01)])
def test_golden_variant_a(split: bool, c: float, tau: list[float]) -> None:
    base, models = golden_inputs(split)
    out = merge_state_dicts(
        base, models, "pcb", {"keep_ratio": 0.3, "clamp_ratio": c}, compute_dtype=torch.float64
    )
    assert isinstance(out, dict)
    got = flat_golden(out)
    assert got.dtype == F64
    torch.testing.assert_close(got, torch.tensor(tau, dtype=F64), atol=5e-7, rtol=0)


@pytest.mark.parametrize(("c", "weights"), [(0.01, W_C001), (0.1, W_C01)])
def test_golden_weights_and_clamp_from_the_pure_functions(c: float, weights: dict) -> None:
    t = T_GOLDEN
    lo_rank, hi_rank = pcb.clamp_ranks(numel=10, clamp_ratio=c)
    assert (lo_rank, hi_rank) == ((0, 8) if c == 0.01 else (1, 8))
    srt = t.abs().sort(dim=1).values
    lo, hi = srt[:, lo_rank : lo_rank + 1], srt[:, hi_rank : hi_rank + 1]
    a_hat = pcb.clamp_magnitudes(t, lo, hi)
    tc = torch.sign(t) * a_hat
    want_tc = t.clone()
    want_tc[0, 4], want_tc[1, 4], want_tc[2, 9] = 0.6, 0.7, -0.5  # each row's top outlier
    if c == 0.1:
        want_tc[1, 7] = 0.1  # row 1's 0.05 is raised to lo = 0.1 (zeros stay 0: sign(0) = 0)
    torch.testing.assert_close(tc, want_tc, atol=1e-15, rtol=0)
    beta = pcb.competition_scores(t, pcb.unit_magnitudes(a_hat, lo, hi), inter="A")
    thr = beta.sort(dim=1).values[:, pcb.drop_rank(numel=10, keep_ratio=0.3)][:, None]
    w = pcb.drop_weights(beta, thr, beta.amax(dim=1, keepdim=True))
    want = torch.zeros(3, 10, dtype=F64)
    for (i, j), v in weights.items():
        want[i, j] = v
    torch.testing.assert_close(w, want, atol=5e-7, rtol=0)


@pytest.mark.parametrize(("c", "tau", "weights"), [(0.01, TAU_C001, W_C001), (0.1, TAU_C01, W_C01)])
def test_reference_reproduces_the_golden(c: float, tau: list[float], weights: dict) -> None:
    got, w, _ = pcb_vector(T_GOLDEN, keep_ratio=0.3, clamp_ratio=c, lam=[1.0] * 3)
    torch.testing.assert_close(got, torch.tensor(tau, dtype=F64), atol=5e-7, rtol=0)
    for (i, j), v in weights.items():
        assert abs(float(w[i, j]) - v) < 5e-7
    assert int((w > 0).sum()) == len(weights)


def test_keep_count_is_d_minus_floor_minus_one() -> None:
    """docs/methods/pcb.md: only entries strictly above sorted(beta)[floor(D(1-r))] get weight: 99 of 1000."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(4, 1000, generator=g, dtype=F64) * 0.01
    srt = t.abs().sort(dim=1).values
    lo_rank, hi_rank = pcb.clamp_ranks(numel=1000, clamp_ratio=0.01)
    lo, hi = srt[:, lo_rank : lo_rank + 1], srt[:, hi_rank : hi_rank + 1]
    a_hat = pcb.clamp_magnitudes(t, lo, hi)
    beta = pcb.competition_scores(t, pcb.unit_magnitudes(a_hat, lo, hi), inter="A")
    thr = beta.sort(dim=1).values[:, pcb.drop_rank(numel=1000, keep_ratio=0.1)][:, None]
    w = pcb.drop_weights(beta, thr, beta.amax(dim=1, keepdim=True))
    assert (w > 0).sum(dim=1).tolist() == [99] * 4


# ---------------------------------------------------------------------------------------------
# Literal reference on random multi-tensor inputs


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("inter", ["A", "B", "C"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_reference(scope: str, inter: str, dtype: torch.dtype) -> None:
    base, models = random_models(11, 4, dtype)
    params = {
        "keep_ratio": 0.2,
        "clamp_ratio": 0.05,
        "lambda": [1.0, 0.5, 1.5, 0.8],
        "inter": inter,
        "scope": scope,
    }
    got = merge_state_dicts(base, models, "pcb", params, compute_dtype=dtype)
    want = pcb_state_dicts(
        base, models, keep_ratio=0.2, clamp_ratio=0.05, lam=params["lambda"], inter=inter, scope=scope
    )
    tol = 1e-12 if dtype == F64 else 2e-6
    assert_dicts_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_matches_reference_with_defaults(scope: str) -> None:
    base, models = random_models(5, 3, F64)
    got = merge_state_dicts(base, models, "pcb", {"scope": scope}, compute_dtype=F64)
    assert_dicts_close(got, pcb_state_dicts(base, models, scope=scope), atol=1e-12, rtol=1e-12)


def dare_masks(models: list[dict], base: dict, p: float, seed: int) -> list[dict]:
    """The drop masks: dropped where not (u < 1 - p) on the seeded draws of each (tensor, model),
    i.e. DARE's keep rule u < density with density = 1 - p."""
    out = []
    for i in range(len(models)):
        masks = {}
        for k, b in base.items():
            u = uniform(seed, k, i, 0, b.numel(), b.numel()).to(F64)
            masks[k] = (~(u < 1.0 - p)).reshape(b.shape)
        out.append(masks)
    return out


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_dare_pre_processing_matches_reference(scope: str) -> None:
    base, models = random_models(7, 3, F64)
    p, seed = 0.3, 42
    params = {"keep_ratio": 0.3, "dare_drop_rate": p, "scope": scope}
    got = merge_state_dicts(base, models, "pcb", params, seed=seed, compute_dtype=F64)
    drops = dare_masks(models, base, p, seed)
    assert 0.2 < float(torch.cat([m.reshape(-1) for m in drops[0].values()]).double().mean()) < 0.4
    want = pcb_state_dicts(base, models, keep_ratio=0.3, scope=scope, drop=drops, drop_rate=p)
    assert_dicts_close(got, want, atol=1e-12, rtol=1e-12)
    plain = merge_state_dicts(base, models, "pcb", {"keep_ratio": 0.3, "scope": scope}, compute_dtype=F64)
    assert not torch.equal(plain["attn.w"], got["attn.w"])


@pytest.mark.parametrize("inter", ["A", "B", "C"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_per_tensor_scope_is_global_scope_on_each_tensor_alone(inter: str, dtype: torch.dtype) -> None:
    base, models = random_models(13, 3, dtype)
    params = {"keep_ratio": 0.25, "clamp_ratio": 0.05, "inter": inter}
    per = merge_state_dicts(base, models, "pcb", {**params, "scope": "per_tensor"}, compute_dtype=dtype)
    for k in base:
        alone = merge_state_dicts(
            {k: base[k]}, [{k: m[k]} for m in models], "pcb", params, compute_dtype=dtype
        )
        assert torch.equal(per[k], alone[k]), k
    glob = merge_state_dicts(base, models, "pcb", params, compute_dtype=dtype)
    assert not torch.equal(glob["attn.w"], per["attn.w"])  # the scopes do differ


# ---------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("params", [{}, {"inter": "B", "dare_drop_rate": 0.4}, {"inter": "C"}])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_chunked_equals_whole_bit_for_bit(params: dict, dtype: torch.dtype) -> None:
    shapes = {"a": (9, 4), "b": (11,), "c": (5, 2, 3)}
    base, models = random_models(17, 3, dtype, shapes)
    params = {"keep_ratio": 0.3, **params}
    whole = run_driver(base, models, params, rows=None, dtype=dtype, seed=5)
    for rows in (1, 4):
        chunked = run_driver(base, models, params, rows=rows, dtype=dtype, seed=5)
        for k in shapes:
            assert torch.equal(chunked[k], whole[k]), (rows, k)
    api = merge_state_dicts(base, models, "pcb", params, seed=5, compute_dtype=dtype)
    for k in shapes:
        assert torch.equal(api[k], whole[k].to(base[k].dtype))


@pytest.mark.parametrize("inter", ["A", "B", "C"])
@pytest.mark.parametrize("keep_ratio", [1.0, 0.3])
def test_identical_experts_give_the_expert_on_the_kept_entries_and_the_base_elsewhere(
    inter: str, keep_ratio: float
) -> None:
    """n identical task vectors (clamp 0): every row has the same weights, so the weighted mean is
    the task vector itself wherever it is kept; beta grows with |t| in every variant, so the kept
    entries are those with |t| strictly above the floor(D(1-r))-th smallest magnitude (with r = 1,
    all but the smallest)."""
    g = torch.Generator().manual_seed(2)
    d = 24
    mags = (torch.randperm(d, generator=g) + 1).to(F64) / 64  # distinct, non-zero
    t = mags * torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0).to(F64)
    base = {"w": torch.randn(4, 6, generator=g, dtype=F64)}
    expert = {"w": base["w"] + t.reshape(4, 6)}
    out = merge_state_dicts(
        base,
        [expert] * 3,
        "pcb",
        {"keep_ratio": keep_ratio, "clamp_ratio": 0.0, "inter": inter},
        compute_dtype=F64,
    )
    cut = mags.sort().values[math.floor(d * (1 - keep_ratio))]
    kept = (mags > cut).reshape(4, 6)
    assert int(kept.sum()) == d - math.floor(d * (1 - keep_ratio)) - 1
    want = torch.where(kept, expert["w"], base["w"])
    torch.testing.assert_close(out["w"], want, atol=1e-15, rtol=1e-15)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_order_of_models_does_not_matter(scope: str) -> None:
    base, models = random_models(19, 4, F64)
    lam = [1.0, 0.7, 1.3, 0.9]
    params = {"keep_ratio": 0.2, "scope": scope}
    ref = merge_state_dicts(base, models, "pcb", {**params, "lambda": lam}, compute_dtype=F64)
    perm = [2, 0, 3, 1]
    got = merge_state_dicts(
        base,
        [models[i] for i in perm],
        "pcb",
        {**params, "lambda": [lam[i] for i in perm]},
        compute_dtype=F64,
    )
    assert_dicts_close(got, ref, atol=1e-14, rtol=1e-13)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_scalar_lambda_scales_the_merged_task_vector(scope: str) -> None:
    base, models = random_models(23, 3, F64)
    one = merge_state_dicts(base, models, "pcb", {"scope": scope}, compute_dtype=F64)
    two = merge_state_dicts(base, models, "pcb", {"scope": scope, "lambda": 2.0}, compute_dtype=F64)
    for k in base:
        torch.testing.assert_close(two[k] - base[k], 2 * (one[k] - base[k]), atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("inter", ["A", "B", "C"])
def test_all_zero_task_vectors_give_the_base(scope: str, inter: str) -> None:
    base, _ = random_models(29, 1, torch.float32)
    out = merge_state_dicts(base, [dict(base), dict(base)], "pcb", {"scope": scope, "inter": inter})
    for k in base:
        assert torch.equal(out[k], base[k]), k


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("inter", ["A", "B", "C"])
def test_degenerate_rows_are_finite_and_follow_the_documented_guards(scope: str, inter: str) -> None:
    """A zero task vector, a constant one and a normal one together (the reference has the same guards)."""
    base, models = random_models(31, 3, F64)
    models[0] = {k: v.clone() for k, v in base.items()}
    models[1] = {k: v + 0.25 for k, v in base.items()}
    got = merge_state_dicts(base, models, "pcb", {"scope": scope, "inter": inter}, compute_dtype=F64)
    assert all(bool(torch.isfinite(v).all()) for v in got.values())
    want = pcb_state_dicts(base, models, scope=scope, inter=inter)
    assert_dicts_close(got, want, atol=1e-12, rtol=1e-12)


def test_single_element_model_and_scalar_tensor() -> None:
    """D = 1: the hi rank floor(1*(1-c)) - 1 = -1 names the only element (as Python's [-1]); beta's
    max equals the threshold, so W = 0 and the base is kept (both scopes)."""
    base = {"s": torch.tensor(0.5)}
    models = [{"s": torch.tensor(0.75)}, {"s": torch.tensor(1.0)}]
    for scope in ("global", "per_tensor"):
        out = merge_state_dicts(base, models, "pcb", {"scope": scope})
        assert torch.equal(out["s"], base["s"])
    assert pcb.clamp_ranks(numel=1, clamp_ratio=0.01) == (0, 0)


def test_bf16_in_bf16_out() -> None:
    base, models = random_models(37, 3, torch.bfloat16)
    out = merge_state_dicts(base, models, "pcb", {"keep_ratio": 0.3})
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    want = pcb_state_dicts(base, models, keep_ratio=0.3)
    for k in base:
        torch.testing.assert_close(out[k].to(F64), want[k].to(torch.bfloat16).to(F64), atol=0.02, rtol=0.01)


def test_describes_itself() -> None:
    spec = get_method("pcb")
    assert spec.paper == "https://arxiv.org/abs/2410.02396"
    assert {p.name: p.default for p in spec.params} == {
        "keep_ratio": 0.1,
        "clamp_ratio": 0.01,
        "lambda": 1.0,
        "inter": "A",
        "scope": "global",
        "dare_drop_rate": 0.0,
        # LiNeS, an option of every task-vector method (docs/methods/lines.md)
        "lines_alpha": None,
        "lines_beta": 0.0,
        "lines_blocks": None,
    }
    assert spec.is_row_chunkable(resolve_params(spec, {}, 2))
    assert not spec.is_row_chunkable(resolve_params(spec, {"scope": "per_tensor"}, 2))


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"keep_ratio": 0.0}, r"keep_ratio.*\(0, 1\]"),
        ({"keep_ratio": 1.5}, r"keep_ratio.*\(0, 1\]"),
        ({"clamp_ratio": 0.5}, r"clamp_ratio.*\[0, 0.5\)"),
        ({"clamp_ratio": -0.01}, r"clamp_ratio.*\[0, 0.5\)"),
        ({"dare_drop_rate": 1.0}, r"dare_drop_rate.*\[0, 1\)"),
        ({"inter": "D"}, r"inter.*one of \['A', 'B', 'C'\]"),
        ({"scope": "globl"}, r"did you mean 'global'"),
        ({"lambda": [1.0, 2.0]}, r"lambda.*2 values but there are 3 models"),
        ({"keep_rate": 0.2}, r"unknown parameter 'keep_rate'.*did you mean 'keep_ratio'"),
    ],
)
def test_bad_parameters(params: dict, match: str) -> None:
    base, models = random_models(41, 3, torch.float32)
    with pytest.raises(ValueError, match=match):
        merge_state_dicts(base, models, "pcb", params)


def test_bad_types_and_values_name_the_tensor() -> None:
    base, models = random_models(43, 2, torch.float32)
    with pytest.raises(TypeError, match="keep_ratio"):
        merge_state_dicts(base, models, "pcb", {"keep_ratio": "0.1"})
    models[1]["bias"] = models[1]["bias"].clone()
    models[1]["bias"][2] = float("nan")
    for scope in ("global", "per_tensor"):
        with pytest.raises(ValueError, match="'bias'"):
            merge_state_dicts(base, models, "pcb", {"scope": scope})
    models[1]["bias"][2] = float("inf")  # refused in the first sweep; later sweeps do not re-check
    for scope in ("global", "per_tensor"):
        with pytest.raises(ValueError, match=r"tensor 'bias'.*non-finite values \(NaN or infinity\)"):
            merge_state_dicts(base, models, "pcb", {"scope": scope})
    with pytest.raises(ValueError, match="needs a base"):
        merge_state_dicts(None, models, "pcb")
