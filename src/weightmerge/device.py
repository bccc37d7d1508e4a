"""Where the merge arithmetic runs: ``cpu``, ``cuda`` / ``cuda:N``, or ``auto`` (a GPU when torch
sees one, else the CPU).

Inputs are always read into CPU memory; on a GPU each tensor (or row chunk) is stacked there, the
method runs there, and the result is cast to its output dtype and copied back before it is
written. Random draws (DARE, DELLA, PCB's DARE pre-processing) are generated on the CPU and copied,
so they are the same bits on every device; statistics are reduced on the CPU in float64. What may
differ on a GPU is the rounding of reductions inside a method (sums over models, norms), whose
order the GPU kernels choose: element-wise steps (add, multiply, divide, compare, sign) are exact
IEEE operations and give the CPU's bits.
"""

from __future__ import annotations

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> ``cuda`` if available, else ``cpu``; explicit choices are checked."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not one of {DEVICE_CHOICES}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {device!r} is not supported (use {DEVICE_CHOICES})")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA GPU here (torch {torch.__version__})")
    count = torch.cuda.device_count()
    if dev.index is not None and not 0 <= dev.index < count:
        raise ValueError(f"device {device!r}: there are {count} CUDA device(s), indices 0..{count - 1}")
    return dev
