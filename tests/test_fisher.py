"""fisher: hand-computed cases, a literal fp64 reference, properties, chunking, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from weightmerge.api import merge_state_dicts
from weightmerge.engine.driver import MergeInputs, run_merge
from weightmerge.methods._params import resolve_params
from weightmerge.methods.aux import gather_aux
from weightmerge.methods.fisher import SPEC

T = torch.tensor


def _merge(models, fisher, **params):
    return merge_state_dicts(
        None, models, "fisher", {"fisher": fisher, **params}, compute_dtype=torch.float64
    )


def _random_case(n: int, seed: int, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a.weight": (5, 4), "a.bias": (5,), "b.weight": (3, 7), "scale": ()}
    models = [
        {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()} for _ in range(n)
    ]
    fisher = [
        {k: torch.rand(s, generator=g, dtype=torch.float64) ** 3 * 10.0 ** (i - 1) for k, s in shapes.items()}
        for i in range(n)
    ]
    return models, fisher


def reference_fisher(models, fisher, weights, *, normalize: bool, eps: float):
    """Literal fp64 transcription of spec section 10, one element at a time."""
    n = len(models)
    s = [float(w) for w in weights]
    if normalize:
        norms = [math.sqrt(sum(float(v) ** 2 for t in f.values() for v in t.reshape(-1))) for f in fisher]
        inv = [1.0 / (nm + eps) for nm in norms]
        s = [s[i] * inv[i] / sum(inv) for i in range(n)]
    out = {}
    for name in models[0]:
        flat = [m[name].reshape(-1).tolist() for m in models]
        ff = [f[name].reshape(-1).tolist() for f in fisher]
        vals = []
        for p in range(len(flat[0])):
            num = sum(s[i] * (ff[i][p] + eps) * flat[i][p] for i in range(n))
            den = sum(s[i] * (ff[i][p] + eps) for i in range(n))
            vals.append(num / den)
        out[name] = torch.tensor(vals, dtype=torch.float64).reshape(models[0][name].shape)
    return out


# ---------------------------------------------------------------- hand-computed


def test_hand_computed_unnormalised():
    m1 = {"w": T([1.0, 2.0])}
    m2 = {"w": T([3.0, 6.0])}
    f = [{"w": T([1.0, 3.0])}, {"w": T([3.0, 1.0])}]
    out = _merge([m1, m2], f, normalize_fisher_weight=False, minimal_fisher_weight=0.0)
    # (1*1 + 3*3)/4 = 2.5 ; (3*2 + 1*6)/4 = 3
    assert torch.equal(out["w"], T([2.5, 3.0]))
    out = _merge([m1, m2], f, weight=[1.0, 3.0], normalize_fisher_weight=False, minimal_fisher_weight=0.0)
    # (1*1*1 + 3*3*3)/(1 + 9) = 2.8 ; (1*3*2 + 3*1*6)/(3 + 3) = 4
    torch.testing.assert_close(out["w"], T([2.8, 4.0]), rtol=0, atol=1e-15)


def test_hand_computed_normalised_global_norm():
    # ||F_1|| = ||(3, 4)|| = 5 over two tensors; ||F_2|| = ||(6, 8)|| = 10 -> s = (2/3, 1/3),
    # so s_i F_i is equal for both models and the result is the plain average.
    m1 = {"a": T([0.0]), "b": T([0.0])}
    m2 = {"a": T([3.0]), "b": T([6.0])}
    f = [{"a": T([3.0]), "b": T([4.0])}, {"a": T([6.0]), "b": T([8.0])}]
    out = _merge([m1, m2], f, minimal_fisher_weight=0.0)
    torch.testing.assert_close(out["a"], T([1.5]), rtol=0, atol=1e-15)
    torch.testing.assert_close(out["b"], T([3.0]), rtol=0, atol=1e-15)
    # without normalisation: a = 6*3/9 = 2, b = 8*6/12 = 4
    out = _merge([m1, m2], f, minimal_fisher_weight=0.0, normalize_fisher_weight=False)
    torch.testing.assert_close(out["a"], T([2.0]), rtol=0, atol=1e-15)
    torch.testing.assert_close(out["b"], T([4.0]), rtol=0, atol=1e-15)


def test_default_eps_is_added():
    # F = 0 for model 1, F = 1e-6 for model 2, eps 1e-6: weights 1e-6 and 2e-6 -> (0 + 2*3)/3 = 2
    out = _merge(
        [{"w": T([0.0])}, {"w": T([3.0])}],
        [{"w": T([0.0])}, {"w": T([1e-6])}],
        normalize_fisher_weight=False,
    )
    torch.testing.assert_close(out["w"], T([2.0]), rtol=1e-12, atol=0)


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n", [2, 3])
def test_matches_literal_reference(normalize: bool, n: int):
    models, fisher = _random_case(n, seed=10 + n)
    weights = [0.3, 1.7, 0.9][:n]
    got = _merge(models, fisher, weight=weights, normalize_fisher_weight=normalize)
    want = reference_fisher(models, fisher, weights, normalize=normalize, eps=1e-6)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)


def test_float32_compute_close_to_reference():
    models, fisher = _random_case(3, seed=3)
    models32 = [{k: v.float() for k, v in m.items()} for m in models]
    got = merge_state_dicts(None, models32, "fisher", {"fisher": fisher})
    want = reference_fisher(models, fisher, [1, 1, 1], normalize=True, eps=1e-6)
    for k in want:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- properties


def test_identical_models_give_the_model():
    models, fisher = _random_case(3, seed=5)
    same = [models[0]] * 3
    out = _merge(same, fisher)
    for k, v in models[0].items():
        torch.testing.assert_close(out[k], v, rtol=1e-14, atol=1e-14)


def test_equal_fisher_is_simple_average():
    models, fisher = _random_case(3, seed=6)
    equal = [fisher[1]] * 3
    out = _merge(models, equal)
    for k in models[0]:
        avg = (models[0][k] + models[1][k] + models[2][k]) / 3
        torch.testing.assert_close(out[k], avg, rtol=1e-13, atol=1e-13)


def test_model_order_invariance():
    models, fisher = _random_case(3, seed=7)
    w = [0.5, 1.0, 2.0]
    perm = [2, 0, 1]
    a = _merge(models, fisher, weight=w)
    b = _merge([models[i] for i in perm], [fisher[i] for i in perm], weight=[w[i] for i in perm])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-13, atol=1e-13)


def test_scaling_all_weights_changes_nothing():
    models, fisher = _random_case(2, seed=8)
    a = _merge(models, fisher, weight=[1.0, 2.0], normalize_fisher_weight=False)
    b = _merge(models, fisher, weight=[10.0, 20.0], normalize_fisher_weight=False)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-13, atol=1e-13)


def test_result_between_min_and_max():
    models, fisher = _random_case(4, seed=9)
    out = _merge(models, fisher)
    for k in out:
        stack = torch.stack([m[k] for m in models])
        assert bool((out[k] >= stack.amin(0) - 1e-12).all())
        assert bool((out[k] <= stack.amax(0) + 1e-12).all())


def _run_driver(models, fisher, params, chunk_rows):
    n = len(models)
    resolved = resolve_params(SPEC, {"fisher": fisher, **params}, n)
    SPEC.check(resolved, n)
    names = sorted(models[0])
    out: dict[str, list[tuple[object, torch.Tensor]]] = {}

    def reader(sd):
        return lambda name, rows: sd[name] if rows is None else sd[name][rows[0] : rows[1]]

    inp = MergeInputs(
        names=names,
        shapes={k: tuple(models[0][k].shape) for k in names},
        base=None,
        models=[reader(m) for m in models],
        params_for=lambda _n: resolved,
        model_params=resolved,
        chunk_rows=lambda _n: chunk_rows,
        aux=lambda name, rows: gather_aux(SPEC, resolved, name, rows, models[0][name].shape, torch.float32),
    )
    outcome = run_merge(inp, SPEC, lambda name, rows, t: out.setdefault(name, []).append((rows, t)))
    return {k: torch.cat([t for _, t in v]) if len(v) > 1 else v[0][1] for k, v in out.items()}, out, outcome


@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_equals_whole(normalize: bool):
    shapes = {"big.weight": (11, 6), "vec": (9,), "s": ()}
    models, fisher = _random_case(3, seed=11, shapes=shapes)
    models = [{k: v.float() for k, v in m.items()} for m in models]
    params = {"normalize_fisher_weight": normalize}
    whole, _, o1 = _run_driver(models, fisher, params, None)
    chunked, raw, o2 = _run_driver(models, fisher, params, 3)
    assert len(raw["big.weight"]) == 4  # really chunked: rows 0-3, 3-6, 6-9, 9-11
    for k in whole:
        assert torch.equal(whole[k], chunked[k]), k
    if normalize:
        assert torch.equal(o1.stats["fisher_sq_sum"], o2.stats["fisher_sq_sum"])
        want = torch.tensor([sum(float((f[k] ** 2).sum()) for k in shapes) for f in fisher])
        torch.testing.assert_close(o1.stats["fisher_sq_sum"], want.double(), rtol=1e-6, atol=0)
    api = merge_state_dicts(None, models, "fisher", {"fisher": fisher, **params})
    for k in whole:
        assert torch.equal(whole[k], api[k]), k


# ---------------------------------------------------------------- degenerate and bad input


def test_zero_eps_zero_fisher_falls_back_to_weighted_average():
    out = _merge(
        [{"w": T([1.0, 1.0])}, {"w": T([4.0, 3.0])}],
        [{"w": T([0.0, 1.0])}, {"w": T([0.0, 1.0])}],
        weight=[2.0, 1.0],
        minimal_fisher_weight=0.0,
        normalize_fisher_weight=False,
    )
    # element 0: Fisher 0 everywhere -> (2*1 + 1*4)/3 = 2 ; element 1: (2*1 + 3)/3 = 5/3
    torch.testing.assert_close(out["w"], T([2.0, 5.0 / 3.0]), rtol=0, atol=1e-15)
    assert bool(torch.isfinite(out["w"]).all())


def test_normalise_with_all_zero_fisher_and_zero_eps_is_an_error():
    with pytest.raises(ValueError, match=r"all-zero Fisher for model\(s\) \[1\]"):
        _merge(
            [{"w": T([1.0])}, {"w": T([2.0])}],
            [{"w": T([1.0])}, {"w": T([0.0])}],
            minimal_fisher_weight=0.0,
        )


def test_missing_fisher_for_one_model_names_tensor_and_model():
    models, fisher = _random_case(3, seed=12)
    del fisher[2]["a.bias"]
    with pytest.raises(ValueError, match=r"'a\.bias'.*model\(s\) \[2\]"):
        _merge(models, fisher)


def test_missing_fisher_for_every_model():
    models, fisher = _random_case(2, seed=13)
    for f in fisher:
        del f["scale"]
    with pytest.raises(ValueError, match=r"no Fisher statistics for tensor 'scale'"):
        _merge(models, fisher)
    out = _merge(models, fisher, missing_fisher="average", weight=[1.0, 3.0], normalize_fisher_weight=False)
    torch.testing.assert_close(out["scale"], (models[0]["scale"] + 3 * models[1]["scale"]) / 4)
    # with normalisation the coefficients are s_i / ||F_i|| (norm over the tensors that have a Fisher)
    out = _merge(models, fisher, missing_fisher="average", weight=[1.0, 3.0], minimal_fisher_weight=0.0)
    norms = [math.sqrt(sum(float((t**2).sum()) for t in f.values())) for f in fisher]
    c = [1.0 / norms[0], 3.0 / norms[1]]
    want = (c[0] * models[0]["scale"] + c[1] * models[1]["scale"]) / (c[0] + c[1])
    torch.testing.assert_close(out["scale"], want, rtol=1e-12, atol=1e-12)
    excl = merge_state_dicts(
        None, models, "fisher", {"fisher": fisher, "exclude": ["^scale$"]}, compute_dtype=torch.float64
    )
    assert torch.equal(excl["scale"], models[0]["scale"])  # copied from the reference model


def test_fisher_shape_mismatch():
    models, fisher = _random_case(2, seed=14)
    fisher[1]["a.weight"] = fisher[1]["a.weight"].T.contiguous()
    with pytest.raises(ValueError, match=r"'a\.weight' of model 1 have shape \(4, 5\)"):
        _merge(models, fisher)


def test_wrong_number_of_fisher_dicts():
    models, fisher = _random_case(3, seed=15)
    with pytest.raises(ValueError, match=r"'fisher' has 2 entries but there are 3 models"):
        _merge(models, fisher[:2])


def test_fisher_required_and_typed():
    models, fisher = _random_case(2, seed=16)
    with pytest.raises(ValueError, match="needs parameter 'fisher'"):
        merge_state_dicts(None, models, "fisher", {})
    with pytest.raises(TypeError, match="list with one dict"):
        _merge(models, fisher[0])
    with pytest.raises(TypeError, match=r"not a torch\.Tensor"):
        _merge(models, [{"a.weight": [1.0]}, fisher[1]])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_invalid_fisher_values(bad: float):
    f = [{"w": T([1.0, bad])}, {"w": T([1.0, 1.0])}]
    with pytest.raises(ValueError, match=r"tensor 'w'"):
        _merge([{"w": T([1.0, 2.0])}, {"w": T([1.0, 2.0])}], f)


def test_bad_weights():
    models, fisher = _random_case(2, seed=17)
    with pytest.raises(ValueError, match="sum to 0"):
        _merge(models, fisher, weight=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"'weight'.*must be in"):
        _merge(models, fisher, weight=[-1.0, 2.0])
    with pytest.raises(ValueError, match=r"'minimal_fisher_weight'.*must be in"):
        _merge(models, fisher, minimal_fisher_weight=-1e-6)
