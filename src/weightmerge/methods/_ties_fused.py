"""The fused CPU path of TIES: the same bits as the reference torch code in ``ties.py``, in one or
two passes over the task vectors instead of a dozen element-wise ops (``tests/test_kernels.py``
compares the two, as integers).

``ties.py`` decides, in one place (``ties._fused``), when this path runs: float32/float64 CPU
tensors, the kernels available (``weightmerge.kernels``), no L1 rescale, and per-tensor scope only
for the mergekit variant. Per-tensor scope finds each model row's exact trim threshold by sampled
selection (a stratified sample brackets the threshold, one fused pass counts the entries below the
bracket and gathers those inside it, a ``kthvalue`` over the few gathered finishes), then trims,
votes and merges in one fused pass. Global scope gets its thresholds from the statistics passes and
only needs the fused pass.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from weightmerge import kernels
from weightmerge.kernels.sampling import sample_positions, window_ranks

if TYPE_CHECKING:
    from torch import Tensor

SAMPLE_SIZE = 1 << 16  # stratified sample that brackets a row's threshold
KERNEL_BLOCK = 1 << 14  # columns per parallel work item of the fused kernels
SELECT_DIRECT = 1 << 17  # rows up to this size: one kthvalue is cheaper than sampling


def nan_error(name: str) -> ValueError:
    """The error of both paths for a NaN in the task vectors."""
    return ValueError(f"ties: NaN in the task vectors of tensor {name!r}")


def _kth_counts(mag: Tensor, k: int) -> tuple[Tensor, int, int]:
    """(k-th smallest of ``mag``, entries above it, entries equal to it), by one ``kthvalue``."""
    thr = torch.kthvalue(mag, k).values
    return thr, int((mag > thr).sum()), int((mag == thr).sum())


def kth_largest_counts(row: Tensor, rank: int, *, name: str) -> tuple[Tensor, int, int]:
    """``(thr, n_gt, n_eq)`` for the magnitudes of a flat vector ``row``: their ``rank``-th largest
    value and how many are above / equal to it. Exact (the value ``torch.kthvalue`` gives)."""
    return kth_largest_cut(row, rank, name=name)[:3]


def kth_largest_cut(row: Tensor, rank: int, *, name: str) -> tuple[Tensor, int, int, Tensor | None]:
    """``kth_largest_counts`` plus the flat indices, ascending, of the entries whose magnitude
    equals the threshold, when the gathering pass found them (else None): where exact-k TIES cuts
    its ties, without another scan of the row.

    A stratified sample brackets the threshold in a window of ranks (``window_ranks``); one fused
    pass counts the entries below the window and gathers those inside it (and their positions), and
    a ``kthvalue`` over the gathered few finds the value. If the sample misjudged (the threshold is
    outside the window), a full ``kthvalue`` decides. Raises on NaN."""
    n = row.numel()
    k = n - rank + 1  # 1-based ascending
    if n <= SELECT_DIRECT:
        mag = row.abs()
        if bool(torch.isnan(mag).any()):
            raise nan_error(name)
        return (*_kth_counts(mag, k), None)
    step = max(1, n // SAMPLE_SIZE)
    sample = row[_positions(n, step, row.device)].abs()
    s = sample.numel()
    lo_i, hi_i = window_ranks(k - 1, n, s)  # 0-based positions in the sorted sample
    # two selections, not a sort (NaN: the gathering pass raises on it either way)
    lo = torch.kthvalue(sample, lo_i + 1).values if lo_i > 0 else None
    hi = torch.kthvalue(sample, hi_i + 1).values if hi_i < s - 1 else None
    expect = (min(hi_i, s - 1) - max(lo_i, 0) + 1) * n // s
    below, cand, pos, nan = kernels.window_gather(row, lo, hi, cap=2 * expect + 4096)
    if nan or cand is None or pos is None:
        raise nan_error(name)
    if below < k <= below + cand.numel():
        thr = torch.kthvalue(cand, k - below).values
        n_eq = int((cand == thr).sum())
        return thr, n - below - int((cand <= thr).sum()), n_eq, pos[cand == thr]
    return (*_kth_counts(row.abs(), k), None)  # the sample missed: exact, the slow way


@functools.lru_cache(maxsize=32)
def _positions(n: int, step: int, device: torch.device) -> Tensor:
    """``sample_positions(0, n, step)``, cached: every row of a tensor, and tensors of equal size,
    sample the same positions. Read-only."""
    return sample_positions(0, n, step).to(device)


def per_tensor(
    base: Tensor,
    x: Tensor,
    ranks: Sequence[int | None],
    weights: Tensor,
    *,
    lam: float,
    normalize: bool,
    name: str,
) -> Tensor:
    """mergekit-variant per-tensor TIES without rescale (``ties.trim_per_tensor`` then
    ``ties.ties_combine``, the same bits). ``ranks[i]``: the 1-based rank from the top of model i's
    threshold, exactly that many entries kept (ties at the threshold by lowest index); None keeps
    the row whole. A row's partial tie count becomes a flat index: ties before it are kept, the
    rest dropped."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    d = flat.shape[1]
    thr = torch.zeros(n, dtype=flat.dtype)
    cut = torch.full((n,), d, dtype=torch.int64)
    trim = torch.zeros(n, dtype=torch.bool)
    for i, rank in enumerate(ranks):
        if rank is None:
            continue
        t, n_gt, n_eq, eq_pos = kth_largest_cut(flat[i], rank, name=name)
        trim[i] = True
        thr[i] = t
        need = rank - n_gt  # ties at the threshold that are kept
        if n_eq != need:  # index of the first tie dropped
            if eq_pos is not None and need < eq_pos.numel():
                cut[i] = int(eq_pos[need])  # gathered with the threshold: no scan
            else:
                cut[i] = kernels.nth_equal_abs(flat[i], t, need)
    merged, nan = kernels.ties_merge(
        flat,
        base.reshape(-1),
        weights,
        thr,
        cut,
        trim,
        unit=bool((weights == 1).all()),
        normalize=normalize,
        lam=lam,
        block=KERNEL_BLOCK,
    )
    if nan:
        raise nan_error(name)
    return merged.reshape(base.shape)


def global_scope(
    base: Tensor,
    x: Tensor,
    weights: Tensor,
    thr: Tensor,
    trim: Tensor,
    *,
    lam: float,
    normalize: bool,
    weighted_vote: bool,
    zero_pos: bool,
) -> Tensor:
    """Global-scope TIES without rescale for one tensor or row chunk: ``ties.trim_global`` by the
    per-model thresholds ``thr`` (rows where ``trim``), then ``ties.ties_combine`` (the vote
    weighted for mergekit, unweighted for paper; a zero elected sign becomes +1 when ``zero_pos``,
    paper's majority sign otherwise), the same bits."""
    n = x.shape[0]
    merged, _ = kernels.ties_merge(
        x.reshape(n, -1),
        base.reshape(-1),
        weights,
        thr,
        torch.full((n,), x[0].numel(), dtype=torch.int64),  # every tie kept: global trim drops only <
        trim,
        unit=bool((weights == 1).all()),
        normalize=normalize,
        lam=lam,
        block=KERNEL_BLOCK,
        weighted_vote=weighted_vote,
        zero_pos=zero_pos,
    )
    return merged.reshape(base.shape)


def vote_signs(x: Tensor, thr: Tensor, trim: Tensor) -> Tensor:
    """``elect_sign(trim_global(x), zero=0)`` for paper TIES' majority pass: ``(*chunk)`` signs."""
    n = x.shape[0]
    return kernels.trimmed_vote_sign(x.reshape(n, -1), thr, trim, block=KERNEL_BLOCK).reshape(x.shape[1:])
