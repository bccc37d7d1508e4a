"""Fused CPU loops compiled by numba (imported only through ``weightmerge.kernels``; its callers
run their reference torch code when numba is missing or disabled).

Each kernel reads its inputs once and does in one loop what the torch code does in a dozen
element-wise ops, with the same float operations in the same order, so the results have the same
bits (``tests/test_kernels.py`` checks this against the reference torch code). No ``fastmath``:
LLVM may not reassociate or contract (FMA) anything. Scalars of the compute dtype come in a
``consts`` array of that dtype ([0, 1, lambda]) so that no arithmetic is promoted to float64 by a
Python literal.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, nogil=True)
def window_gather(row, lo, hi, out, pos, nchunks):
    """Magnitudes of ``row`` (1-D float) in ``[lo, hi]`` (scalars of the row's dtype; -inf / +inf
    for an open bound) gathered into ``out`` and their flat indices into ``pos`` (chunk c writes
    ``[c*(cap+1), c*(cap+1) + cap)`` of both, with cap = len(out) // nchunks - 1: one spare slot per
    chunk takes the writes past cap), plus per chunk: entries below ``lo``, entries in the window
    (may exceed cap: then only the first cap are kept and the caller retries with a larger buffer),
    and whether a NaN was seen. Branch-free: every entry is written to the next slot, and the slot
    advances only when inside. Inside a chunk the gathered entries keep the row's order."""
    d = row.shape[0]
    stride = out.shape[0] // nchunks
    cap = stride - 1
    span = (d + nchunks - 1) // nchunks
    below = np.zeros(nchunks, np.int64)
    count = np.zeros(nchunks, np.int64)
    nan = np.zeros(nchunks, np.uint8)
    for c in prange(nchunks):
        j0 = c * span
        j1 = min(d, j0 + span)
        off = c * stride
        nb = 0
        k = 0
        bad = 0
        for j in range(j0, j1):
            m = abs(row[j])
            bad |= m != m
            nb += m < lo
            slot = off + min(k, cap)
            out[slot] = m
            pos[slot] = j
            k += (m >= lo) & (m <= hi)
        below[c] = nb
        count[c] = k
        nan[c] = bad
    return below, count, nan


@njit(cache=True, nogil=True)
def nth_equal_abs(row, value, nth):
    """Flat index of the ``nth`` (0-based) entry of ``row`` with ``|row[j]| == value``; len(row)
    when there are fewer."""
    seen = 0
    for j in range(row.shape[0]):
        if abs(row[j]) == value:
            if seen == nth:
                return j
            seen += 1
    return row.shape[0]


@njit(parallel=True, cache=True, nogil=True)
def ties_merge(
    x, base, w, thr, cut, trim, consts, unit, weighted_vote, zero_pos, normalize, scale, out, block
):
    """TIES for one flat tensor or chunk: ``x`` (n, d) task vectors, ``base`` and ``out`` (d,).

    * trim: row i with ``trim[i]`` zeroes |x| < thr[i] and the entries equal to thr[i] at flat
      index >= cut[i] (cut = d keeps every tie; a NaN is never dropped, as ``masked_fill`` by
      ``|x| < thr`` keeps it);
    * vote: the values that vote are weighted when ``weighted_vote`` (mergekit), raw otherwise
      (paper); their sum elects +1 where it is > 0, or == 0 and ``zero_pos``, else -1 (so a NaN
      sum elects -1, as mergekit's ``sum >= 0`` and the paper's ``sign`` both do);
    * merge: the agreeing values (vote value > 0 under +1, < 0 under -1), weighted, are summed
      from +0 in model order, divided by the sum of their weights (a zero divisor is 1) when
      ``normalize``, times lambda (``consts[2]``) when ``scale``, and added to ``base``.

    ``unit`` (all weights 1) skips the multiplications by 1, which change nothing. Returns per
    block whether an untrimmed row held a NaN (the caller decides whether that is an error).

    Each block of columns is done model row by model row with the columns innermost (contiguous,
    branch-free selects), so LLVM vectorizes it; per column the sums still run in model order."""
    n, d = x.shape
    zero = consts[0]
    one = consts[1]
    lam = consts[2]
    pre = weighted_vote and not unit  # weight before the vote
    post = not weighted_vote and not unit  # weight after it
    nb = (d + block - 1) // block
    nan = np.zeros(nb, np.uint8)
    for b in prange(nb):
        j0 = b * block
        m_cols = min(d, j0 + block) - j0
        v = np.empty((n, m_cols), x.dtype)
        total = np.zeros(m_cols, x.dtype)
        acc = np.zeros(m_cols, x.dtype)
        div = np.zeros(m_cols, x.dtype)
        bad = 0
        for i in range(n):
            t = thr[i]
            c = cut[i] - j0
            wi = w[i]
            if trim[i]:
                for jj in range(m_cols):
                    xi = x[i, j0 + jj]
                    m = abs(xi)
                    drop = (m < t) | ((m == t) & (jj >= c))
                    xi = zero if drop else xi
                    if pre:
                        xi = xi * wi
                    v[i, jj] = xi
                    total[jj] += xi
            else:
                for jj in range(m_cols):
                    xi = x[i, j0 + jj]
                    bad |= xi != xi
                    if pre:
                        xi = xi * wi
                    v[i, jj] = xi
                    total[jj] += xi
        for i in range(n):
            wi = one if unit else w[i]
            for jj in range(m_cols):
                vi = v[i, jj]
                tj = total[jj]
                pos = (tj > zero) | ((tj == zero) & zero_pos)
                agree = (pos & (vi > zero)) | ((not pos) & (vi < zero))
                if post:
                    vi = vi * wi
                acc[jj] += vi if agree else zero
                if normalize:
                    div[jj] += wi if agree else zero
        for jj in range(m_cols):
            a = acc[jj]
            if normalize:
                dv = div[jj]
                a = a / (one if dv == zero else dv)
            if scale:
                a = a * lam
            out[j0 + jj] = base[j0 + jj] + a
        nan[b] = bad
    return nan


@njit(parallel=True, cache=True, nogil=True)
def window_counts(values, lo, hi, cand, kept, failed, below, eq_lo, eq_hi):
    """One gathering step of ``engine.select.SampleSelect`` for a block ``values`` (n, m): per row i
    add to ``below``/``eq_lo``/``eq_hi`` the values < lo[i], == lo[i], == hi[i], and append those
    strictly inside (lo[i], hi[i]) to ``cand[i, kept[i]:]`` (cap = cand.shape[1] - 1: the last
    column is a spare that takes the writes of values outside). A row whose values would pass
    cap is marked ``failed`` and gathers nothing more; a failed row only counts."""
    n, m = values.shape
    cap = cand.shape[1] - 1
    for i in prange(n):
        lo_i = lo[i]
        hi_i = hi[i]
        nb = 0
        nl = 0
        nh = 0
        k = kept[i]
        room = failed[i] == 0
        for j in range(m):
            v = values[i, j]
            nb += v < lo_i
            nl += v == lo_i
            nh += v == hi_i
            if room:
                cand[i, min(k, cap)] = v
                k += (v > lo_i) & (v < hi_i)
        below[i] += nb
        eq_lo[i] += nl
        eq_hi[i] += nh
        if room:
            if k > cap:
                failed[i] = 1
            else:
                kept[i] = k


@njit(parallel=True, cache=True, nogil=True)
def trimmed_vote_sign(x, thr, trim, out, block):
    """Paper TIES' zero-sign vote for one flat chunk: ``out[j] = sign(sum_i trimmed x[i, j])`` with
    the sum from +0 in model order over the rows trimmed like ``trim_global`` (|x| < thr[i] -> 0
    where ``trim[i]``): +1, -1, +0 for a zero sum (``elect_sign(zero=0)``), NaN for a NaN sum."""
    n, d = x.shape
    zero = out.dtype.type(0)
    one = out.dtype.type(1)
    nb = (d + block - 1) // block
    for b in prange(nb):
        j0 = b * block
        j1 = min(d, j0 + block)
        total = np.zeros(j1 - j0, x.dtype)
        for i in range(n):
            t = thr[i]
            if trim[i]:
                for j in range(j0, j1):
                    xi = x[i, j]
                    total[j - j0] += zero if abs(xi) < t else xi
            else:
                for j in range(j0, j1):
                    total[j - j0] += x[i, j]
        for j in range(j0, j1):
            tj = total[j - j0]
            out[j] = one if tj > zero else (-one if tj < zero else (zero if tj == zero else tj))
