"""wudi and doge_ta: parity with fusion-bench 0.2.33 (a test-only oracle, float64) at a fixed
number of Adam steps, to the tolerance their docs pages state; properties."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import require
from test_svd_methods import realistic, task_vectors
from weightmerge.api import merge_state_dicts

F64 = torch.float64
WUDI_ATOL = 1e-12  # on merged task vectors whose Adam updates are ~1e-4 (documented in wudi.md)


def wudi_loss(x: torch.Tensor, taus: list[torch.Tensor]) -> float:
    return float(sum(((x - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in taus))


@pytest.mark.parametrize("shapes", [None, {"w.wide": (5, 40), "w.tall": (30, 4)}], ids=["gram", "stacked"])
def test_wudi_matches_fusion_bench(shapes: dict | None) -> None:
    """Both gradient forms: the (n, n) Gram matrix, and the stacked task vectors for n > 2 T m."""
    wudi = require("fusion_bench.method.wudi.wudi")
    base, models = realistic(5, 3, shapes=shapes)
    got = merge_state_dicts(base, models, "wudi", {"steps": 25}, compute_dtype=F64)
    want = wudi.wudi_merging(task_vectors(base, models), accelerator="cpu", iter_num=25)
    for k in base:
        torch.testing.assert_close(got[k] - base[k], want[k].detach(), rtol=0, atol=WUDI_ATOL, msg=k)


def test_wudi_lowers_the_loss_and_zero_steps_is_the_sum() -> None:
    base, models = realistic(6, 3)
    tvs = task_vectors(base, models)
    start = merge_state_dicts(base, models, "wudi", {"steps": 0, "lambda": 0.5}, compute_dtype=F64)
    after = merge_state_dicts(base, models, "wudi", {"steps": 60, "lr": 1e-3}, compute_dtype=F64)
    for k in ("a.wide", "b.tall", "c.sq"):
        taus = [t[k] for t in tvs]
        torch.testing.assert_close(start[k], base[k] + 0.5 * sum(taus), rtol=1e-14, atol=1e-15)
        assert wudi_loss(after[k] - base[k], taus) < 0.9 * wudi_loss(sum(taus), taus), k
    for k in ("d.bias", "e.conv"):
        torch.testing.assert_close(after[k] - base[k], sum(t[k] for t in tvs) / 3, rtol=1e-12, atol=1e-14)


def test_wudi_zero_task_vector_adds_nothing() -> None:
    base, models = realistic(7, 2)
    with_zero = merge_state_dicts(base, [*models, dict(base)], "wudi", {"steps": 10}, compute_dtype=F64)
    without = merge_state_dicts(base, models, "wudi", {"steps": 10}, compute_dtype=F64)
    for k in ("a.wide", "c.sq"):
        torch.testing.assert_close(with_zero[k], without[k], rtol=1e-13, atol=1e-15)
        assert torch.isfinite(with_zero[k]).all()


def test_wudi_stream_equals_in_memory(tmp_path: Path) -> None:
    from test_engine_stream import assert_same, run_case

    got, expected, _ = run_case(tmp_path, "wudi", {"steps": 5, "lr": 1e-4}, ("sharded",))
    assert_same(got, expected)


# ---------------------------------------------------------------------------------------------
# doge_ta

DOGE_SHAPES = {
    "encoder.l0.q.weight": (12, 9),
    "encoder.l0.fc.weight": (7, 15),
    "encoder.l1.o.weight": (10, 10),
}


def as_module(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An nn.Module whose state_dict() is ``sd`` (fusion-bench's algorithm takes modules)."""
    root = torch.nn.Module()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(value.clone()))
    return root


def test_doge_ta_matches_fusion_bench() -> None:
    """fusion-bench runs its fixed 400 steps with its defaults (lamda 0.07, K 30, subspace 6) on
    encoder weight matrices, the only tensors it merges."""
    doge = require("fusion_bench.method.doge_ta.doge_ta")
    base, models = realistic(3, 3, shapes=DOGE_SHAPES)
    pool = {"_pretrained_": as_module(base), **{f"m{i}": as_module(m) for i, m in enumerate(models)}}
    want = doge.DOGE_TA_Algorithm(subspace=6, K=30, lamda=0.07).run(pool).state_dict()
    got = merge_state_dicts(base, models, "doge_ta", compute_dtype=F64)
    for k in base:
        torch.testing.assert_close(got[k], want[k].detach(), rtol=0, atol=1e-12, msg=k)


def test_doge_ta_mask_keeps_int_d_density_plus_one_over_all_matrices() -> None:
    """With no Adam steps the merge is sum_t lam_t tau_t mask_t: the masks can be read off it.
    Non-matrix tensors are averaged and do not count in D."""
    shapes = {**DOGE_SHAPES, "encoder.l0.q.bias": (12,)}
    base, models = realistic(9, 2, shapes=shapes)
    taus = task_vectors(base, models)
    a, b = (models[0], dict(base)), (dict(base), models[1])  # one task at a time: masks separable
    for t, pair in enumerate((a, b)):
        got = merge_state_dicts(base, list(pair), "doge_ta", {"steps": 0, "density": 0.25}, compute_dtype=F64)
        kept = sum(int((got[k] != base[k]).sum()) for k in DOGE_SHAPES)
        d = sum(taus[t][k].numel() for k in DOGE_SHAPES)
        assert kept == int(d * 0.25) + 1
        torch.testing.assert_close(
            got["encoder.l0.q.bias"], base["encoder.l0.q.bias"] + taus[t]["encoder.l0.q.bias"] / 2
        )


def test_doge_ta_stream_equals_in_memory(tmp_path: Path) -> None:
    from test_engine_stream import assert_same, run_case

    got, expected, _ = run_case(tmp_path, "doge_ta", {"steps": 5}, ("sharded",))
    assert_same(got, expected)
