"""The statistics pass keeps each tensor's per-chunk partials in one buffer (driver._Partials);
what it hands to the reduction must be exactly torch.cat of the chunks' partials."""

from __future__ import annotations

import pytest
import torch

from weightmerge.engine.driver import _Partials


def _cat_and_take(widths: list[int], rows_total: int, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(widths) + rows_total)
    parts = [torch.randn(n, w, generator=g, dtype=torch.float64) for w in widths]
    acc = _Partials(n)
    acc.start(rows_total)
    for p in parts:
        acc.add(p)
    return torch.cat(parts, dim=1), acc.take()


@pytest.mark.parametrize(
    ("widths", "rows_total"),
    [
        ([5, 5, 3], 13),  # row partials of a row-chunked tensor: fills the buffer exactly
        ([13], 13),  # one chunk
        ([1], 1),  # a 1-d tensor: one row
        ([1, 1, 1], 13),  # one column per chunk (a per-chunk max): a prefix of the buffer
        ([4, 9, 7], 5),  # more columns than rows: the buffer grows
    ],
)
def test_take_equals_cat(widths: list[int], rows_total: int) -> None:
    ref, got = _cat_and_take(widths, rows_total)
    assert got.is_contiguous()
    assert torch.equal(got.view(torch.int64), ref.view(torch.int64))
    assert torch.equal(got.sum(dim=1).view(torch.int64), ref.sum(dim=1).view(torch.int64))


def test_casts_to_float64_and_checks_shape() -> None:
    acc = _Partials(2)
    acc.start(4)
    acc.add(torch.tensor([[1.5, 2.0], [3.0, 4.0]], dtype=torch.float32))
    with pytest.raises(ValueError, match=r"\(n_models, k\)"):
        acc.add(torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"\(n_models, k\)"):
        acc.add(torch.zeros(2))
    out = acc.take()
    assert out.dtype == torch.float64
    assert out.tolist() == [[1.5, 2.0], [3.0, 4.0]]


def test_reused_across_tensors() -> None:
    acc = _Partials(1)
    acc.start(2)
    acc.add(torch.ones(1, 2, dtype=torch.float64))
    assert acc.take().tolist() == [[1.0, 1.0]]
    acc.start(3)
    acc.add(torch.full((1, 3), 2.0, dtype=torch.float64))
    assert acc.take().tolist() == [[2.0, 2.0, 2.0]]
    with pytest.raises(RuntimeError):
        acc.take()
