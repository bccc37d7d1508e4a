"""nearswap -- take the other model's value where it is close to the base.

Element-wise, a = base, b = the model, threshold t >= 0:

    w       = clamp(t / max(|a - b|, 1e-6), 0, 1)
    theta_m = w * b + (1 - w) * a

so entries differing by at most t take b's value and larger differences move only t towards b.

Reference: "NearSwap", alchemonaut/QuartetAnemoi-70B-t0.0001 (model card); mergekit 0.1.5
semantics and names (``t``, required). In mergekit the two inputs are ``base_model`` and one other
model; here the base is ``base`` and the other model is the one entry of ``models``. Element-wise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor

DIFF_FLOOR = 1e-6


def nearswap(t: float, a: Tensor, b: Tensor) -> Tensor:
    w = (t / (a - b).abs().clamp(min=DIFF_FLOOR)).clamp(0, 1)
    return w * b + (1 - w) * a


def _apply(ctx: TensorCtx) -> Tensor:
    assert ctx.base is not None
    return nearswap(float(ctx.params["t"]), ctx.base, ctx.x[0])


SPEC = MethodSpec(
    name="nearswap",
    summary="Per element, move the base towards the model by at most t (swap where they are close).",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    params=(Param("t", "float", None, "similarity threshold (>= 0)", required=True, low=0.0),),
    apply=_apply,
    inputs="weights",
    needs_base=True,
    min_models=1,
    max_models=1,
)
