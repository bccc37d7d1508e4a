"""weightmerge: merge fine-tuned checkpoints of one base model into one model, without training."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weightmerge.version import __version__

if TYPE_CHECKING:
    from weightmerge.api import merge_state_dicts
    from weightmerge.emr.result import EMRResult
    from weightmerge.methods.registry import METHODS, get_method

__all__ = ["METHODS", "EMRResult", "__version__", "get_method", "merge_state_dicts"]

# Imported on first use, so that `import weightmerge.config` (and the command line's --help,
# --version and config errors) does not pay for torch.
_LAZY = {
    "EMRResult": "weightmerge.emr.result",
    "merge_state_dicts": "weightmerge.api",
    "METHODS": "weightmerge.methods.registry",
    "get_method": "weightmerge.methods.registry",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'weightmerge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
