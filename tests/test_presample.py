"""Order statistics whose sample is built from values captured in an earlier pass
(``SampleCapture`` + ``OrderStat.presample``): exact whatever the presample, and PCB's global
threshold found that way (one sweep fewer) gives the same bits as sampling it by a sweep."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from weightmerge import merge_state_dicts
from weightmerge.engine import driver
from weightmerge.engine.select import SampleSelect


def _pieces(values: torch.Tensor, splits: list[int]) -> list[torch.Tensor]:
    d = values.shape[1]
    cuts = [0, *sorted(set(s for s in splits if 0 < s < d)), d]
    return [values[:, a:b] for a, b in itertools.pairwise(cuts)]


def _kth(values: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    return torch.stack([torch.kthvalue(values[i], r + 1).values for i, r in enumerate(ranks)]) + 0.0


def _gather_with(
    sample: torch.Tensor, values: torch.Tensor, ranks: list[int], splits: list[int]
) -> torch.Tensor:
    n, d = values.shape
    sel = SampleSelect(n, d)
    sel.install_sample(sample, d)
    sel.set_ranks(torch.tensor(ranks))
    for p in _pieces(values, splits):
        sel.add_gather(p)
    return sel.finish()


@pytest.mark.parametrize("d", [7, 1000, 200_000])
def test_captured_columns_give_the_sweep_sample(d):
    gen = torch.Generator().manual_seed(d)
    t = torch.randn(3, d, generator=gen)
    splits = [d // 3, d // 2 + 1]
    cap, swept = SampleSelect(3, d), SampleSelect(3, d)
    for p in _pieces(t, splits):
        cap.add_sample(p, check=False)
    for p in _pieces(t.abs(), [d // 5]):  # another chunking: the positions do not depend on it
        swept.add_sample(p)
    # the capture keeps the same columns, so |captured| is the sample a sweep of |t| keeps
    assert torch.equal(cap.captured().abs(), swept.captured())
    ranks = [0, d // 2, d - 1]
    got = _gather_with(cap.captured().abs(), t.abs(), ranks, splits)
    assert torch.equal(got, _kth(t.abs(), ranks))


@pytest.mark.parametrize("kind", ["random", "constant", "far_off"])
def test_any_presample_gives_the_exact_answer_or_reports_a_miss(kind):
    """The presample only places the window: a poor one can miss (NaN: the driver falls back),
    it can never give a wrong value."""
    gen = torch.Generator().manual_seed(1)
    d = 50_000
    values = torch.randn(2, d, generator=gen)
    k = SampleSelect(2, d).sample_len
    sample = {
        "random": torch.randn(2, k, generator=gen),  # other draws of the same distribution
        "constant": torch.zeros(2, k),
        "far_off": torch.full((2, k), 100.0),
    }[kind]
    ranks = [d // 10, d // 2]
    got = _gather_with(sample, values, ranks, [123, 40_000])
    ref = _kth(values, ranks)
    for i in range(2):
        assert math.isnan(got[i]) or got[i] == ref[i]
    if kind == "random":
        assert not bool(torch.isnan(got).any())


def test_install_sample_checks():
    sel = SampleSelect(2, 100)
    with pytest.raises(ValueError, match="presample of shape"):
        sel.install_sample(torch.zeros(3, 5), 100)
    with pytest.raises(ValueError, match="presample of shape"):
        sel.install_sample(torch.zeros(2, sel.sample_len + 1), 100)
    with pytest.raises(ValueError, match="NaN in the presampled"):
        sel.install_sample(torch.tensor([[0.0, math.nan], [1.0, 2.0]]), 100)
    sel.install_sample(torch.zeros(2, 4), 100)
    sel.set_ranks(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN in values of tensor 'w'"):
        sel.add_gather(torch.tensor([[0.0, math.nan], [1.0, 2.0]]), "w")
    swept = SampleSelect(1, 10)
    swept.add_sample(torch.zeros(1, 10))
    with pytest.raises(ValueError, match="after a sampling sweep"):
        swept.install_sample(torch.zeros(1, 1), 10)


def _pcb_inputs(seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    base = {
        "a": torch.randn(60, 50, generator=gen),
        "b": torch.randn(90, generator=gen),
        "c": torch.randn(7, 3, 4, generator=gen),
    }
    models = [{k: v + torch.randn(v.shape, generator=gen) * 0.05 for k, v in base.items()} for _ in range(3)]
    models[1]["a"][:10] = base["a"][:10]  # exact zeros in one task vector, as real experts have
    return base, models


def _count_sweeps(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = driver._iter_loaded

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "_iter_loaded", counting)
    return calls


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"keep_ratio": 0.3, "clamp_ratio": 0.05},
        {"inter": "B"},
        {"inter": "C", "lambda": [1.0, 0.5, 2.0]},
        {"dare_drop_rate": 0.3},
    ],
)
def test_pcb_threshold_from_the_capture_equals_a_sampling_sweep(monkeypatch, params):
    base, models = _pcb_inputs(len(params))
    sweeps = _count_sweeps(monkeypatch)
    fast = merge_state_dicts(base, models, "pcb", params, seed=3)
    assert len(sweeps) == 4  # |T| sample + capture, |T| gather, beta gather + max, apply
    sweeps.clear()
    monkeypatch.setattr(driver, "_presampled", lambda _requests: False)  # sample beta by a sweep
    slow = merge_state_dicts(base, models, "pcb", params, seed=3)
    assert len(sweeps) == 5
    for k in base:
        assert torch.equal(fast[k].view(torch.int32), slow[k].view(torch.int32)), k


def test_pcb_threshold_from_the_capture_in_float64(monkeypatch):
    """float64 compute: the captured columns and the beta sample are float64 too; same bits as a
    sampling sweep (and the float64 order statistics stay exact)."""
    base, models = _pcb_inputs(7)
    fast = merge_state_dicts(base, models, "pcb", {"keep_ratio": 0.2}, compute_dtype=torch.float64)
    monkeypatch.setattr(driver, "_presampled", lambda _requests: False)
    slow = merge_state_dicts(base, models, "pcb", {"keep_ratio": 0.2}, compute_dtype=torch.float64)
    for k in base:
        assert torch.equal(fast[k].view(torch.int32), slow[k].view(torch.int32)), k
