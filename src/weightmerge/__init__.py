"""weightmerge: merge fine-tuned checkpoints of one base model into one model, without training."""

from __future__ import annotations

from weightmerge.api import merge_state_dicts
from weightmerge.emr.result import EMRResult
from weightmerge.methods.registry import METHODS, get_method
from weightmerge.version import __version__

__all__ = ["METHODS", "EMRResult", "__version__", "get_method", "merge_state_dicts"]
