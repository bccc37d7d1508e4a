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

Two implementations, chosen in one place (``_fused``): the reference below (torch ops, any
device) and the fused CPU path of ``_ties_fused`` (numba kernels; float32/float64 CPU tensors, no
rescale, per-tensor scope only for the mergekit variant). They give the same bits
(``tests/test_kernels.py``); ``WEIGHTMERGE_KERNELS=0`` forces the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from weightmerge import kernels
from weightmerge.methods import _ties_fused
from weightmerge.methods._sign import agreement, elect_sign, majority_sign, merge_agreeing, model_view
from weightmerge.methods._ties_fused import nan_error
from weightmerge.methods.base import (
    MethodSpec,
    OrderStat,
    Param,
    Reduce,
    StatRequest,
    TensorCtx,
    row_partials,
)

if TYPE_CHECKING:
    from torch import Tensor

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
        raise nan_error(name)
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
    if _fused(ctx.x, rescale=rescale, scope="global", variant="paper"):  # no trimmed copy; same signs
        thr = _global_thresholds(densities, ctx.stats, ctx.name).to(ctx.x.dtype)
        trim = torch.tensor([d < 1 for d in densities])
        elected = _ties_fused.vote_signs(ctx.x, thr, trim).unsqueeze(0)
        return row_partials(elected, len(ctx.full_shape)).expand(ctx.n_models, -1)
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


def _fused(*tensors: Tensor, rescale: bool, scope: str, variant: str) -> bool:
    """The one choice between the two implementations: the fused CPU path where it applies (the
    kernels run on these tensors, no rescale, per-tensor scope only for mergekit's exact-k trim),
    the reference torch code everywhere else."""
    if rescale or not kernels.usable(*tensors):
        return False
    return scope == "global" or variant == "mergekit"


def _apply(ctx: TensorCtx) -> Tensor:
    assert ctx.base is not None
    p = ctx.params
    scope, variant, rescale = effective_scope(p), p["variant"], bool(p["rescale"])
    if _fused(ctx.base, ctx.x, rescale=rescale, scope=scope, variant=variant):
        return _apply_fused(ctx, scope)
    return _apply_reference(ctx, scope)


def _apply_reference(ctx: TensorCtx, scope: str) -> Tensor:
    assert ctx.base is not None
    p, x = ctx.params, ctx.x
    variant, densities, rescale = p["variant"], p["density"], bool(p["rescale"])
    majority: Tensor | None = None
    if scope == "global":
        trim_global(x, densities, ctx.stats, name=ctx.name, inplace=True)
        if rescale:
            x.mul_(model_view(_rescale_factors(ctx.stats, x.dtype), x))
        if variant == "paper":
            majority = torch.sign(ctx.stats[MAJORITY][0]).to(x.dtype)
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


def _apply_fused(ctx: TensorCtx, scope: str) -> Tensor:
    assert ctx.base is not None
    p, x = ctx.params, ctx.x
    densities, lam, normalize = p["density"], float(p["lambda"]), effective_normalize(p)
    w = torch.tensor(p["weight"], dtype=x.dtype)
    if scope == "global":
        paper = p["variant"] == "paper"
        return _ties_fused.global_scope(
            ctx.base,
            x,
            w,
            _global_thresholds(densities, ctx.stats, ctx.name).to(x.dtype),  # as trim_global casts it
            torch.tensor([d < 1 for d in densities]),
            lam=lam,
            normalize=normalize,
            weighted_vote=not paper,
            zero_pos=bool(torch.sign(ctx.stats[MAJORITY][0]) > 0) if paper else True,
        )
    numel = x[0].numel()
    ranks = [threshold_rank(numel=numel, density=d, variant="mergekit") for d in densities]
    return _ties_fused.per_tensor(ctx.base, x, ranks, w, lam=lam, normalize=normalize, name=ctx.name)


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
    order_invariant=True,
    examples=(
        {"density": 0.3},  # the fused per-tensor path
        {"density": 0.3, "rescale": True},  # the reference per-tensor path
        {"density": 0.2, "variant": "paper"},  # global scope, fused
        {"density": 0.3, "scope": "global", "rescale": True},  # global scope, reference
        {"density": 0.2, "variant": "paper", "merge_func": "sum", "lambda": 0.5},
    ),
)
