"""passthrough -- copy one model's tensors unchanged (optionally scaled).

    theta_m = theta_1              (scale unset)
    theta_m = scale * theta_1      (scale given)

mergekit 0.1.5 semantics and names (``scale``, per model). Exactly one model; a base model, if
given, is not used (it only supplies tensors the model lacks). mergekit uses passthrough with
``slices`` to stack layers of different models ("frankenmerges"); assembling such layer stacks is
the config layer's job, this method only copies. Element-wise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from weightmerge.methods.base import MethodSpec, Param, TensorCtx

if TYPE_CHECKING:
    from torch import Tensor


def _apply(ctx: TensorCtx) -> Tensor:
    scale = ctx.params["scale"][0]
    out = ctx.x[0]
    return out if scale is None else out * float(scale)


SPEC = MethodSpec(
    name="passthrough",
    summary="Copy the single model's tensors (optionally multiplied by scale).",
    paper="",
    params=(Param("scale", "float", None, "multiply the tensor by this factor", per_model=True),),
    apply=_apply,
    inputs="weights",
    needs_base=False,
    min_models=1,
    max_models=1,
    examples=({"scale": 0.5},),
)
