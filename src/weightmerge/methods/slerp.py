"""slerp -- spherical linear interpolation between the base and one other model.

Per tensor, both tensors flattened (v0 = base, v1 = the model):

    u0 = v0 / |v0|, u1 = v1 / |v1|        (a norm <= 1e-8 counts as 1)
    d  = clamp(<u0, u1>, -1, 1)
    |d| > 0.9995:  theta_m = (1 - t) v0 + t v1                          (nearly collinear: lerp)
    otherwise:     Omega = arccos d
                   theta_m = sin((1 - t) Omega) / sin Omega * v0 + sin(t Omega) / sin Omega * v1

on the un-normalised tensors. t = 0 gives the base, t = 1 the model.

Reference: Shoemake, "Animating rotation with quaternion curves" (SIGGRAPH 1985); used for model
merging by mergekit. mergekit 0.1.5 semantics and names (``t``, per tensor; mergekit gradients such
as ``t: [0, 0.5, 1]`` over layers are resolved by the config layer). In mergekit the two inputs
are ``base_model`` and one other model; here the base is ``base`` and the other model is the one
entry of ``models``. Computed in the compute dtype (mergekit: float32, or float64 for float64
inputs). Per tensor (a whole-tensor angle), not row-chunked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """Spherical interpolation of two same-shape tensors, flattened as one vector each."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    # t in the compute dtype, so 1 - t rounds as mergekit's
    tt = torch.tensor(t, dtype=v0.dtype, device=v0.device)
    if a.numel() == 0:
        return v0.clone()
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = torch.where(na > NORM_EPS, na, torch.ones_like(na))
    nb = torch.where(nb > NORM_EPS, nb, torch.ones_like(nb))
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if bool(dot.abs() > DOT_THRESHOLD):
        return (1 - tt) * v0 + tt * v1
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    return (torch.sin((1 - tt) * omega) / sin_omega) * v0 + (torch.sin(tt * omega) / sin_omega) * v1


def _apply(ctx: TensorCtx) -> Tensor:
    assert ctx.base is not None
    return slerp(float(ctx.params["t"]), ctx.base, ctx.x[0])


SPEC = MethodSpec(
    name="slerp",
    summary="Spherical interpolation between the base (t = 0) and one model (t = 1).",
    paper="https://en.wikipedia.org/wiki/Slerp",
    params=(Param("t", "float", None, "interpolation factor: 0 = base, 1 = the model", required=True),),
    apply=_apply,
    inputs="weights",
    needs_base=True,
    min_models=1,
    max_models=1,
    row_chunkable=False,
    examples=({"t": 0.3},),
)
