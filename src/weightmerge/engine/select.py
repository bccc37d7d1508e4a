"""Exact order statistics per row over data seen in pieces: a two-level radix select.

Float32 values are mapped to order-preserving int32 keys. Level 1 counts the high 16 bits of the
keys (65536 buckets per row) over all the data; the bucket holding the requested rank is found
from the cumulative counts. Level 2 counts the low 16 bits of the keys inside that bucket only,
which pins down the exact 32-bit key, hence the exact value. Memory: 2 x 65536 int64 counters per
row, whatever the model size; counts are integers, so the answer never depends on how the data was
split. NaN is refused; -0.0 is counted as +0.0.
"""

from __future__ import annotations

import math

import torch

from weightmerge import kernels
from weightmerge.kernels.sampling import sample_positions, window_ranks

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


# ---------------------------------------------------------------------------------------------
# Sample, then gather: the fast path (two cheap sweeps), exact, with the radix select as fallback


def sample_size(total: int) -> int:
    """Values kept per row by the sampling sweep: about 4 D^(2/3) (at least 65536, at most D).

    That balances the sample (kept whole) against the window of candidates gathered around the
    rank, which shrinks as 1/sqrt(sample): for D = 168M about 1.2M samples and 0.45 % of D
    gathered per row at a 90 % quantile; for D = 7B, 15M samples and 0.13 %."""
    return max(1, min(total, max(1 << 16, int(4 * total ** (2 / 3)))))


def _count(mask: torch.Tensor) -> torch.Tensor:
    """True entries per row of a bool (n, m) mask, int64 on the CPU (a uint8 sum: several times
    faster than summing bools; m < 2^31)."""
    return mask.view(torch.uint8).sum(dim=1, dtype=torch.int32).to(device="cpu", dtype=torch.int64)


def no_nan(values: torch.Tensor) -> bool:
    """True when ``values`` holds no NaN; one cheap sum, then an exact look only when the sum is NaN
    (a NaN sum needs a NaN entry or both infinities)."""
    if not bool(torch.isnan(values.sum())):
        return True
    return not bool(torch.isnan(values).any())


class SampleSelect:
    """Exact order statistics per row in two sweeps of cheap, vectorised comparisons.

    Sweep 1 (``add_sample``) keeps one value in every ``step`` of each row, at hashed positions
    counted over the whole stream (``sample_positions``), so the sample does not depend on how the
    data is chunked. ``set_ranks`` sorts the sample and picks, per row, a window [lo, hi] of sample
    values that brackets the wanted rank with overwhelming probability. Sweep 2 (``add_gather``)
    counts the values below lo, equal to lo and equal to hi, and keeps those strictly inside
    (lo, hi). ``finish`` then reads the answer off the counts or selects it among the gathered
    values (``kthvalue``), exactly, in the values' own dtype (float64 needs no refinement). A row
    whose window missed the rank, or whose gathered values pass ``cap``, reports failure (NaN),
    and the caller falls back to :class:`RadixSelect`: the answer is exact either way. -0.0 is
    answered as +0.0, like the radix select."""

    def __init__(self, n_rows: int, total: int, what: str = "values", *, cap: int | None = None) -> None:
        self.n = n_rows
        self.what = what
        self.step = max(1, total // sample_size(max(total, 1)))
        self.sample_len = max(1, -(-total // self.step))  # one value per stride
        # a window is ~2 x 8 sigma / s of D wide at most (q = 1/2); 4x that is room enough
        self.cap = cap if cap is not None else max(1 << 22, int(64 * total / math.sqrt(self.sample_len)))
        self.pos = 0
        # preallocated once (untouched pages cost nothing): many small kept pieces between big
        # short-lived temporaries would fragment the heap and keep the process's RSS high
        self.sample: torch.Tensor | None = None  # (n, sample count)
        self.n_sampled = 0
        self.ranks: torch.Tensor | None = None
        self.lo: torch.Tensor | None = None  # (n, 1)
        self.hi: torch.Tensor | None = None
        self.below = torch.zeros(n_rows, dtype=torch.int64)
        self.eq_lo = torch.zeros(n_rows, dtype=torch.int64)
        self.eq_hi = torch.zeros(n_rows, dtype=torch.int64)
        self.cand: torch.Tensor | None = None  # (n, cap) gathered values, row i's first kept[i]
        self.kept = [0] * n_rows
        self.failed = [False] * n_rows
        self.seen = 0
        self.check_gather = False  # NaN check in the gathering sweep (a presampled statistic)

    def _check_shape(self, values: torch.Tensor) -> None:
        if values.dim() != 2 or values.shape[0] != self.n:
            raise ValueError(f"expected ({self.n}, m) values, got {tuple(values.shape)}")

    def add_sample(self, values: torch.Tensor, name: str = "?", *, check: bool = True) -> None:
        """Keep the values at this chunk's sampling positions (``check``: refuse NaN)."""
        self._check_shape(values)
        if check and not no_nan(values):  # the gathering sweep sees the same values: checked once, here
            raise ValueError(f"NaN in {self.what} of tensor {name!r}: cannot rank")
        m = values.shape[1]
        idx = sample_positions(self.pos, m, self.step)
        if idx.numel():
            if self.sample is None:
                self.sample = torch.empty((self.n, self.sample_len), dtype=values.dtype)
            k = idx.numel()
            self.sample[:, self.n_sampled : self.n_sampled + k] = values[:, idx.to(values.device)]
            self.n_sampled += k
        self.pos += m

    def install_sample(self, sample: torch.Tensor, total: int) -> None:
        """Take the whole sample at once (``OrderStat.presample``: values at the positions a
        sampling sweep over ``total`` values per row would keep) instead of ``add_sample`` calls.
        The gathering sweep then checks its values for NaN itself."""
        if self.pos:
            raise ValueError(f"{self.what}: sample installed after a sampling sweep")
        if sample.dim() != 2 or sample.shape[0] != self.n or not 0 < sample.shape[1] <= self.sample_len:
            raise ValueError(
                f"{self.what}: presample of shape {tuple(sample.shape)}, expected ({self.n}, k) "
                f"with 0 < k <= {self.sample_len}"
            )
        if not no_nan(sample):
            raise ValueError(f"NaN in the presampled {self.what}: cannot rank")
        self.sample = sample.to(device="cpu").contiguous()
        self.n_sampled = sample.shape[1]
        self.pos = total
        self.check_gather = True

    def captured(self) -> torch.Tensor:
        """The values kept so far (a capture, ``SampleCapture``): (n, values sampled)."""
        if self.sample is None:
            return torch.empty((self.n, 0))
        return self.sample[:, : self.n_sampled]

    @property
    def count(self) -> int:
        return self.pos

    def set_ranks(self, ranks: torch.Tensor) -> None:
        """Fix the wanted 0-based ranks (n,) and the windows; call after the sampling sweep."""
        ranks = ranks.to(torch.int64)
        if bool(((ranks < 0) | (ranks >= self.pos)).any()):
            raise ValueError(f"rank {ranks.tolist()} outside 0..{self.pos - 1} of {self.what}")
        self.ranks = ranks
        assert self.sample is not None
        sample = self.sample[:, : self.n_sampled]
        self.sample = None
        s = sample.shape[1]
        lo = torch.empty((self.n, 1), dtype=sample.dtype)
        hi = torch.empty((self.n, 1), dtype=sample.dtype)
        for i in range(self.n):  # the window ends by selection (the values a sort would put there)
            a, b = window_ranks(int(ranks[i]), self.pos, s)
            lo[i, 0] = torch.kthvalue(sample[i], a + 1).values if a > 0 else -math.inf
            hi[i, 0] = torch.kthvalue(sample[i], b + 1).values if b < s - 1 else math.inf
        self.lo, self.hi = lo, hi

    def add_gather(self, values: torch.Tensor, name: str = "?") -> None:
        assert self.lo is not None and self.hi is not None, "set_ranks first"
        self._check_shape(values)
        if self.check_gather and not no_nan(values):
            raise ValueError(f"NaN in {self.what} of tensor {name!r}: cannot rank")
        if values.dtype == self.lo.dtype and kernels.usable(values):  # one fused pass, same result
            if self.cand is None:
                self.cand = torch.empty((self.n, self.cap + 1), dtype=values.dtype)
            kernels.window_counts(
                values,
                self.lo,
                self.hi,
                self.cand,
                self.kept,
                self.failed,
                self.below,
                self.eq_lo,
                self.eq_hi,
            )
            self.seen += values.shape[1]
            return
        lo, hi = self.lo.to(values.device), self.hi.to(values.device)
        below = _count(values < lo)
        le_lo = values <= lo
        not_above = _count(le_lo)
        lt_hi = values < hi
        under_hi = _count(lt_hi)
        self.below += below
        self.eq_lo += not_above - below
        self.eq_hi += _count(values <= hi) - under_hi
        inside = lt_hi.logical_and_(le_lo.logical_not_())
        counts = _count(inside).tolist()
        for i in range(self.n):
            if self.failed[i] or counts[i] == 0:
                continue
            if self.kept[i] + counts[i] > self.cap:
                self.failed[i] = True
                continue
            if self.cand is None:  # one spare column (for the fused kernel's branch-free writes)
                self.cand = torch.empty((self.n, self.cap + 1), dtype=values.dtype)
            self.cand[i, self.kept[i] : self.kept[i] + counts[i]] = values[i][inside[i]]
            self.kept[i] += counts[i]
        self.seen += values.shape[1]

    def finish(self) -> torch.Tensor:
        """(n,) the exact values (NaN for a row whose window missed: fall back for it)."""
        assert self.lo is not None and self.hi is not None and self.ranks is not None
        if self.seen != self.pos:
            raise ValueError(f"{self.what}: the sweeps saw {self.pos} and {self.seen} values per row")
        out = torch.full((self.n,), math.nan, dtype=self.lo.dtype)
        for i in range(self.n):
            if self.failed[i]:
                continue
            lo, hi = self.lo[i, 0], self.hi[i, 0]
            r = int(self.ranks[i]) - int(self.below[i])
            eq_lo = int(self.eq_lo[i])
            if r < 0:
                continue
            if r < eq_lo:
                out[i] = lo
                continue
            if bool(lo == hi):
                continue
            r -= eq_lo
            if r < self.kept[i]:
                assert self.cand is not None
                out[i] = torch.kthvalue(self.cand[i, : self.kept[i]], r + 1).values
            elif r < self.kept[i] + int(self.eq_hi[i]):
                out[i] = hi
        self.cand = None
        return out + 0.0  # -0.0 -> +0.0
