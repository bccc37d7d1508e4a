"""Fused CPU kernels (numba) and the sampling arithmetic of the exact selections, shared by the
engine (``engine.select.SampleSelect``: ``window_counts``, ``sampling``) and the TIES family
(``ties_merge``, ``trimmed_vote_sign``, ``window_gather``, ``nth_equal_abs``). It imports nothing
else of weightmerge, so both can use it without an import cycle.

This module says whether the kernels can run on a tensor and wraps them (torch tensors in and
out, zero-copy numpy views). They run when numba imports, the tensors are float32/float64 CPU
tensors of one dtype, and the environment does not say ``WEIGHTMERGE_KERNELS=0`` (which forces
each caller's reference torch code, for debugging or comparison; both give the same bits). numba
compiles each kernel once per machine and caches the machine code next to ``_numba.py`` (or in
``NUMBA_CACHE_DIR``, and in numba's user cache directory when the install is read-only).
"""

from __future__ import annotations

import functools
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from torch import Tensor


@functools.cache
def _module() -> ModuleType | None:
    if os.environ.get("WEIGHTMERGE_KERNELS", "1") == "0":
        return None
    try:
        from weightmerge.kernels import _numba
    except ImportError:  # numba missing or broken: the torch code runs
        return None
    if not _compiled_before(_numba.__file__):
        print(
            "weightmerge: compiling the numba kernels on first use (up to a minute; cached for later runs)",
            file=sys.stderr,
            flush=True,
        )
    return _numba


def _compiled_before(module_file: str) -> bool:
    """Whether numba's on-disk cache (``cache=True``) holds compiled kernels of this module: next
    to it in __pycache__, or under $NUMBA_CACHE_DIR."""
    stem = os.path.splitext(os.path.basename(module_file))[0]
    roots = [os.path.join(os.path.dirname(module_file), "__pycache__")]
    if os.environ.get("NUMBA_CACHE_DIR"):
        roots.append(os.environ["NUMBA_CACHE_DIR"])
    for root in roots:
        for _dir, _subdirs, files in os.walk(root):
            if any(f.startswith(stem + ".") and f.endswith(".nbi") for f in files):
                return True
    return False


def enabled() -> bool:
    return _module() is not None


def usable(*tensors: Tensor) -> bool:
    """True when the kernels can run on these tensors (CPU, float32/float64, one dtype, dense)."""
    if not tensors or _module() is None:
        return False
    dt = tensors[0].dtype
    return all(
        t.device.type == "cpu" and t.dtype == dt and dt in (torch.float32, torch.float64) for t in tensors
    )


def _threads() -> None:
    import numba

    most = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), most)))


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def window_gather(
    row: Tensor, lo: Tensor | None, hi: Tensor | None, cap: int
) -> tuple[int, Tensor | None, Tensor | None, bool]:
    """``(below, candidates, positions, nan)`` for the magnitudes of the 1-D ``row``: how many are
    < ``lo``, those in ``[lo, hi]`` (a None bound is open) and their flat indices in ascending
    order (int64). ``candidates`` and ``positions`` are None only when a NaN was seen."""
    mod = _module()
    assert mod is not None
    _threads()
    r = _np(row)
    nchunks = max(1, min(64, 4 * torch.get_num_threads(), r.shape[0] // 4096))
    lo_v = r.dtype.type(-np.inf if lo is None else lo.item())
    hi_v = r.dtype.type(np.inf if hi is None else hi.item())
    per = max(1024, -(-cap // nchunks))
    while True:
        buf = np.empty((per + 1) * nchunks, r.dtype)  # one spare slot per chunk
        pos = np.empty((per + 1) * nchunks, np.int64)
        below, count, nan = mod.window_gather(r, lo_v, hi_v, buf, pos, nchunks)
        if nan.any():
            return 0, None, None, True
        top = int(count.max())
        if top <= per:
            break
        per = top  # a chunk held more than its share: the counts are exact now, one more pass
    spans = [(c * (per + 1), c * (per + 1) + int(count[c])) for c in range(nchunks)]
    cand = np.concatenate([buf[a:b] for a, b in spans])
    where = np.concatenate([pos[a:b] for a, b in spans])
    return int(below.sum()), torch.from_numpy(cand), torch.from_numpy(where), False


def nth_equal_abs(row: Tensor, value: Tensor, nth: int) -> int:
    """Flat index of the ``nth`` (0-based) entry of 1-D ``row`` whose magnitude equals ``value``."""
    mod = _module()
    assert mod is not None
    r = _np(row)
    return int(mod.nth_equal_abs(r, r.dtype.type(value.item()), nth))


def ties_merge(
    x: Tensor,
    base: Tensor,
    weights: Tensor,
    thr: Tensor,
    cut: Tensor,
    trim: Tensor,
    *,
    unit: bool,
    normalize: bool,
    lam: float,
    block: int,
    weighted_vote: bool = True,
    zero_pos: bool = True,
) -> tuple[Tensor, bool]:
    """Flat TIES (see ``_numba.ties_merge``; the defaults are mergekit's vote): ``x`` (n, d),
    ``base`` (d,), per-row ``thr``, ``cut`` (int64) and ``trim`` (bool). Returns
    ``(merged (d,), nan_seen)``."""
    mod = _module()
    assert mod is not None
    _threads()
    xs = _np(x)
    dt = xs.dtype
    out = np.empty(xs.shape[1], dt)
    consts = np.array([0.0, 1.0, lam], dtype=dt)
    nan = mod.ties_merge(
        xs,
        _np(base),
        _np(weights.to(x.dtype)),
        _np(thr.to(x.dtype)),
        _np(cut.to(torch.int64)),
        _np(trim.to(torch.bool)),
        consts,
        unit,
        weighted_vote,
        zero_pos,
        normalize,
        lam != 1,
        out,
        block,
    )
    return torch.from_numpy(out), bool(nan.any())


def window_counts(
    values: Tensor,
    lo: Tensor,
    hi: Tensor,
    cand: Tensor,
    kept: list[int],
    failed: list[bool],
    below: Tensor,
    eq_lo: Tensor,
    eq_hi: Tensor,
) -> None:
    """One ``SampleSelect`` gathering step in one pass (see ``_numba.window_counts``):
    ``lo``/``hi`` (n, 1) of the values' dtype, ``cand`` (n, cap + 1) and the int64 (n,) counters
    are updated in place, and so are the lists ``kept`` and ``failed``."""
    mod = _module()
    assert mod is not None
    _threads()
    k = np.array(kept, dtype=np.int64)
    f = np.array(failed, dtype=np.uint8)
    mod.window_counts(
        _np(values), _np(lo.reshape(-1)), _np(hi.reshape(-1)), cand.numpy(), k, f,
        below.numpy(), eq_lo.numpy(), eq_hi.numpy(),
    )  # fmt: skip
    kept[:] = k.tolist()
    failed[:] = [bool(b) for b in f]


def trimmed_vote_sign(x: Tensor, thr: Tensor, trim: Tensor, *, block: int) -> Tensor:
    """(d,) sign of the column sums of the flat ``x`` (n, d) after the global trim (|x| < thr[i] -> 0
    in the rows where ``trim``); see ``_numba.trimmed_vote_sign``."""
    mod = _module()
    assert mod is not None
    _threads()
    xs = _np(x)
    out = np.empty(xs.shape[1], xs.dtype)
    mod.trimmed_vote_sign(xs, _np(thr.to(x.dtype)), _np(trim.to(torch.bool)), out, block)
    return torch.from_numpy(out)


def warm_up() -> bool:
    """Compile (or load from numba's cache) every kernel for float32 and float64 on tiny inputs, so
    that the first real call does not pay for it. Returns False when the kernels are off."""
    if _module() is None:
        return False
    for dt in (torch.float32, torch.float64):
        x = torch.zeros(2, 8, dtype=dt)
        row, one = x[0], torch.ones((), dtype=dt)
        window_gather(row, None, one, cap=8)
        nth_equal_abs(row, one, 0)
        w, thr = torch.ones(2, dtype=dt), torch.zeros(2, dtype=dt)
        cut, trim = torch.full((2,), 8, dtype=torch.int64), torch.ones(2, dtype=torch.bool)
        ties_merge(x, row, w, thr, cut, trim, unit=True, normalize=True, lam=1.0, block=4)
        trimmed_vote_sign(x, thr, trim, block=4)
        below, eq_lo, eq_hi = (torch.zeros(2, dtype=torch.int64) for _ in range(3))
        cand = torch.zeros(2, 9, dtype=dt)
        window_counts(
            x, thr.reshape(2, 1), thr.reshape(2, 1), cand, [0, 0], [False, False], below, eq_lo, eq_hi
        )
    return True
