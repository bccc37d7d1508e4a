"""weightmerge: merge fine-tuned checkpoints of one base model into one model, without training."""

from __future__ import annotations

__version__ = "0.1.0"

from weightmerge.api import EMRResult, merge_state_dicts
from weightmerge.methods.registry import METHODS, get_method

__all__ = ["METHODS", "EMRResult", "__version__", "get_method", "merge_state_dicts"]
