"""pcb -- PCB-Merging (Parameter Competition Balancing), the authors' code (variant A by default).

Per model row i of the task vectors T (n x D), with c = ``clamp_ratio``, r = ``keep_ratio``:

    A      = |T|;  lo_i = sort(A_i)[floor(D*c)],  hi_i = sort(A_i)[floor(D*(1-c)) - 1]   (0-based)
    A^     = min(max(A, lo_i), hi_i);  Tc = sign(T) * A^          (outliers clipped; Tc is merged)
    U      = (A^ - min A^_i) / (max A^_i - min A^_i)               (= (A^ - lo_i)/(hi_i - lo_i))
    intra  = exp(n * U^2 - n)                                      (authors: exp(n U^2); same W)
    inter  = A: tanh(T * S), S = sum_j T_j                         (raw, unclamped T)
             B: tanh(T * sum_j V_j),  V_j = sign(T_j) * U_j
             C: sum_j tanh(V_i * V_j)
    beta   = intra * inter
    thr_i  = sort(beta_i)[floor(D*(1-r))];  W = (max(beta, thr_i) - thr_i) / (max beta_i - thr_i)
    tau    = sum_i W_i * (lambda_i * Tc_i) / max(sum_i W_i, 1e-12);   theta = theta_0 + tau

Paper: Du et al., "Parameter Competition Balancing for Model Merging" (NeurIPS 2024),
arXiv:2410.02396; semantics of duguodong7/pcb-merging (docs/methods/pcb.md). The code differs from
the paper (exp/tanh instead of softmax, outlier clamping, "beta - threshold" weights; the list is in
docs/methods/pcb.md); we follow the code. Variant A is ``pcb-merging.py``/NLP
``task_para_att_merge``; B and C are the vision scripts. ``lambda`` (scalar or one per model) is
applied inside the weighted mean as in the vision/ES scripts; a scalar lambda equals the NLP
scripts' theta_0 + lambda * tau.

Scope: ``global`` (default, as the authors ran it) takes every statistic per model over all merged
tensors concatenated in sorted name order: pass 1 finds lo_i, hi_i (exact order statistics of
|T|: a sampling sweep, which also keeps the columns of T at the sampled positions, then a
gathering sweep), pass 2 thr_i (order statistic of beta, its sample computed from those columns,
so one gathering sweep) and max beta_i; the apply pass is then element-wise (chunkable). Four
sweeps in all. ``per_tensor`` takes the same statistics inside each tensor (small tensors then clip
their largest entry: floor(D*(1-c)) - 1 < D - 1 as soon as D*c > 0).

Optional ``dare_drop_rate`` p ("PCB after DARE"): every task-vector entry is first dropped where
its seeded uniform draw u >= 1 - p (the same keep rule u < density as ``dare_*``, so equal seeds
give equal masks) and the rest is scaled by 1/(1-p); the draws depend only on (seed,
tensor, model, element), so every pass and every chunking sees the same T.

Degenerate inputs (documented, always finite): a row whose clamped magnitudes are constant
(max A^ = min A^, e.g. an all-zero task vector) gets U = 0; when lo_i > hi_i (only for tiny D with
c near 0.5) A^ = hi_i everywhere (torch.clamp's rule); a row with max beta = thr gets W = 0; a
column whose weights are all 0 keeps the base value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from weightmerge.methods._random import uniform
from weightmerge.methods.base import (
    MethodSpec,
    OrderStat,
    Param,
    Reduce,
    SampleCapture,
    StatRequest,
    TensorCtx,
)

if TYPE_CHECKING:
    from torch import Tensor

LO, HI, THR, BETA_MAX = "pcb.lo", "pcb.hi", "pcb.thr", "pcb.beta_max"
T_SAMPLE = "pcb.t_sample"  # task-vector columns at the sampling positions (a capture, not a stat)
INTERS = ("A", "B", "C")
SCOPES = ("global", "per_tensor")
WEIGHT_SUM_FLOOR = 1e-12  # the authors' guard on sum_i W_i

# ---------------------------------------------------------------------------------------------
# Ranks (0-based, ascending) of the order statistics, for a row of D values


def clamp_ranks(*, numel: int, clamp_ratio: float) -> tuple[int, int]:
    """(rank of lo, rank of hi): floor(D*c) and floor(D*(1-c)) - 1 (the latter 0 when D = 1, where
    the authors' index -1 also names the only element)."""
    return math.floor(numel * clamp_ratio), max(math.floor(numel * (1 - clamp_ratio)) - 1, 0)


def drop_rank(*, numel: int, keep_ratio: float) -> int:
    """Rank of the drop threshold: floor(D*(1-r)) (only entries strictly above it are kept)."""
    return math.floor(numel * (1 - keep_ratio))


# ---------------------------------------------------------------------------------------------
# Pure element-wise pieces on flat rows: t (n, m) task vectors, stats (n, 1)


def dare_drop(
    t: Tensor, *, rates: Sequence[float], seed: int, name: str, offset: int, full_numel: int, inplace: bool
) -> Tensor:
    """Keep entry e of model i where uniform(seed, name, i, e) < 1 - p_i (DARE's keep rule, shared with
    ``dare_linear``/``dare_ties``), zero the rest, scale the kept ones by 1/(1-p_i).

    ``t``: (n, m), the chunk's flat elements ``[offset, offset + m)`` of tensor ``name``.
    """
    out = t if inplace else t.clone()
    for i, p in enumerate(rates):
        if not p:
            continue
        u = uniform(seed, name, i, offset, t.shape[1], full_numel).to(t.device)
        out[i].masked_fill_(~(u < 1.0 - p), 0.0).mul_(1.0 / (1.0 - p))
    return out


def clamp_magnitudes(t: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """A^ = min(max(|t|, lo), hi) per row (hi wins when lo > hi, like torch.clamp)."""
    a = t.abs()
    return torch.minimum(torch.maximum(a, lo, out=a), hi, out=a)  # in place: no temporaries


def unit_magnitudes(a_hat: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Row-wise min-max of A^ given its bounds: min A^ = min(lo, hi), max A^ = hi; a constant row -> 0."""
    low = torch.minimum(lo, hi)
    span = hi - low
    flat = span > 0
    safe = torch.where(flat, span, torch.ones_like(span))
    u = (a_hat - low).div_(safe)  # the same two ops as (a_hat - low) / safe, one temporary
    if not bool(flat.all()):
        u.masked_fill_(flat.logical_not(), 0.0)
    return u


def competition_scores(t: Tensor, u: Tensor, *, inter: str) -> Tensor:
    """beta = intra * inter, (n, m). ``t`` raw task vectors, ``u`` their unit clamped magnitudes."""
    n = t.shape[0]
    intra = (u * u).mul_(n).sub_(n).exp_()  # exp(n U^2) / e^n: a per-row constant factor, W unchanged
    if inter == "A":
        return intra.mul_((t * t.sum(dim=0)).tanh_())  # in place: the same ops, fewer temporaries
    else:
        v = torch.sign(t) * u
        if inter == "B":
            cross = torch.tanh(t * v.sum(dim=0))
        else:
            cross = torch.zeros_like(v)
            for j in range(n):
                cross += torch.tanh(v * v[j])
    return intra * cross


def drop_weights(beta: Tensor, thr: Tensor, beta_max: Tensor) -> Tensor:
    """W = (max(beta, thr) - thr) / (max beta - thr) per row; a row with max beta == thr -> 0."""
    span = beta_max - thr
    flat = span > 0
    safe = torch.where(flat, span, torch.ones_like(span))
    w = torch.maximum(beta, thr).sub_(thr).div_(safe)  # the ops of (max(beta, thr) - thr) / safe
    if not bool(flat.all()):
        w.masked_fill_(flat.logical_not(), 0.0)
    return w


def weighted_mix(w: Tensor, tc: Tensor, lam: Tensor) -> Tensor:
    """tau = sum_i W_i (lambda_i Tc_i) / max(sum_i W_i, 1e-12), (m,). ``lam``: (n, 1)."""
    return (w * (lam * tc)).sum(dim=0) / w.sum(dim=0).clamp(min=WEIGHT_SUM_FLOOR)


# ---------------------------------------------------------------------------------------------
# Per chunk, given the statistics


def _task_vectors(ctx: TensorCtx, *, inplace: bool, check: bool = True) -> Tensor:
    """(n, m) flat task vectors of the chunk, after the optional DARE drop. ``check``: refuse NaN
    and infinities (global scope checks them in its first sweep only: later sweeps read the same
    values)."""
    t = ctx.x.reshape(ctx.n_models, -1)
    # a finite sum proves every entry finite; only a non-finite one takes the exact look
    if check and not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"pcb: NaN or infinite task-vector entries in tensor {ctx.name!r}")
    rates = ctx.params["dare_drop_rate"]
    if any(rates):
        t = dare_drop(
            t,
            rates=rates,
            seed=ctx.seed,
            name=ctx.name,
            offset=ctx.element_offset,
            full_numel=math.prod(ctx.full_shape),
            inplace=inplace,
        )
    return t


def _col(stat: Tensor, like: Tensor) -> Tensor:
    return stat.to(like.dtype).reshape(-1, 1)


def _beta(t: Tensor, lo: Tensor, hi: Tensor, *, inter: str) -> tuple[Tensor, Tensor]:
    """(clamped magnitudes A^, beta) of flat task vectors ``t`` given the clamp bounds (n, 1)."""
    a_hat = clamp_magnitudes(t, lo, hi)
    return a_hat, competition_scores(t, unit_magnitudes(a_hat, lo, hi), inter=inter)


def _mix(t: Tensor, a_hat: Tensor, beta: Tensor, thr: Tensor, beta_max: Tensor, lam: Tensor) -> Tensor:
    """The merged task vector (m,) from the flat task vectors ``t`` (n, m), their clamped
    magnitudes and scores (overwritten) and the row statistics (n, 1)."""
    w = drop_weights(beta, thr, beta_max)
    del beta
    tc = a_hat.mul_(torch.sign(t))
    return weighted_mix(w, tc, lam)


def _lambdas(ctx: TensorCtx) -> Tensor:
    return torch.tensor(ctx.params["lambda"], dtype=ctx.x.dtype, device=ctx.x.device).reshape(-1, 1)


def _clamp_bounds(t: Tensor, clamp_ratio: float) -> tuple[Tensor, Tensor]:
    """(lo, hi), each (n, 1), of one whole tensor's rows ``t`` (n, D), by selection."""
    lo_rank, hi_rank = clamp_ranks(numel=t.shape[1], clamp_ratio=clamp_ratio)
    mag = t.abs()
    lo = torch.kthvalue(mag, lo_rank + 1, dim=1, keepdim=True).values
    hi = torch.kthvalue(mag, hi_rank + 1, dim=1, keepdim=True).values
    return lo, hi


def _apply(ctx: TensorCtx) -> Tensor:
    assert ctx.base is not None
    p = ctx.params
    t = _task_vectors(ctx, inplace=True, check=p["scope"] == "per_tensor")
    if t.shape[1] == 0:
        return ctx.base.clone()
    if p["scope"] == "per_tensor":
        lo, hi = _clamp_bounds(t, p["clamp_ratio"])
        a_hat, beta = _beta(t, lo, hi, inter=p["inter"])
        rank = drop_rank(numel=t.shape[1], keep_ratio=p["keep_ratio"])
        thr = torch.kthvalue(beta, rank + 1, dim=1, keepdim=True).values
        beta_max = beta.amax(dim=1, keepdim=True)
    else:
        lo, hi, thr, beta_max = (_col(ctx.stats[k], t) for k in (LO, HI, THR, BETA_MAX))
        a_hat, beta = _beta(t, lo, hi, inter=p["inter"])
    tau = _mix(t, a_hat, beta, thr, beta_max, _lambdas(ctx))
    return ctx.base + tau.reshape(ctx.base.shape)


# ---------------------------------------------------------------------------------------------
# Global scope: statistics passes


def _sweep_task_vectors(ctx: TensorCtx) -> Tensor:
    """The chunk's flat task vectors (n, m), computed once per chunk and sweep (|T| and the
    capture for the beta sample read them)."""
    if "pcb.t" not in ctx.memo:
        ctx.memo["pcb.t"] = _task_vectors(ctx, inplace=False)
    return ctx.memo["pcb.t"]


def _magnitudes(ctx: TensorCtx) -> Tensor:
    """|T| of the chunk; lo and hi rank the same values, so one sweep computes them once."""
    if "pcb.abs" not in ctx.memo:
        ctx.memo["pcb.abs"] = _sweep_task_vectors(ctx).abs()
    return ctx.memo["pcb.abs"]


def _beta_sample(stats: Mapping[str, Tensor], captures: Mapping[str, Tensor], *, inter: str) -> Tensor:
    """beta at the sampling positions, from the task-vector columns captured there in the first
    pass and the clamp bounds it found: the threshold's sample without a sampling sweep (beta of a
    column depends only on that column of T and on lo, hi)."""
    t = captures[T_SAMPLE]
    return _beta(t, _col(stats[LO], t), _col(stats[HI], t), inter=inter)[1]


def _global_beta(ctx: TensorCtx) -> Tensor:
    """beta of the chunk, computed once per sweep for the threshold and the row maximum."""
    if "pcb.beta" not in ctx.memo:
        t = _task_vectors(ctx, inplace=False, check=False)  # checked in the first sweep
        lo, hi = _col(ctx.stats[LO], t), _col(ctx.stats[HI], t)
        ctx.memo["pcb.beta"] = _beta(t, lo, hi, inter=ctx.params["inter"])[1]
    return ctx.memo["pcb.beta"]


def _beta_row_max(ctx: TensorCtx) -> Tensor:
    """(n, 1) float64 max of beta over the chunk (a max needs no per-row partials to be exact)."""
    beta = _global_beta(ctx)
    if beta.shape[1] == 0:
        return torch.full((beta.shape[0], 1), -math.inf, dtype=torch.float64, device=beta.device)
    return beta.amax(dim=1, keepdim=True).to(torch.float64)


def _passes(p: Mapping[str, Any]) -> Sequence[Sequence[StatRequest]]:
    if p["scope"] != "global":
        return ()
    c, r = p["clamp_ratio"], p["keep_ratio"]
    # four sweeps: |T| sample (+ T captured at the sampling positions), |T| gather -> lo, hi;
    # beta gather (its sample computed from the capture) + max beta -> thr, max beta; apply
    return (
        (
            # |T| of task vectors checked finite in this sweep: no NaN
            OrderStat(LO, _magnitudes, lambda d: clamp_ranks(numel=d, clamp_ratio=c)[0], nan_free=True),
            OrderStat(HI, _magnitudes, lambda d: clamp_ranks(numel=d, clamp_ratio=c)[1], nan_free=True),
            SampleCapture(T_SAMPLE, _sweep_task_vectors),
        ),
        (
            OrderStat(
                THR,
                _global_beta,
                lambda d: drop_rank(numel=d, keep_ratio=r),
                presample=partial(_beta_sample, inter=p["inter"]),
            ),
            Reduce(BETA_MAX, _beta_row_max, op="max"),
        ),
    )


def _draws_nothing(p: Mapping[str, Any]) -> bool:
    """The model order matters only through the random draws (seeded by the model's index): none
    are made when no DARE pre-processing."""
    return all(d == 0 for d in p["dare_drop_rate"])


SPEC = MethodSpec(
    name="pcb",
    summary="PCB-Merging: clip outliers, score intra/inter-task competition, weighted mean of the top ratio.",
    paper="https://arxiv.org/abs/2410.02396",
    params=(
        Param(
            "keep_ratio",
            "float",
            0.1,
            "fraction r of each task vector's entries kept (by competition score); not a drop rate",
            low=0.0,
            high=1.0,
            low_open=True,
            tensor_scoped=False,
        ),
        Param(
            "clamp_ratio",
            "float",
            0.01,
            "fraction c of the smallest and largest magnitudes clipped to the order statistics",
            low=0.0,
            high=0.5,
            high_open=True,
            tensor_scoped=False,
        ),
        Param(
            "lambda",
            "float",
            1.0,
            "scale of each task vector inside the weighted mean (a scalar = theta_0 + lambda tau)",
            per_model=True,
        ),
        Param(
            "inter",
            "str",
            "A",
            "inter-task score: A tanh(T*sum T) (authors' main code), B tanh(T*sum V), C sum tanh(V_i V_j)",
            choices=INTERS,
            tensor_scoped=False,
        ),
        Param(
            "scope",
            "str",
            "global",
            "statistics over the whole model (global, as the authors) or inside each tensor",
            choices=SCOPES,
            tensor_scoped=False,
        ),
        Param(
            "dare_drop_rate",
            "float",
            0.0,
            "DARE pre-processing: drop each task-vector entry with this probability, rescale 1/(1-p)",
            per_model=True,
            low=0.0,
            high=1.0,
            high_open=True,
            tensor_scoped=False,
        ),
    ),
    apply=_apply,
    passes=_passes,
    row_chunkable=lambda p: p["scope"] == "global",
    order_invariant=_draws_nothing,
    examples=(
        {"keep_ratio": 0.2},
        {"keep_ratio": 0.2, "scope": "per_tensor", "inter": "C"},
        {"keep_ratio": 0.3, "dare_drop_rate": 0.3},
    ),
)
