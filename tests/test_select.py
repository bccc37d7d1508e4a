"""Exact order statistics over data seen in pieces: the sample-then-gather select and its radix
fallback, against torch.kthvalue on the whole rows."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightmerge import merge_state_dicts
from weightmerge.engine import select
from weightmerge.engine.select import (
    RadixSelect,
    SampleSelect,
    kth_smallest_rows,
    sample_positions,
    sample_size,
    window_ranks,
)


def run_sample_select(values: torch.Tensor, ranks: list[int], splits: list[int], **kw) -> torch.Tensor:
    """Both sweeps of a SampleSelect over ``values`` (n, D) cut into pieces at ``splits``."""
    n, d = values.shape
    sel = SampleSelect(n, d, **kw)
    cuts = [0, *sorted(set(s for s in splits if 0 < s < d)), d]
    pieces = [values[:, a:b] for a, b in itertools.pairwise(cuts)]
    for p in pieces:
        sel.add_sample(p)
    sel.set_ranks(torch.tensor(ranks))
    for p in pieces:
        sel.add_gather(p)
    return sel.finish()


def reference(values: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    return torch.stack([torch.kthvalue(values[i], r + 1).values for i, r in enumerate(ranks)]) + 0.0


def test_hand_computed():
    values = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0], [0.0, -1.0, 7.0, 7.0, 2.0]])
    out = run_sample_select(values, [0, 3], splits=[2])
    assert out.tolist() == [1.0, 7.0]
    out = run_sample_select(values, [4, 1], splits=[1, 3])
    assert out.tolist() == [5.0, 0.0]


def test_window_brackets_the_quantile_with_a_margin():
    lo, hi = window_ranks(900, 1000, 100)
    assert lo < 90 < hi
    assert window_ranks(0, 10, 10)[0] < 0 and window_ranks(9, 10, 10)[1] > 9  # open at the ends
    assert sample_size(10) == 10 and sample_size(10**6) == 65536 and sample_size(168 * 10**6) > 10**6


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    d=st.integers(1, 3000),
    kind=st.sampled_from(["normal", "ties", "sparse", "sorted", "float64"]),
    data=st.data(),
)
def test_equals_kthvalue_whatever_the_chunking(seed, d, kind, data):
    gen = torch.Generator().manual_seed(seed)
    n = 3
    if kind == "ties":
        values = torch.randint(-3, 4, (n, d), generator=gen).float()
    elif kind == "sparse":
        values = torch.randn(n, d, generator=gen) * (torch.rand(n, d, generator=gen) < 0.1)
    elif kind == "sorted":
        values = torch.sort(torch.randn(n, d, generator=gen), dim=1).values
    elif kind == "float64":
        values = 1.0 + torch.randn(n, d, generator=gen, dtype=torch.float64) * 2.0**-40
    else:
        values = torch.randn(n, d, generator=gen)
    ranks = [data.draw(st.integers(0, d - 1)) for _ in range(n)]
    splits = data.draw(st.lists(st.integers(1, max(1, d - 1)), max_size=5))
    out = run_sample_select(values, ranks, splits)
    ref = reference(values, ranks)
    missed = torch.isnan(out)
    assert out.dtype == values.dtype
    assert torch.equal(out[~missed], ref[~missed])
    if kind != "sorted":  # a strided sample of unsorted rows brackets the rank
        assert not bool(missed.any())


def test_negative_zero_answers_positive_zero_and_infinities_rank():
    values = torch.tensor([[-0.0, -0.0, 1.0, -math.inf, math.inf]])
    out = run_sample_select(values, [1], splits=[])
    assert out.item() == 0.0 and math.copysign(1.0, out.item()) == 1.0
    assert run_sample_select(values, [0], splits=[3]).item() == -math.inf
    assert run_sample_select(values, [4], splits=[3]).item() == math.inf


def test_a_missed_window_or_a_full_buffer_reports_nan(monkeypatch):
    values = torch.arange(1000.0).reshape(1, -1)
    assert run_sample_select(values, [500], splits=[300]).item() == 500.0
    monkeypatch.setattr(select, "window_ranks", lambda rank, total, s: (1, 2))  # a wrong window
    assert math.isnan(run_sample_select(values, [500], splits=[300]).item())
    monkeypatch.undo()
    assert math.isnan(run_sample_select(values, [500], splits=[300], cap=3).item())


def test_nan_is_refused_naming_the_tensor():
    sel = SampleSelect(1, 3, what="magnitudes")
    with pytest.raises(ValueError, match="NaN in magnitudes of tensor 'w'"):
        sel.add_sample(torch.tensor([[1.0, math.nan, 2.0]]), "w")
    sel = SampleSelect(1, 2)
    sel.add_sample(torch.tensor([[math.inf, -math.inf]]), "w")  # a NaN sum, but no NaN entry


def mix(j: int) -> int:
    h = (j * 1540483477) % 2**32
    h ^= h >> 15
    h = (h * 1540483477) % 2**32
    return h ^ (h >> 13)


def test_sample_positions_do_not_depend_on_the_chunking():
    values = torch.randn(2, 5000, generator=torch.Generator().manual_seed(1))
    samples = []
    for splits in ([], [1, 2, 3, 4000], list(range(7, 5000, 333))):
        sel = SampleSelect(2, 5000)
        sel.step = 7
        cuts = [0, *splits, 5000]
        for a, b in itertools.pairwise(cuts):
            sel.add_sample(values[:, a:b])
        assert sel.sample is not None
        samples.append(sel.sample[:, : sel.n_sampled].clone())
    positions = [j * 7 + mix(j) % 7 for j in range(5000 // 7 + 1)]
    assert torch.equal(samples[0], values[:, [p for p in positions if p < 5000]])
    assert all(torch.equal(s, samples[0]) for s in samples)


def test_radix_fallback_is_exact():
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(4, 5000, generator=gen)
    ranks = torch.tensor([0, 1234, 4000, 4999])
    assert torch.equal(kth_smallest_rows(values, ranks), reference(values, ranks.tolist()))
    sel = RadixSelect(1)
    with pytest.raises(ValueError, match="NaN"):
        sel.add_level1(torch.tensor([[math.nan]]), "t")


@pytest.mark.parametrize("method,params", [("ties", {"variant": "paper", "density": 0.2}), ("pcb", {})])
def test_merge_with_every_window_missed_equals_the_sampled_merge(monkeypatch, method, params):
    """The driver falls back to the radix select when the sample misses: same bits."""
    gen = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(40, 30, generator=gen), "b": torch.randn(70, generator=gen)}
    models = [{k: v + torch.randn(v.shape, generator=gen) * 0.1 for k, v in base.items()} for _ in range(3)]
    sampled = merge_state_dicts(base, models, method, params)
    calls = []
    real = select.SampleSelect.finish

    def miss(self):
        calls.append(1)
        return torch.full_like(real(self), math.nan)

    monkeypatch.setattr(select.SampleSelect, "finish", miss)
    fallback = merge_state_dicts(base, models, method, params)
    assert calls
    for k in base:
        assert torch.equal(sampled[k], fallback[k])


@pytest.mark.parametrize("kind", ["normal", "ties", "sparse"])
def test_sampled_rows_at_scale(kind):
    """Rows large enough that only every few values are sampled (step > 1): exact, no miss."""
    gen = torch.Generator().manual_seed(7)
    n, d = 3, 400_000
    if kind == "ties":
        values = torch.randint(0, 50, (n, d), generator=gen).float()
    elif kind == "sparse":
        values = torch.randn(n, d, generator=gen).abs() * (torch.rand(n, d, generator=gen) < 0.05)
    else:
        values = torch.randn(n, d, generator=gen)
    ranks = [int(d * 0.01), int(d * 0.5), int(d * 0.99) - 1]
    sel = SampleSelect(n, d)
    assert sel.step > 1
    out = run_sample_select(values, ranks, splits=[1000, 150_000, 150_001, 390_000])
    assert torch.equal(out, reference(values, ranks))


def test_sample_positions_one_per_stride():
    assert sample_positions(0, 5, 1).tolist() == [0, 1, 2, 3, 4]
    pos = sample_positions(0, 96 * 50, 96)
    assert pos.numel() == 50 and torch.equal(pos // 96, torch.arange(50))
    assert len(set((pos % 96).tolist())) > 20  # not one column of a 96-wide row
    assert len(set((pos[:32] % 32).tolist())) < 32 or len(set((pos[32:] % 32).tolist())) < 32  # no period
