"""ties -- TIES-Merging: trim, elect sign, disjoint merge.

    tau_hat_i = trim(tau_i)                            keep the largest |tau_i| (see variant)
    tau_hat_i = c_i tau_hat_i                          (rescale: c_i = |tau_i|_1 / |tau_hat_i|_1)
    gamma     = sign(sum_i v_i)                        v_i = w_i tau_hat_i (mergekit), tau_hat_i (paper)
    m_i       = [v_i > 0] if gamma > 0 else [v_i < 0]  (zeros never agree)
    tau_m     = sum_i w_i m_i tau_hat_i / sum_i w_i m_i  (normalize; a zero divisor counts as 1)
    theta_m   = theta_0 + lambda * tau_m

Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023),
arXiv:2306.01708. Two variants (``variant``), each in either scope (``scope``):

* ``mergekit`` (default; mergekit 0.1.5 ``ties``): trim keeps exactly k = max(1, floor(density*N))
  entries per scope, ties at the threshold broken by the lowest flat index (in ``global`` scope every
  entry equal to the k-th largest magnitude is kept, so ties can keep more than k); the weights
  scale the deltas before the vote; a zero elected sign becomes +1.
* ``paper`` (prateeky2806/ties-merging): with k = floor(density*N), trim keeps every entry with
  |tau| >= the (k+1)-th largest magnitude (k+1 entries plus ties; density 1 keeps all); the vote is
  unweighted; a zero elected sign becomes the majority sign sign(sum_p gamma_p) over the scope (a
  majority of 0 selects the negative entries, as the reference code does); the weights only enter
  the disjoint mean.

``scope`` (default: ``per_tensor`` for mergekit, ``global`` for paper) says where the statistics
are taken: N, the trim threshold, the L1 rescale factors and paper's majority sign are per tensor,
or per model over all merged tensors (N = D, the model's size). Global scope runs statistics
passes (an exact order statistic of |tau_i| per model in the compute dtype, then reductions) and
is then element-wise. ``normalize: false`` (or ``merge_func: sum``)
gives the disjoint sum used by the ViT community setting.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch

from weightmerge.methods import _kernels
from weightmerge.methods._sample import sample_positions, window_ranks
from weightmerge.methods._sign import agreement, elect_sign, majority_sign, merge_agreeing, model_view
from weightmerge.methods.base import (
    MethodSpec,
    OrderStat,
    Param,
    Reduce,
    StatRequest,
    TensorCtx,
    row_partials,
)

Tensor = torch.Tensor
L1_BEFORE = "ties.l1_before"
L1_AFTER = "ties.l1_after"
MAJORITY = "ties.majority"
RESCALE_EPS = 1e-7  # mergekit: no rescale when either L1 norm is below this


# ---------------------------------------------------------------------------------------------
# Pure helpers


def threshold_rank(*, numel: int, density: float, variant: str) -> int | None:
    """1-based rank *from the top* of the magnitude that is the trim threshold; None = keep all."""
    if numel == 0 or density >= 1:
        return None
    if variant == "mergekit":
        k = max(1, int(density * numel))
        return None if k >= numel else k
    k = int(density * numel)
    return None if k >= numel else k + 1


def trim_mask(mag: Tensor, *, rank: int, exact: bool) -> Tensor:
    """Bool mask of a flat magnitude vector: entries >= its ``rank``-th largest value.

    ``exact``: keep exactly ``rank`` entries, ties at the threshold resolved by lowest index.
    Uses ``kthvalue`` (selection, not a full sort).
    """
    thr = torch.kthvalue(mag, mag.numel() - rank + 1).values
    if not exact:
        return mag >= thr
    above = mag > thr
    ties = mag == thr
    need = rank - int(above.sum())
    if int(ties.sum()) == need:  # the usual case: no surplus ties at the threshold
        return above | ties
    above[ties.nonzero().squeeze(1)[:need]] = True  # the lowest-index ties (indices: ties only)
    return above


def l1_factor(before: Tensor, after: Tensor) -> Tensor:
    """mergekit's L1 rescale factor, 1 when either norm is below 1e-7."""
    if bool(before < RESCALE_EPS) or bool(after < RESCALE_EPS):
        return torch.ones((), dtype=before.dtype, device=before.device)
    return before / after


def effective_scope(p: Mapping[str, Any]) -> str:
    if p["scope"] is not None:
        return str(p["scope"])
    return "global" if p["variant"] == "paper" else "per_tensor"


def effective_normalize(p: Mapping[str, Any]) -> bool:
    if p["merge_func"] is not None:
        return bool(p["merge_func"] == "mean")
    return True if p["normalize"] is None else bool(p["normalize"])


def ties_combine(
    base: Tensor,
    trimmed: Tensor,
    weights: Tensor,
    *,
    variant: str,
    lam: float,
    normalize: bool,
    majority: Tensor | None = None,
) -> Tensor:
    """Elect, disjoint-merge and add to ``base``. ``trimmed`` (n, *shape) is overwritten.

    ``majority`` (paper only): the sign that replaces zero elected signs; None = take it from
    this tensor.
    """
    if variant == "mergekit":
        trimmed.mul_(model_view(weights, trimmed))
        agree = agreement(trimmed, elect_sign(trimmed, zero=1.0))
    else:
        if majority is None:
            majority = majority_sign(elect_sign(trimmed, zero=0.0))
        agree = agreement(trimmed, elect_sign(trimmed, zero=majority))
        trimmed.mul_(model_view(weights, trimmed))
    mixed = merge_agreeing(trimmed, weights, agree, normalize=normalize)
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


# ---------------------------------------------------------------------------------------------
# Per-tensor scope


def trim_per_tensor(x: Tensor, densities: Sequence[float], *, variant: str, rescale: bool, name: str) -> None:
    """Trim each model row of ``x`` (n, *shape) in place by its own magnitude ranking."""
    if bool(torch.isnan(x).any()):
        raise _nan_error(name)
    for i, d in enumerate(densities):
        row = x[i]
        rank = threshold_rank(numel=row.numel(), density=d, variant=variant)
        if rank is None:
            continue
        before = row.abs().sum()
        keep = trim_mask(row.reshape(-1).abs(), rank=rank, exact=variant == "mergekit")
        row.masked_fill_(~keep.reshape(row.shape), 0.0)
        if rescale:
            row.mul_(l1_factor(before, row.abs().sum()))


# Per-tensor scope, blocked (CPU fast path: mergekit variant, no rescale; same bits as above)

SAMPLE_SIZE = 1 << 16  # stratified sample that brackets the threshold
BLOCK = 1 << 18  # elements per row and block: n blocks of |tau| stay in the L2/L3 caches
KERNEL_BLOCK = 1 << 14  # columns per parallel work item of the fused kernel
SELECT_DIRECT = 1 << 17  # rows up to this size: one kthvalue is cheaper than sampling


def _nan_error(name: str) -> ValueError:
    return ValueError(f"ties: NaN in the task vectors of tensor {name!r}")


def _kth_counts(mag: Tensor, k: int) -> tuple[Tensor, int, int]:
    """(k-th smallest of ``mag``, entries above it, entries equal to it), by one ``kthvalue``."""
    thr = torch.kthvalue(mag, k).values
    return thr, int((mag > thr).sum()), int((mag == thr).sum())


def kth_largest_counts(row: Tensor, rank: int, *, name: str, block: int = BLOCK) -> tuple[Tensor, int, int]:
    """``(thr, n_gt, n_eq)`` for the magnitudes of a flat vector ``row``: their ``rank``-th largest
    value and how many are above / equal to it. Exact (the value ``torch.kthvalue`` gives)."""
    return kth_largest_cut(row, rank, name=name, block=block)[:3]


def kth_largest_cut(
    row: Tensor, rank: int, *, name: str, block: int = BLOCK
) -> tuple[Tensor, int, int, Tensor | None]:
    """``kth_largest_counts`` plus the flat indices, ascending, of the entries whose magnitude
    equals the threshold, when the fused gathering pass found them (else None): where exact-k
    TIES cuts its ties, without another scan of the row.

    A stratified sample brackets the threshold in a window of ranks (``window_ranks``); one
    blocked pass takes |row| a block at a time, counts the entries below the window and gathers
    those inside it, and a ``kthvalue`` over the gathered few finds the value. If the sample
    misjudged (the threshold is outside the window), a full ``kthvalue`` decides. Raises on NaN."""
    n = row.numel()
    k = n - rank + 1  # 1-based ascending
    if n <= SELECT_DIRECT:
        mag = row.abs()
        if bool(torch.isnan(mag).any()):
            raise _nan_error(name)
        return (*_kth_counts(mag, k), None)
    step = max(1, n // SAMPLE_SIZE)
    sample = row[_positions(n, step, row.device)].abs()
    s = sample.numel()
    lo_i, hi_i = window_ranks(k - 1, n, s)  # 0-based positions in the sorted sample
    # two selections, not a sort (NaN: the gathering pass below raises on it either way)
    lo = torch.kthvalue(sample, lo_i + 1).values if lo_i > 0 else None
    hi = torch.kthvalue(sample, hi_i + 1).values if hi_i < s - 1 else None
    if _kernels.usable(row):  # one fused pass: count below, gather inside, NaN check
        expect = (min(hi_i, s - 1) - max(lo_i, 0) + 1) * n // s
        below_k, cand_k, pos_k, nan = _kernels.window_gather(row, lo, hi, cap=2 * expect + 4096)
        if nan or cand_k is None or pos_k is None:
            raise _nan_error(name)
        thr, n_gt, n_eq = _finish_window(row, k, below_k, cand_k)
        hit = below_k < k <= below_k + cand_k.numel()  # else _finish_window selected the slow way
        return thr, n_gt, n_eq, (pos_k[cand_k == thr] if hit else None)
    below = 0
    parts: list[Tensor] = []
    for c0 in range(0, n, block):
        blk = row[c0 : c0 + block].abs()
        if bool(torch.isnan(blk.sum())):  # a sum of magnitudes is NaN only if an entry is
            raise _nan_error(name)
        inside: Tensor | None = None
        if lo is not None:
            lt = blk < lo
            below += int(lt.sum())
            inside = lt.logical_not_()
        if hi is not None:
            le = blk <= hi
            inside = le if inside is None else inside.logical_and_(le)
        parts.append(blk if inside is None else blk[inside])
    return (*_finish_window(row, k, below, torch.cat(parts)), None)


@functools.lru_cache(maxsize=32)
def _positions(n: int, step: int, device: torch.device) -> Tensor:
    """``sample_positions(0, n, step)``, cached: every row of a tensor, and tensors of equal size,
    sample the same positions. Read-only."""
    return sample_positions(0, n, step).to(device)


def _finish_window(row: Tensor, k: int, below: int, cand: Tensor) -> tuple[Tensor, int, int]:
    """The k-th smallest magnitude from the ``below`` count and the gathered window ``cand``."""
    n = row.numel()
    if below < k <= below + cand.numel():
        thr = torch.kthvalue(cand, k - below).values
        n_eq = int((cand == thr).sum())
        return thr, n - below - int((cand <= thr).sum()), n_eq
    return _kth_counts(row.abs(), k)  # the sample missed: exact, the slow way


class _RowCut:
    """How one model row is trimmed while the blocks stream by: keep |tau| > thr, plus the first
    ``ties_left`` entries equal to thr (all of them when ``ties_left`` is None)."""

    __slots__ = ("eq_pos", "thr", "ties_left")

    def __init__(self, thr: Tensor, ties_left: int | None, eq_pos: Tensor | None = None) -> None:
        self.thr = thr
        self.ties_left = ties_left
        self.eq_pos = eq_pos  # flat indices of the entries equal to thr, ascending (when known)

    def drop(self, mag: Tensor) -> Tensor:
        """Bool mask of the entries of this block of the row to zero (advances the tie count)."""
        if self.ties_left is None:
            return mag < self.thr
        if self.ties_left == 0:
            return mag <= self.thr
        eq = mag == self.thr
        n_eq = int(eq.sum())
        if n_eq <= self.ties_left:
            self.ties_left -= n_eq
            return mag < self.thr
        cut = int(eq.nonzero()[self.ties_left, 0])  # first tie that is not kept
        drop = mag < self.thr
        drop[cut:] |= eq[cut:]
        self.ties_left = 0
        return drop


def ties_per_tensor_blocked(
    base: Tensor,
    x: Tensor,
    densities: Sequence[float],
    weights: Tensor,
    *,
    lam: float,
    normalize: bool,
    name: str,
    block: int = BLOCK,
) -> Tensor:
    """mergekit-variant per-tensor TIES without rescale, equal bit for bit to ``trim_per_tensor``
    followed by ``ties_combine``: exact thresholds by sampled selection, then trim, vote and
    disjoint merge one column block at a time, so every step works on cache-resident data.
    ``x`` (n, *shape) is overwritten."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    d = flat.shape[1]
    cuts: list[_RowCut | None] = []
    for i, dens in enumerate(densities):
        rank = threshold_rank(numel=d, density=dens, variant="mergekit")
        if rank is None:
            cuts.append(None)
            continue
        thr, n_gt, n_eq, eq_pos = kth_largest_cut(flat[i], rank, name=name, block=block)
        need = rank - n_gt
        cuts.append(_RowCut(thr, None if n_eq == need else need, eq_pos))
    if _kernels.usable(x, base):
        return _ties_kernel(base, flat, cuts, weights, lam=lam, normalize=normalize, name=name)
    out = torch.empty_like(base)
    out_flat = out.reshape(-1)
    base_flat = base.reshape(-1)
    unit = bool((weights == 1).all())  # x * 1 == x and a sum of 0/1 counts is exact: skip both
    w = model_view(weights, flat)
    one = torch.ones((), dtype=x.dtype, device=x.device)
    for c0 in range(0, d, block):
        xb = flat[:, c0 : c0 + block]
        mb = xb.abs()
        for i, cut in enumerate(cuts):
            if cut is not None:  # trimmed rows were NaN-checked by the selection pass
                xb[i].masked_fill_(cut.drop(mb[i]), 0.0)
            elif bool(torch.isnan(mb[i].sum())):
                raise _nan_error(name)
        del mb
        if not unit:
            xb.mul_(w)
        total = xb.sum(dim=0)
        elected = torch.where(total >= 0, one, -one)  # mergekit: +1 iff sum >= 0 (a NaN sum elects -1)
        # agree: v_i * elected > 0 (a zero, another sign or a NaN -- inf * 0 weight -- disagrees,
        # as in agreement() and mergekit's sign test)
        disagree = ((xb * elected) > 0).logical_not_()
        if normalize:
            if unit:
                divisor = disagree.logical_not().sum(dim=0, dtype=x.dtype)
            else:
                divisor = torch.where(disagree, torch.zeros((), dtype=x.dtype), w).sum(dim=0)
            divisor = torch.where(divisor == 0, one, divisor)
        mixed = xb.masked_fill_(disagree, 0.0).sum(dim=0)
        if normalize:
            mixed = mixed / divisor
        if lam != 1:
            mixed = mixed * lam
        torch.add(base_flat[c0 : c0 + block], mixed, out=out_flat[c0 : c0 + block])
    return out


def _ties_kernel(
    base: Tensor,
    flat: Tensor,
    cuts: Sequence[_RowCut | None],
    weights: Tensor,
    *,
    lam: float,
    normalize: bool,
    name: str,
) -> Tensor:
    """The apply loop of ``ties_per_tensor_blocked`` as one fused kernel (same bits). A row's
    partial tie count becomes a flat index: ties before it are kept, the rest dropped."""
    n, d = flat.shape
    thr = torch.zeros(n, dtype=flat.dtype)
    cut = torch.full((n,), d, dtype=torch.int64)
    trim = torch.zeros(n, dtype=torch.bool)
    for i, c in enumerate(cuts):
        if c is None:
            continue
        trim[i] = True
        thr[i] = c.thr
        if c.ties_left is not None:  # index of the first tie dropped
            if c.eq_pos is not None and c.ties_left < c.eq_pos.numel():
                cut[i] = int(c.eq_pos[c.ties_left])  # gathered with the threshold: no scan
            else:
                cut[i] = _kernels.nth_equal_abs(flat[i], c.thr, c.ties_left)
    unit = bool((weights == 1).all())
    merged, nan = _kernels.ties_merge(
        flat,
        base.reshape(-1),
        weights,
        thr,
        cut,
        trim,
        unit=unit,
        normalize=normalize,
        lam=lam,
        block=KERNEL_BLOCK,
    )
    if nan:
        raise _nan_error(name)
    return merged.reshape(base.shape)


# ---------------------------------------------------------------------------------------------
# Global scope: statistics passes, then an element-wise apply


def _thr_key(density: float) -> str:
    return f"ties.threshold@{density!r}"


def _global_rank(total: int, *, density: float, variant: str) -> int:
    r = threshold_rank(numel=total, density=density, variant=variant)
    return 0 if r is None else total - r  # 0-based ascending rank; 0 = the minimum, keeps all


def _abs_values(ctx: TensorCtx) -> Tensor:
    return ctx.x.abs().reshape(ctx.n_models, -1)  # compute dtype: float64 stats are refined exactly


def trim_global(
    x: Tensor, densities: Sequence[float], stats: Mapping[str, Tensor], *, name: str, inplace: bool
) -> Tensor:
    """Zero the entries of ``x`` (n, *chunk) whose magnitude is below the model's threshold."""
    out = x if inplace else x.clone()
    for i, d in enumerate(densities):
        if d >= 1:
            continue
        key = _thr_key(d)
        if key not in stats:
            raise ValueError(
                f"ties (scope: global): tensor {name!r} asks for density {d} of model {i}, but global "
                "thresholds exist only for the model-level densities; density may not vary per tensor "
                "in global scope"
            )
        out[i].masked_fill_(out[i].abs() < stats[key][i].to(out.dtype), 0.0)
    return out


def _rescale_factors(stats: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
    before, after = stats[L1_BEFORE], stats[L1_AFTER]
    return torch.stack([l1_factor(b, a) for b, a in zip(before, after, strict=True)]).to(dtype)


def _l1_before(ctx: TensorCtx) -> Tensor:
    return row_partials(ctx.x.abs(), len(ctx.full_shape))


def _l1_after(ctx: TensorCtx, *, densities: Sequence[float]) -> Tensor:
    t = trim_global(ctx.x, densities, ctx.stats, name=ctx.name, inplace=False)
    return row_partials(t.abs_(), len(ctx.full_shape))


def _zero_sign_votes(ctx: TensorCtx, *, densities: Sequence[float], rescale: bool) -> Tensor:
    if not rescale and _kernels.usable(ctx.x):  # one fused pass, no trimmed copy; the same signs
        n = ctx.n_models
        thr = _global_thresholds(densities, ctx.stats, ctx.name).to(ctx.x.dtype)
        trim = torch.tensor([d < 1 for d in densities])
        sign = _kernels.trimmed_vote_sign(ctx.x.reshape(n, -1), thr, trim, block=KERNEL_BLOCK)
        elected = sign.reshape(1, *ctx.x.shape[1:])
        return row_partials(elected, len(ctx.full_shape)).expand(n, -1)
    t = trim_global(ctx.x, densities, ctx.stats, name=ctx.name, inplace=False)
    if rescale:
        t.mul_(model_view(_rescale_factors(ctx.stats, t.dtype), t))
    elected = elect_sign(t, zero=0.0).unsqueeze(0)  # (1, *chunk)
    return row_partials(elected, len(ctx.full_shape)).expand(ctx.n_models, -1)


def _passes(p: Mapping[str, Any]) -> list[list[StatRequest]]:
    if effective_scope(p) != "global":
        return []
    variant, densities, rescale = p["variant"], tuple(p["density"]), bool(p["rescale"])
    first: list[StatRequest] = [
        OrderStat(key=_thr_key(d), fn=_abs_values, rank=partial(_global_rank, density=d, variant=variant))
        for d in sorted({d for d in densities if d < 1})
    ]
    passes: list[list[StatRequest]] = []
    if rescale:
        first.append(Reduce(key=L1_BEFORE, fn=_l1_before))
        passes = [first, [Reduce(key=L1_AFTER, fn=partial(_l1_after, densities=densities))]]
    elif first:
        passes = [first]
    if variant == "paper":
        votes = partial(_zero_sign_votes, densities=densities, rescale=rescale)
        passes.append([Reduce(key=MAJORITY, fn=votes)])
    return passes


# ---------------------------------------------------------------------------------------------
# The method


def _apply(ctx: TensorCtx) -> Tensor:
    assert ctx.base is not None
    p = ctx.params
    variant, densities, rescale = p["variant"], p["density"], bool(p["rescale"])
    x = ctx.x
    majority: Tensor | None = None
    if effective_scope(p) == "global":
        if not rescale and _kernels.usable(ctx.base, x):
            return _global_kernel(ctx)
        trim_global(x, densities, ctx.stats, name=ctx.name, inplace=True)
        if rescale:
            x.mul_(model_view(_rescale_factors(ctx.stats, x.dtype), x))
        if variant == "paper":
            majority = torch.sign(ctx.stats[MAJORITY][0]).to(x.dtype)
    elif variant == "mergekit" and not rescale and x.device.type == "cpu":
        w = torch.tensor(p["weight"], dtype=x.dtype, device=x.device)
        return ties_per_tensor_blocked(
            ctx.base, x, densities, w, lam=float(p["lambda"]), normalize=effective_normalize(p), name=ctx.name
        )
    else:
        trim_per_tensor(x, densities, variant=variant, rescale=rescale, name=ctx.name)
    w = torch.tensor(p["weight"], dtype=x.dtype, device=x.device)
    return ties_combine(
        ctx.base,
        x,
        w,
        variant=variant,
        lam=float(p["lambda"]),
        normalize=effective_normalize(p),
        majority=majority,
    )


def _global_thresholds(densities: Sequence[float], stats: Mapping[str, Tensor], name: str) -> Tensor:
    """Per-model global thresholds, +0 (keeps all) for density 1; the errors of ``trim_global``."""
    thr = torch.zeros(len(densities), dtype=torch.float64)
    for i, d in enumerate(densities):
        if d >= 1:
            continue
        key = _thr_key(d)
        if key not in stats:
            trim_global(torch.zeros(len(densities), 1), densities, stats, name=name, inplace=True)  # raises
        thr[i] = stats[key][i].to(torch.float64)
    return thr


def _global_kernel(ctx: TensorCtx) -> Tensor:
    """Global-scope apply without rescale in one fused pass: ``trim_global`` then ``ties_combine``
    with the model's majority sign (paper), the same bits."""
    assert ctx.base is not None
    p, x = ctx.params, ctx.x
    densities = p["density"]
    n = x.shape[0]
    thr = _global_thresholds(densities, ctx.stats, ctx.name).to(x.dtype)  # as trim_global casts it
    w = torch.tensor(p["weight"], dtype=x.dtype)
    paper = p["variant"] == "paper"
    zero_pos = bool(torch.sign(ctx.stats[MAJORITY][0]) > 0) if paper else True
    merged, _ = _kernels.ties_merge(
        x.reshape(n, -1),
        ctx.base.reshape(-1),
        w,
        thr,
        torch.full((n,), x[0].numel(), dtype=torch.int64),  # every tie kept: global trim drops only <
        torch.tensor([d < 1 for d in densities]),
        unit=bool((w == 1).all()),
        normalize=effective_normalize(p),
        lam=float(p["lambda"]),
        block=KERNEL_BLOCK,
        weighted_vote=not paper,
        zero_pos=zero_pos,
    )
    return merged.reshape(ctx.base.shape)


def _check(p: Mapping[str, Any], n: int) -> None:
    mf, nz = p["merge_func"], p["normalize"]
    if mf is not None and nz is not None and (mf == "mean") != bool(nz):
        raise ValueError(
            f"method 'ties': merge_func {mf!r} contradicts normalize {nz!r} "
            "(merge_func mean = normalize true, sum = normalize false); give only one of them"
        )


def _check_varying(p: Mapping[str, Any], varying: Mapping[str, str]) -> None:
    """Global scope: the thresholds are computed once, for the model-level densities, by the
    statistics passes; a density that varies per tensor (filter, gradient) cannot be honoured."""
    if effective_scope(p) == "global" and "density" in varying:
        raise ValueError(
            f"method 'ties' (variant {p['variant']!r}, scope global): density varies per tensor "
            f"({varying['density']}), but global thresholds exist only for the model-level densities; "
            "give one density per model, or use scope: per_tensor"
        )


SPEC = MethodSpec(
    name="ties",
    summary="TIES-Merging: trim small deltas, elect a sign per entry, average the agreeing deltas.",
    paper="https://arxiv.org/abs/2306.01708",
    params=(
        Param("weight", "float", 1.0, "weight of each model's task vector", per_model=True),
        Param(
            "density",
            "float",
            1.0,
            "fraction of each task vector kept by magnitude (1 = no trim; the paper used 0.2)",
            per_model=True,
            low=0.0,
            low_open=True,
            high=1.0,
        ),
        Param("lambda", "float", 1.0, "scale of the merged task vector"),
        Param(
            "normalize",
            "bool",
            None,
            "divide by the sum of agreeing weights (disjoint mean); default true, false = disjoint sum",
        ),
        Param(
            "merge_func",
            "str",
            None,
            "paper spelling of normalize: mean (= normalize true) or sum (= normalize false)",
            choices=("mean", "sum"),
            tensor_scoped=False,
        ),
        Param(
            "rescale",
            "bool",
            False,
            "multiply each trimmed task vector by |tau|_1 / |trimmed|_1 (mergekit)",
            tensor_scoped=False,
        ),
        Param(
            "variant",
            "str",
            "mergekit",
            "mergekit: exact-k trim, weighted vote, zero sign -> +1; paper: keep >= (k+1)-th largest, "
            "unweighted vote, zero sign -> majority",
            choices=("mergekit", "paper"),
            tensor_scoped=False,
        ),
        Param(
            "scope",
            "str",
            None,
            "where trim/rescale/majority statistics are taken; default per_tensor (mergekit), global (paper)",
            choices=("per_tensor", "global"),
            tensor_scoped=False,
        ),
    ),
    apply=_apply,
    passes=_passes,
    row_chunkable=lambda p: effective_scope(p) == "global",
    check=_check,
    check_varying=_check_varying,
)
