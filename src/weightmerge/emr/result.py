"""EMR's results in memory: the per-tensor output of ``apply`` (:class:`EMRTensor`), the whole
merge (:class:`EMRResult`, what ``merge_state_dicts(..., "emr")`` returns) and the one definition
of a task's reconstruction (:func:`emr_reconstruct`), shared by the result, the artifact reader
and in-place task switching (docs/emr-artifact.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EMRTensor:
    """EMR's per-tensor output: the unified task vector and one boolean mask per model."""

    unified: torch.Tensor  # (*shape) compute dtype
    masks: torch.Tensor  # (n_models, *shape) bool


def emr_reconstruct(
    base: torch.Tensor, unified: torch.Tensor, mask: torch.Tensor, rescaler: torch.Tensor
) -> torch.Tensor:
    """Task reconstruction: base + rescaler * mask * unified, computed in the unified vector's
    dtype and cast to the base dtype."""
    delta = unified * mask.to(unified.dtype) * rescaler.to(unified.dtype)
    return (base.to(unified.dtype) + delta).to(base.dtype)


@dataclass(frozen=True)
class EMRResult:
    """EMR output: one unified task vector, a boolean mask and a scalar rescaler per task.

    ``task_state_dict(i)`` reconstructs task i: base + rescaler_i * mask_i * unified on merged
    tensors, base values elsewhere (cast to the base dtype).
    """

    base: dict[str, torch.Tensor]
    unified: dict[str, torch.Tensor]  # compute dtype
    masks: list[dict[str, torch.Tensor]]  # bool
    rescalers: list[float]

    def task_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self.masks):
            raise IndexError(f"task index {i} out of range for {len(self.masks)} tasks")
        out: dict[str, torch.Tensor] = {}
        for name, b in self.base.items():
            u = self.unified.get(name)
            if u is None:
                out[name] = b.clone()
                continue
            r = torch.tensor(self.rescalers[i], dtype=u.dtype)
            out[name] = emr_reconstruct(b, u, self.masks[i][name], r)
        return out
