"""A model assembled from layer ranges of other checkpoints (mergekit's ``slices:``), read lazily.

``LayerStack([(src_a, 0, 24), (src_b, 20, 40)])`` is a 44-layer model: its layer ``j`` is layer
``0 + j`` of ``src_a`` for ``j < 24`` and layer ``20 + (j - 24)`` of ``src_b`` after that, renamed
(``model.layers.30.mlp.up_proj.weight`` is ``src_b``'s ``model.layers.26.mlp.up_proj.weight``).
Tensors outside the layer stack come, as in mergekit, from the first range's checkpoint when they
sit before the layers (embeddings: names with ``embed``, ``wte``, ``wpe``) and from the last
range's checkpoint otherwise (final norm, lm_head). ``config`` is the first checkpoint's config with
``num_hidden_layers`` set to the stacked count. Nothing is copied: ``read`` reads the source tensor.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from weightmerge.io.base import TensorInfo, TensorSource

# The numbered block of a layer stack, as weightmerge.config.settings reads it for gradients.
_LAYER_RE = re.compile(r"(?:^|\.)(layers|layer|h|blocks|block|resblocks)\.(\d+)(?=\.|$)")
_BEFORE_LAYERS = re.compile(r"embed|(?:^|\.)(wte|wpe)(?:\.|$)")


def _split(name: str) -> tuple[str, int, str] | None:
    m = _LAYER_RE.search(name)
    if m is None:
        return None
    return name[: m.start(2)], int(m.group(2)), name[m.end(2) :]


class LayerStack:
    """See the module docstring. ``parts``: ``(source, start, stop)``, layers ``[start, stop)``."""

    def __init__(self, parts: Sequence[tuple[TensorSource, int, int]], *, path: str) -> None:
        if not parts:
            raise ValueError("a layer stack needs at least one layer range")
        self.path = path
        self._parts = list(parts)
        self._map: dict[str, tuple[TensorSource, str]] = {}
        out = 0
        for src, start, stop in self._parts:
            if not 0 <= start < stop:
                raise ValueError(f"{src.path}: layer_range [{start}, {stop}] is empty or negative")
            by_layer: dict[int, list[tuple[str, str, str]]] = {}
            for name in src.keys():  # noqa: SIM118  (a TensorSource is not iterable)
                parts_ = _split(name)
                if parts_ is not None:
                    by_layer.setdefault(parts_[1], []).append((name, parts_[0], parts_[2]))
            have = len(by_layer)
            for layer in range(start, stop):
                if layer not in by_layer:
                    raise ValueError(
                        f"{src.path}: layer_range [{start}, {stop}] asks for layer {layer}, but the "
                        f"checkpoint has layers 0..{have - 1}"
                    )
                for name, prefix, suffix in by_layer[layer]:
                    self._map[f"{prefix}{out + layer - start}{suffix}"] = (src, name)
            out += stop - start
        self.num_layers = out
        first, last = self._parts[0][0], self._parts[-1][0]
        for name in first.keys():  # noqa: SIM118
            if _split(name) is None and _BEFORE_LAYERS.search(name):
                self._map[name] = (first, name)
        for name in last.keys():  # noqa: SIM118
            if _split(name) is None and not _BEFORE_LAYERS.search(name):
                self._map[name] = (last, name)
        config = first.config
        self.config: dict[str, Any] | None = (
            None if config is None else {**config, "num_hidden_layers": self.num_layers}
        )

    def keys(self) -> list[str]:
        return list(self._map)

    def info(self, name: str) -> TensorInfo:
        src, inner = self._lookup(name)
        return replace(src.info(inner), name=name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        src, inner = self._lookup(name)
        return src.read(inner, rows)

    def close(self) -> None:
        seen: set[int] = set()
        for src, _a, _b in self._parts:
            if id(src) not in seen:
                seen.add(id(src))
                src.close()

    def _lookup(self, name: str) -> tuple[TensorSource, str]:
        try:
            return self._map[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r} in the stacked layers") from None
