"""Deferred imports for the command line: ``import torch`` binds a stand-in module that imports
the real one on first attribute access.

The method modules import torch at their top, but commands that touch no tensor data (``--help``,
``--version``, ``methods``, ``validate``, every config or path error) never use it: with
:func:`defer` installed first (``weightmerge.cli.main`` does), they answer without paying for
torch, numba or transformers. The first use (``torch.zeros``, ``import torch.nn``, ...) imports the
real module, puts it back in ``sys.modules`` and copies its namespace onto the stand-in, so code
that bound the stand-in sees the real module from then on. Module-level code of weightmerge must
therefore not touch ``torch.<name>`` at import time (annotations only under ``TYPE_CHECKING``);
``tests/test_cli_startup.py`` keeps that true.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

HEAVY = ("torch", "numba", "transformers")


class _Deferred(types.ModuleType):
    """Stands in for a top-level package until an attribute is read."""

    def __getattr__(self, attr: str) -> Any:
        real = _load(self)
        return getattr(real, attr)

    def __dir__(self) -> list[str]:
        return dir(_load(self))


def _load(stand_in: _Deferred) -> types.ModuleType:
    name = stand_in.__name__
    real = stand_in.__dict__.get("_deferred_real")
    if real is None:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
        real = importlib.import_module(name)
        stand_in.__dict__.update(real.__dict__)
        stand_in.__dict__["_deferred_real"] = real
    return real


def defer(*names: str) -> None:
    """Install stand-ins for the top-level packages ``names`` (default :data:`HEAVY`) that are
    installed but not imported yet; others are left alone."""
    for name in names or HEAVY:
        if name in sys.modules or importlib.util.find_spec(name) is None:
            continue
        spec = importlib.util.find_spec(name)
        stand_in = _Deferred(name)
        stand_in.__spec__ = None  # the import system sees a finished module
        # inspect.getmodule reads every module's __file__: that must not import the package
        stand_in.__file__ = spec.origin if spec is not None else None
        sys.modules[name] = stand_in


def loaded(name: str) -> bool:
    """True when the real package ``name`` has been imported (not just its stand-in)."""
    module = sys.modules.get(name)
    if module is None:
        return False
    return not isinstance(module, _Deferred) or "_deferred_real" in module.__dict__
