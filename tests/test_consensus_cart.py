"""consensus_ta (fusion-bench 0.2.33's flat-vector TALL-mask utilities as a test-only oracle, a hand
example) and cart (a slow literal reference written from the paper)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import require
from test_svd_methods import realistic, task_vectors
from weightmerge.api import merge_state_dicts

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# consensus_ta


def test_consensus_hand_example() -> None:
    # three tasks, five weights; S = sum, mask_lambda 0.6
    tau = torch.tensor(
        [
            [1.0, 0.0, 0.5, -1.0, 0.2],
            [1.0, 0.0, -0.5, 0.1, 0.2],
            [0.0, 0.0, 0.1, 0.1, 0.2],
        ],
        dtype=F64,
    )
    # S = [2, 0, 0.1, -0.8, 0.6]; |S - tau_t|:
    #   t0: [1, 0, 0.4, 0.2, 0.4]   -> m0 = |tau0| > 0.6 * that = [1, 0, 1, 1, 0]   (0.2 > 0.24 false)
    #   t1: [1, 0, 0.6, 0.9, 0.4]   -> m1 = [1, 0, 1, 0, 0]                          (0.1 > 0.54 false)
    #   t2: [2, 0, 0.0, 0.9, 0.4]   -> m2 = [0, 0, 1, 0, 0]                          (0.1 > 0 true)
    # counts [2, 0, 3, 1, 0] -> k = 2 keeps weights 0 and 2
    base = {"w": torch.zeros(5, dtype=F64)}
    models = [{"w": tau[t].clone()} for t in range(3)]
    out = merge_state_dicts(base, models, "consensus_ta", {"lambda": 0.5}, compute_dtype=F64)
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 0.0, 0.05, 0.0, 0.0], dtype=F64))
    out = merge_state_dicts(base, models, "consensus_ta", {"lambda": 1.0, "k": 1}, compute_dtype=F64)
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 0.0, 0.1, -0.8, 0.0], dtype=F64))


@pytest.mark.parametrize(("n", "mask_lambda", "k"), [(3, 0.6, 2), (4, 0.4, 2), (4, 0.6, 3), (2, 0.6, 2)])
def test_consensus_matches_fusion_bench_flat_utilities(n: int, mask_lambda: float, k: int) -> None:
    utils = require("fusion_bench.method.tall_mask.utils")
    base, models = realistic(80 + n, n)
    lam = 0.4
    got = merge_state_dicts(
        base, models, "consensus_ta", {"lambda": lam, "mask_lambda": mask_lambda, "k": k}, compute_dtype=F64
    )
    keys = sorted(base)
    flat = lambda sd: torch.cat([sd[key].reshape(-1) for key in keys])  # noqa: E731
    tv = torch.stack([flat(tv) for tv in task_vectors(base, models)])
    ft = torch.stack([flat(m) for m in models])
    masks = utils.generate_task_masks(tv, ft, flat(base), tall_mask_lambda=mask_lambda)
    consensus = masks.sum(dim=0) >= k
    want = flat(base) + lam * (consensus * tv.sum(dim=0))  # (lam * bool) would be float32
    assert 0 < int(consensus.sum()) < consensus.numel()  # a case where the mask matters
    torch.testing.assert_close(flat(got), want, rtol=1e-12, atol=1e-14)


def test_consensus_k_zero_is_task_arithmetic_and_large_k_the_base() -> None:
    base, models = realistic(91, 3)
    ta = merge_state_dicts(base, models, "task_arithmetic", {"lambda": 0.3}, compute_dtype=F64)
    got = merge_state_dicts(base, models, "consensus_ta", {"lambda": 0.3, "k": 0}, compute_dtype=F64)
    for key in base:
        torch.testing.assert_close(got[key], ta[key], rtol=1e-14, atol=1e-15)
    got = merge_state_dicts(base, models, "consensus_ta", {"k": 4}, compute_dtype=F64)
    for key in base:
        assert torch.equal(got[key], base[key])


def test_consensus_bad_input_names_the_tensor() -> None:
    base, models = realistic(92, 2)
    models[0]["c.sq"][1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"c\.sq"):
        merge_state_dicts(base, models, "consensus_ta")


# ---------------------------------------------------------------------------------------------
# cart


def cart_literal(models: list[dict], *, rank_ratio: float, prior: float) -> dict:
    """The paper's formula written out: theta_avg + prior * sum_t sum_{i<r} s_i u_i v_i^T of the
    centred task vector theta_t - theta_avg, float64, one outer product at a time."""
    out = {}
    for key in models[0]:
        ws = [m[key].to(F64) for m in models]
        avg = sum(ws) / len(ws)
        if avg.dim() != 2:
            out[key] = avg
            continue
        r = int(rank_ratio * min(avg.shape))
        total = torch.zeros_like(avg)
        for w in ws:
            u, s, vh = torch.linalg.svd(w - avg, full_matrices=False)
            for i in range(r):
                total += s[i] * torch.outer(u[:, i], vh[i])
        out[key] = avg + prior * total
    return out


@pytest.mark.parametrize(("n", "rank_ratio", "prior"), [(2, 0.12, 2.0), (3, 0.3, 2.0), (4, 0.5, 1.3)])
def test_cart_matches_literal_reference(n: int, rank_ratio: float, prior: float) -> None:
    base, models = realistic(100 + n, n)
    got = merge_state_dicts(
        base, models, "cart", {"rank_ratio": rank_ratio, "prior": prior}, compute_dtype=F64
    )
    want = cart_literal(models, rank_ratio=rank_ratio, prior=prior)
    for key in base:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12, msg=key)
    if rank_ratio * 7 >= 1:  # every matrix has r >= 1: the result is not the average
        avg = sum(m["c.sq"] for m in models) / n
        assert not torch.allclose(got["c.sq"], avg)


def test_cart_full_rank_or_zero_prior_is_the_average() -> None:
    base, models = realistic(111, 3)
    avg = {k: sum(m[k] for m in models) / 3 for k in base}
    for params in ({"rank_ratio": 1.0}, {"prior": 0.0}, {"rank_ratio": 0.0}):
        got = merge_state_dicts(None, models, "cart", params, compute_dtype=F64)
        for key in base:
            torch.testing.assert_close(got[key], avg[key], rtol=1e-10, atol=1e-12)


def test_cart_float32_close_to_float64() -> None:
    base, models = realistic(112, 3, torch.float32)
    f32 = merge_state_dicts(base, models, "cart", compute_dtype=torch.float32)
    f64 = merge_state_dicts(base, models, "cart", compute_dtype=F64)
    for key in base:
        torch.testing.assert_close(f32[key].to(F64), f64[key].to(F64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "params"), [("consensus_ta", {"lambda": 0.5}), ("cart", {"rank_ratio": 0.3})]
)
def test_stream_equals_in_memory(tmp_path: Path, method: str, params: dict) -> None:
    from test_engine_stream import assert_same, run_case

    got, expected, _ = run_case(tmp_path, method, params, ("sharded", "single"))
    assert_same(got, expected)
