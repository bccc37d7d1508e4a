"""regmean -- Regression Mean: merge linear layers by the closed-form least-squares fit.

For a linear weight W_i (out x in) with input Gram matrices G_i = X_i^T X_i / rows (in x in):

    G_i <- alpha * G_i + (1 - alpha) * diag(G_i)        (alpha = reduce_non_diagonal_ratio)
    W_m  = [ (sum_i G_i)^-1  sum_i G_i W_i^T ]^T

the minimiser of sum_i || X_i W^T - X_i W_i^T ||^2. Every other tensor (biases, norms, embeddings,
weights without a Gram matrix) is the simple average (1/n) sum_i theta_i.

Paper: Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models" (ICLR 2023),
arXiv:2212.09849. Semantics and names follow MergeLM / fusion_bench
(``merging_with_regmean_weights``); the Gram matrices are computed outside this method and passed
as ``gram: [dict module name -> (in, in) tensor, ...]``, one dict per model, keyed by *module* name:
tensor ``"m.weight"`` <-> key ``"m"``. ``weight_transpose: false`` is for layers stored (in x out),
e.g. GPT-2's Conv1D (W_m = (sum G_i)^-1 sum G_i W_i).

Scope: per tensor, not element-wise (a linear solve per layer). Variant choices:

* the system is solved with an LU factorisation (never an explicit inverse). It counts as singular
  when a pivot is 0 or below ``in * eps(dtype) * max|pivot|`` (numerically singular at the compute
  precision), or the solution is not finite. Then the fallback is the pseudo-inverse solution on
  the range of sum G_i plus the simple average on its null space: with sum G_i = V diag(l) V^T,
  W_m^T = V_r diag(1/l_r) V_r^T B + V_0 V_0^T mean_i(W_i^T), the limit of a ridge towards the
  average as the ridge vanishes (inputs never seen by any model keep the averaged weights). All-zero
  Grams therefore give the simple average. Compute in float64 (``compute_dtype``) or shrink the
  off-diagonals (alpha < 1) for ill-conditioned Grams.
* a Gram matrix for a tensor that is not 2-D, or whose size differs from the layer's input size, is
  an error; so are non-finite Grams and Gram dicts keyed by parameter names ("m.weight").
* unlike fusion_bench, Gram matrices are not required for any particular module: modules without
  one are averaged, as the paper does for non-linear parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from weightmerge.methods.aux import check_stats_param, module_name, stats_keys
from weightmerge.methods.base import MethodSpec, Param, TensorCtx


def shrink_off_diagonal(gram: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G) for a stack (..., d, d)."""
    if alpha == 1.0:
        return gram
    diag = torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
    return gram * alpha + diag * (1.0 - alpha)


def _null_space_fallback(s: torch.Tensor, b: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse solution of s @ X = b on range(s), ``avg`` projected on null(s). s: (d, d)."""
    sym = (s + s.T) / 2
    evals, vecs = torch.linalg.eigh(sym)
    top = evals.abs().max()
    tol = top * sym.shape[0] * torch.finfo(sym.dtype).eps
    keep = evals.abs() > tol
    vr, vn = vecs[:, keep], vecs[:, ~keep]
    sol = vr @ ((vr.T @ b) / evals[keep].unsqueeze(1))
    return sol + vn @ (vn.T @ avg)


def solve_gram(s: torch.Tensor, b: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
    """Solve s @ X = b (s: (d, d), b: (d, k)); singular s -> :func:`_null_space_fallback`."""
    lu, pivots, info = torch.linalg.lu_factor_ex(s)
    u = lu.diagonal().abs()
    tol = u.max() * s.shape[0] * torch.finfo(s.dtype).eps
    if int(info) == 0 and bool(u.min() > tol):
        sol = torch.linalg.lu_solve(lu, pivots, b)
        if bool(torch.isfinite(sol).all()):
            return sol
    return _null_space_fallback(s, b, avg)


def regmean_merge(
    weights: torch.Tensor, grams: torch.Tensor, *, alpha: float, weight_transpose: bool
) -> torch.Tensor:
    """weights: (n, out, in) [or (n, in, out) if not weight_transpose]; grams: (n, in, in) -> merged."""
    g = shrink_off_diagonal(grams, alpha=alpha)
    wt = weights.transpose(1, 2) if weight_transpose else weights  # (n, in, out)
    s = g.sum(dim=0)  # (in, in)
    b = torch.bmm(g, wt).sum(dim=0)  # (in, out)
    sol = solve_gram(s, b, wt.mean(dim=0))
    return sol.T if weight_transpose else sol


def _check_gram(name: str, gram: torch.Tensor, shape: tuple[int, ...], weight_transpose: bool) -> None:
    module = module_name(name)
    if len(shape) != 2:
        raise ValueError(
            f"regmean: a Gram matrix is given for module {module!r} but tensor {name!r} has shape "
            f"{shape}; Gram matrices are only for 2-D linear weights"
        )
    d_in = shape[1] if weight_transpose else shape[0]
    if gram.shape[-1] != d_in:
        layout = "(out, in)" if weight_transpose else "(in, out) (weight_transpose: false)"
        raise ValueError(
            f"regmean: Gram matrix of module {module!r} is {tuple(gram.shape[-2:])} but tensor {name!r} "
            f"of shape {shape} read as {layout} has {d_in} inputs"
        )
    if not bool(torch.isfinite(gram).all()):
        raise ValueError(f"regmean: Gram matrix of module {module!r} contains NaN or infinity")


def _apply(ctx: TensorCtx) -> torch.Tensor:
    gram = ctx.aux.get("gram")
    if gram is None:
        return ctx.x.mean(dim=0)
    transpose = bool(ctx.params["weight_transpose"])
    _check_gram(ctx.name, gram, ctx.full_shape, transpose)
    return regmean_merge(
        ctx.x, gram, alpha=float(ctx.params["reduce_non_diagonal_ratio"]), weight_transpose=transpose
    )


def _check(params: Mapping[str, Any], n_models: int) -> None:
    grams = params.get("gram")
    check_stats_param("gram", grams, n_models)
    assert grams is not None
    for i, d in enumerate(grams):
        bad = [k for k in stats_keys(d) if k.endswith(".weight")]
        if bad:
            raise ValueError(
                f"parameter 'gram': model {i} has key {bad[0]!r}; Gram matrices are keyed by module "
                f"name ({bad[0][: -len('.weight')]!r}), not by parameter name"
            )


SPEC = MethodSpec(
    name="regmean",
    summary="Regression Mean: least-squares merge of linear layers from input Gram matrices.",
    paper="https://arxiv.org/abs/2212.09849",
    params=(
        Param(
            "gram",
            "stats",
            None,
            "input Gram matrix per model: a list of dicts module name -> (in, in) tensor",
            required=True,
            layout="module_gram",
        ),
        Param(
            "reduce_non_diagonal_ratio",
            "float",
            1.0,
            "alpha: G <- alpha*G + (1-alpha)*diag(G) (1 keeps G; smaller is better conditioned)",
            low=0.0,
            high=1.0,
        ),
        Param(
            "weight_transpose",
            "bool",
            True,
            "weights are stored (out, in) like nn.Linear; false for (in, out) layouts (GPT-2 Conv1D)",
        ),
    ),
    apply=_apply,
    inputs="weights",
    needs_base=False,
    row_chunkable=False,
    check=_check,
    order_invariant=True,
    examples=({"reduce_non_diagonal_ratio": 0.8},),
)
