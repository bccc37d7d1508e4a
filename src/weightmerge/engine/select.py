"""Exact order statistics per row over data seen in pieces: a two-level radix select.

Float32 values are mapped to order-preserving int32 keys. Level 1 counts the high 16 bits of the
keys (65536 buckets per row) over all the data; the bucket holding the requested rank is found
from the cumulative counts. Level 2 counts the low 16 bits of the keys inside that bucket only,
which pins down the exact 32-bit key, hence the exact value. Memory: 2 x 65536 int64 counters per
row, whatever the model size; counts are integers, so the answer never depends on how the data was
split. NaN is refused; -0.0 is counted as +0.0.
"""

from __future__ import annotations

import torch

BUCKETS = 1 << 16


def sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys whose signed order equals the float order of ``values`` (float32)."""
    bits = (values.to(torch.float32) + 0.0).contiguous().view(torch.int32)  # + 0.0 maps -0.0 to +0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def key_to_float(key: torch.Tensor) -> torch.Tensor:
    key = key.to(torch.int32)
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).view(torch.float32)


class RadixSelect:
    """Find, for each of ``n_rows`` rows, the value of 0-based ascending rank ``ranks[row]``."""

    def __init__(self, n_rows: int, what: str = "values") -> None:
        self.n = n_rows
        self.what = what
        self.count = torch.zeros(n_rows, dtype=torch.int64)
        self.hist1 = torch.zeros(n_rows * BUCKETS, dtype=torch.int64)
        self.hist2 = torch.zeros(n_rows * BUCKETS, dtype=torch.int64)
        self.bucket: torch.Tensor | None = None  # (n,) high bucket index per row
        self.rest: torch.Tensor | None = None  # (n,) rank inside that bucket
        self._offsets = torch.arange(n_rows, dtype=torch.int64)[:, None] * BUCKETS

    def _keys(self, values: torch.Tensor, name: str) -> torch.Tensor:
        if values.dim() != 2 or values.shape[0] != self.n:
            raise ValueError(f"expected ({self.n}, m) values, got {tuple(values.shape)}")
        if torch.isnan(values).any():
            raise ValueError(f"NaN in {self.what} of tensor {name!r}: cannot rank")
        return sortable_keys(values)

    def add_level1(self, values: torch.Tensor, name: str = "?") -> None:
        keys = self._keys(values, name)  # on the values' device; the counters stay on the CPU
        high = (keys >> 16).to(torch.int64) + BUCKETS // 2
        offsets = self._offsets.to(keys.device)
        self.hist1 += torch.bincount((high + offsets).flatten(), minlength=self.n * BUCKETS).cpu()
        self.count += values.shape[1]

    def finish_level1(self, ranks: torch.Tensor) -> None:
        ranks = ranks.to(torch.int64)
        if bool(((ranks < 0) | (ranks >= self.count)).any()):
            raise ValueError(f"rank {ranks.tolist()} outside 0..{(self.count - 1).tolist()} of {self.what}")
        cum = self.hist1.view(self.n, BUCKETS).cumsum(dim=1)
        bucket = torch.searchsorted(cum, ranks[:, None], right=True).squeeze(1)
        below = torch.where(bucket > 0, cum.gather(1, (bucket - 1).clamp(min=0)[:, None]).squeeze(1), 0)
        self.bucket, self.rest = bucket, ranks - below

    def add_level2(self, values: torch.Tensor, name: str = "?") -> None:
        assert self.bucket is not None, "finish_level1 first"
        keys = self._keys(values, name)
        high = (keys >> 16).to(torch.int64) + BUCKETS // 2
        inside = high == self.bucket.to(keys.device)[:, None]
        low = (keys & 0xFFFF).to(torch.int64) + self._offsets.to(keys.device)
        self.hist2 += torch.bincount(low[inside], minlength=self.n * BUCKETS).cpu()

    def finish_level2(self) -> torch.Tensor:
        assert self.bucket is not None and self.rest is not None
        cum = self.hist2.view(self.n, BUCKETS).cumsum(dim=1)
        low = torch.searchsorted(cum, self.rest[:, None], right=True).squeeze(1)
        key = ((self.bucket - BUCKETS // 2) << 16) | low
        return key_to_float(key.to(torch.int32))


def kth_smallest_rows(values: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Convenience: exact order statistic per row of an in-memory (n, D) matrix (for tests/small data)."""
    sel = RadixSelect(values.shape[0])
    sel.add_level1(values)
    sel.finish_level1(ranks)
    sel.add_level2(values)
    return sel.finish_level2()
