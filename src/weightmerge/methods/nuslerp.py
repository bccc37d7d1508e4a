"""nuslerp -- SLERP of two models (or of their task vectors) with weight-derived t.

With weights w_a, w_b of the two models: t = w_b / (w_a + w_b) (t = 1/2 if |w_a + w_b| < 1e-6).

    no base:  theta_m = slerp(t, theta_a, theta_b)
    base:     theta_m = theta_0 + slerp(t, tau_a, tau_b)           tau = theta - theta_0

    slerp(t, v0, v1): u = v / max(|v|, 1e-7);  c = clamp(<u0, u1>, -1, 1);  Theta = arccos c
                      (sin((1-t) Theta) v0 + sin(t Theta) v1) / sin Theta,
                      (1-t) v0 + t v1 where 1 - c^2 <= 1e-16 (collinear)

taken over the whole flattened tensor (``nuslerp_flatten: true``, the default), or per vector
along the last dim (each row; ``nuslerp_flatten: false``), or per column (``nuslerp_row_wise:
true``, which transposes dims 0 and -1 first, as mergekit does).

mergekit 0.1.5 semantics and names (``weight``, ``nuslerp_flatten``, ``nuslerp_row_wise``); weights
default to 1 here (mergekit requires them). Per tensor; row-chunkable when neither flattened nor
column-wise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor

UNIT_FLOOR = 1e-7
COLLINEAR_EPS = 1e-8


def nuslerp(t: float, v0: Tensor, v1: Tensor, *, flatten: bool, row_wise: bool) -> Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=UNIT_FLOOR)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=UNIT_FLOOR)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= COLLINEAR_EPS**2
    theta = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp_t(weights: tuple[float, ...]) -> float:
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _apply(ctx: TensorCtx) -> Tensor:
    p = ctx.params
    t = nuslerp_t(tuple(float(w) for w in p["weight"]))
    flat, rows = bool(p["nuslerp_flatten"]), bool(p["nuslerp_row_wise"])
    if ctx.base is None:
        return nuslerp(t, ctx.x[0], ctx.x[1], flatten=flat, row_wise=rows)
    tau = ctx.x.sub_(ctx.base)
    return ctx.base + nuslerp(t, tau[0], tau[1], flatten=flat, row_wise=rows)


def _row_chunkable(params: Mapping[str, Any]) -> bool:
    return not params["nuslerp_flatten"] and not params["nuslerp_row_wise"]


SPEC = MethodSpec(
    name="nuslerp",
    summary="SLERP of two models (or their task vectors, with a base), t from the two weights.",
    paper="https://github.com/arcee-ai/mergekit",
    params=(
        Param("weight", "float", 1.0, "relative weight of each of the two models", per_model=True),
        Param(
            "nuslerp_flatten",
            "bool",
            True,
            "interpolate the whole flattened tensor (false: each row separately)",
            tensor_scoped=False,
        ),
        Param(
            "nuslerp_row_wise",
            "bool",
            False,
            "without flatten: interpolate columns (vectors along dim 0) instead of rows",
            tensor_scoped=False,
        ),
    ),
    apply=_apply,
    inputs="weights",
    needs_base=False,
    min_models=2,
    max_models=2,
    row_chunkable=_row_chunkable,
    order_invariant=True,
    examples=(
        {"weight": [1.0, 3.0]},
        {"nuslerp_flatten": False},
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    ),
)
