"""regmean: hand-computed 2x2 cases, a numpy fp64 reference, properties, singular systems, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weightmerge.api import merge_state_dicts

T = torch.tensor
F64 = torch.float64


def _merge(models, grams, dtype=F64, **params):
    return merge_state_dicts(None, models, "regmean", {"gram": grams, **params}, compute_dtype=dtype)


def _gram(g: torch.Generator, d: int, rows: int | None = None) -> torch.Tensor:
    x = torch.randn(rows or 3 * d, d, generator=g, dtype=F64)
    return x.T @ x / x.shape[0]


def _random_case(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = {"fc1.weight": (6, 4), "fc1.bias": (6,), "fc2.weight": (3, 6), "norm.weight": (3,)}
    models = [{k: torch.randn(s, generator=g, dtype=F64) for k, s in shapes.items()} for _ in range(n)]
    grams = [{"fc1": _gram(g, 4), "fc2": _gram(g, 6)} for _ in range(n)]
    return models, grams


def reference_regmean(weights, grams, alpha: float) -> np.ndarray:
    """numpy fp64, explicit inverse, from spec section 11. weights: [(out, in)], grams: [(in, in)]."""
    gs = []
    for g in grams:
        g = np.asarray(g, dtype=np.float64)
        gs.append(alpha * g + (1.0 - alpha) * np.diag(np.diag(g)))
    total = sum(gs)
    rhs = sum(gi @ np.asarray(w, dtype=np.float64).T for gi, w in zip(gs, weights, strict=True))
    return (np.linalg.inv(total) @ rhs).T


# ---------------------------------------------------------------- hand-computed


def test_hand_computed_diagonal_grams():
    # diagonal Grams: each input column j is a G_jj-weighted average of the models' columns
    m1 = {"l.weight": T([[1.0, 2.0], [3.0, 4.0]]), "l.bias": T([1.0, 0.0])}
    m2 = {"l.weight": T([[5.0, 6.0], [7.0, 8.0]]), "l.bias": T([3.0, 2.0])}
    grams = [{"l": T([[1.0, 0.0], [0.0, 3.0]])}, {"l": T([[3.0, 0.0], [0.0, 1.0]])}]
    out = _merge([m1, m2], grams)
    # col 0: (1*[1,3] + 3*[5,7])/4 = [4, 6]; col 1: (3*[2,4] + 1*[6,8])/4 = [3, 5]
    torch.testing.assert_close(out["l.weight"], T([[4.0, 3.0], [6.0, 5.0]]), rtol=0, atol=1e-14)
    torch.testing.assert_close(out["l.bias"], T([2.0, 1.0]))  # plain average


def test_hand_computed_full_gram_and_alpha():
    m1 = {"l.weight": torch.eye(2, dtype=F64)}
    m2 = {"l.weight": torch.zeros(2, 2, dtype=F64)}
    grams = [{"l": T([[2.0, 1.0], [1.0, 2.0]])}, {"l": torch.eye(2)}]
    # S = [[3,1],[1,3]], S^-1 = [[3,-1],[-1,3]]/8, W^T = S^-1 G1 = [[5,1],[1,5]]/8
    out = _merge([m1, m2], grams)
    torch.testing.assert_close(
        out["l.weight"], T([[5.0, 1.0], [1.0, 5.0]], dtype=F64) / 8, rtol=0, atol=1e-15
    )
    # alpha = 0.5: G1' = [[2,.5],[.5,2]], S = [[3,.5],[.5,3]] (det 8.75), W^T = [[5.75,.5],[.5,5.75]]/8.75
    out = _merge([m1, m2], grams, reduce_non_diagonal_ratio=0.5)
    want = T([[5.75, 0.5], [0.5, 5.75]], dtype=F64) / 8.75
    torch.testing.assert_close(out["l.weight"], want, rtol=0, atol=1e-15)
    # alpha = 0: diagonal only -> column-wise weighted average with weights 2:1 -> [[2/3, 0], [0, 2/3]]
    out = _merge([m1, m2], grams, reduce_non_diagonal_ratio=0.0)
    torch.testing.assert_close(out["l.weight"], torch.eye(2, dtype=F64) * 2 / 3, rtol=0, atol=1e-15)


def test_non_square_weight_uses_input_side():
    # W (out=1 x in=2); Grams 2x2 diagonal -> per-input weighted average
    m1 = {"l.weight": T([[2.0, 0.0]])}
    m2 = {"l.weight": T([[0.0, 4.0]])}
    grams = [{"l": T([[3.0, 0.0], [0.0, 1.0]])}, {"l": T([[1.0, 0.0], [0.0, 1.0]])}]
    out = _merge([m1, m2], grams)
    torch.testing.assert_close(out["l.weight"], T([[1.5, 2.0]]), rtol=0, atol=1e-15)


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.25])
@pytest.mark.parametrize("n", [2, 4])
def test_matches_numpy_reference(alpha: float, n: int):
    models, grams = _random_case(n, seed=n)
    got = _merge(models, grams, reduce_non_diagonal_ratio=alpha)
    for mod in ("fc1", "fc2"):
        want = reference_regmean(
            [m[f"{mod}.weight"].numpy() for m in models], [g[mod].numpy() for g in grams], alpha
        )
        np.testing.assert_allclose(got[f"{mod}.weight"].numpy(), want, rtol=1e-10, atol=1e-10)
    for k in ("fc1.bias", "norm.weight"):
        want_avg = np.mean([m[k].numpy() for m in models], axis=0)
        np.testing.assert_allclose(got[k].numpy(), want_avg, rtol=1e-14, atol=1e-14)


def test_float32_close_to_reference():
    models, grams = _random_case(3, seed=30)
    m32 = [{k: v.float() for k, v in m.items()} for m in models]
    got = merge_state_dicts(None, m32, "regmean", {"gram": grams})
    want = reference_regmean(
        [m["fc2.weight"].numpy() for m in models], [g["fc2"].numpy() for g in grams], 1.0
    )
    assert got["fc2.weight"].dtype == torch.float32
    np.testing.assert_allclose(got["fc2.weight"].double().numpy(), want, rtol=1e-4, atol=1e-5)


def test_solution_satisfies_normal_equations():
    # the least-squares optimum: sum_i G_i (W_m^T - W_i^T) = 0
    models, grams = _random_case(3, seed=31)
    out = _merge(models, grams)
    resid = sum(
        g["fc1"] @ (out["fc1.weight"] - m["fc1.weight"]).T for g, m in zip(grams, models, strict=True)
    )
    assert float(resid.abs().max()) < 1e-12


def test_weight_transpose_false_is_the_in_out_layout():
    models, grams = _random_case(2, seed=32)
    a = _merge(models, grams)
    tmodels = [{**m, "fc1.weight": m["fc1.weight"].T.contiguous()} for m in models]
    b = _merge(tmodels, [{"fc1": g["fc1"]} for g in grams], weight_transpose=False)
    torch.testing.assert_close(b["fc1.weight"], a["fc1.weight"].T, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------- properties


def test_identical_models_give_the_model():
    models, grams = _random_case(3, seed=40)
    out = _merge([models[0]] * 3, grams)
    for k, v in models[0].items():
        torch.testing.assert_close(out[k], v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("same", ["identity", "shared"])
def test_equal_grams_give_the_average(same: str):
    models, grams = _random_case(3, seed=41)
    if same == "identity":
        grams = [{"fc1": torch.eye(4, dtype=F64), "fc2": torch.eye(6, dtype=F64)}] * 3
    else:
        grams = [grams[0]] * 3
    out = _merge(models, grams)
    for k in models[0]:
        avg = sum(m[k] for m in models) / 3
        torch.testing.assert_close(out[k], avg, rtol=1e-12, atol=1e-12)


def test_model_order_invariance():
    models, grams = _random_case(4, seed=42)
    perm = [3, 1, 0, 2]
    a = _merge(models, grams, reduce_non_diagonal_ratio=0.7)
    b = _merge([models[i] for i in perm], [grams[i] for i in perm], reduce_non_diagonal_ratio=0.7)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)


def test_modules_without_gram_are_averaged():
    models, grams = _random_case(2, seed=43)
    out = _merge(models, [{"fc1": g["fc1"]} for g in grams])
    torch.testing.assert_close(out["fc2.weight"], (models[0]["fc2.weight"] + models[1]["fc2.weight"]) / 2)


# ---------------------------------------------------------------- singular systems


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dead_input_feature_keeps_the_average(dtype: torch.dtype):
    # input 2 is never active in any model: its Gram row/column is zero -> singular sum
    g = torch.Generator().manual_seed(50)
    models, grams = [], []
    for _ in range(2):
        models.append({"l.weight": torch.randn(3, 3, generator=g, dtype=F64)})
        x = torch.randn(12, 3, generator=g, dtype=F64)
        x[:, 2] = 0
        grams.append({"l": x.T @ x / 12})
    out = _merge(models, grams, dtype=dtype)["l.weight"].double()
    assert bool(torch.isfinite(out).all())
    avg = (models[0]["l.weight"] + models[1]["l.weight"]) / 2
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out[:, 2], avg[:, 2], rtol=tol, atol=tol)
    # the live inputs solve the 2x2 sub-problem (numpy reference on the sub-matrices)
    sub = reference_regmean(
        [m["l.weight"][:, :2].numpy() for m in models], [gm["l"][:2, :2].numpy() for gm in grams], 1.0
    )
    np.testing.assert_allclose(out[:, :2].numpy(), sub, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_gram_is_finite_and_optimal(dtype: torch.dtype):
    # fewer samples than inputs: rank 3 of 8, for both models with the same inputs
    g = torch.Generator().manual_seed(51)
    x = torch.randn(3, 8, generator=g, dtype=F64)
    gram = x.T @ x / 3
    models = [{"l.weight": torch.randn(4, 8, generator=g, dtype=F64)} for _ in range(2)]
    out = _merge(models, [{"l": gram}, {"l": gram * 2}], dtype=dtype)["l.weight"].double()
    assert bool(torch.isfinite(out).all())
    resid = gram @ (out - models[0]["l.weight"]).T + 2 * gram @ (out - models[1]["l.weight"]).T
    assert float(resid.abs().max()) < (1e-4 if dtype == torch.float32 else 1e-10)
    # null-space component = that of the plain average
    _, vecs = torch.linalg.eigh(gram)
    null = vecs[:, :5]  # the 5 zero eigenvalues come first
    avg = (models[0]["l.weight"] + models[1]["l.weight"]) / 2
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out @ null, avg @ null, rtol=tol, atol=tol)


def test_all_zero_grams_give_the_average():
    models, _ = _random_case(2, seed=52)
    zeros = [{"fc1": torch.zeros(4, 4), "fc2": torch.zeros(6, 6)}] * 2
    out = _merge(models, zeros)
    for k in models[0]:
        torch.testing.assert_close(out[k], (models[0][k] + models[1][k]) / 2, rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------- bad input


def test_missing_gram_for_one_model():
    models, grams = _random_case(3, seed=60)
    del grams[1]["fc2"]
    with pytest.raises(
        ValueError, match=r"module 'fc2' \(tensor 'fc2\.weight'\) missing for model\(s\) \[1\]"
    ):
        _merge(models, grams)


def test_gram_size_mismatch():
    models, grams = _random_case(2, seed=61)
    grams[0]["fc1"] = grams[1]["fc1"] = torch.eye(6, dtype=F64)
    with pytest.raises(ValueError, match=r"module 'fc1' is \(6, 6\).*has 4 inputs"):
        _merge(models, grams)


def test_gram_shapes_differ_between_models_or_not_square():
    models, grams = _random_case(2, seed=62)
    grams[1]["fc1"] = torch.eye(5, dtype=F64)
    with pytest.raises(ValueError, match=r"module 'fc1' for model 1 has shape \(5, 5\)"):
        _merge(models, grams)
    grams[1]["fc1"] = torch.ones(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="square"):
        _merge(models, grams)


def test_gram_for_a_1d_tensor():
    models, grams = _random_case(2, seed=63)
    for gd in grams:
        gd["norm"] = torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match=r"tensor 'norm\.weight' has shape \(3,\)"):
        _merge(models, grams)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval(alpha: float):
    models, grams = _random_case(2, seed=64)
    with pytest.raises(ValueError, match=r"'reduce_non_diagonal_ratio'.*must be in \[0, 1\]"):
        _merge(models, grams, reduce_non_diagonal_ratio=alpha)


def test_parameter_name_keys_are_rejected():
    models, grams = _random_case(2, seed=65)
    bad = [{"fc1.weight": g["fc1"]} for g in grams]
    with pytest.raises(ValueError, match=r"keyed by module name \('fc1'\)"):
        _merge(models, bad)


def test_non_finite_gram_and_wrong_count():
    models, grams = _random_case(2, seed=66)
    grams[0]["fc2"] = grams[0]["fc2"].clone()
    grams[0]["fc2"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"module 'fc2' contains NaN"):
        _merge(models, grams)
    with pytest.raises(ValueError, match=r"'gram' has 1 entries but there are 2 models"):
        _merge(models, grams[:1])
