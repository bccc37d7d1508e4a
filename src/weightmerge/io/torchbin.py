"""Reading a torch ``.bin`` / ``.pt`` state dict safely.

Only ``torch.load(weights_only=True)`` is used: it unpickles tensors, containers and primitive
types and refuses anything else (custom classes, functions), so a checkpoint cannot run code on
load. A file that needs more is refused with an explanation; the fix is a one-off conversion to
safetensors by someone who trusts the file.

Files in the zip format (torch >= 1.6, the default since) are memory-mapped (``mmap=True``):
loading reads the pickle and maps the storages, tensor data is paged in only when read, so
``info`` is cheap and ``read`` of a row range touches those rows only. Legacy (pre-zip) files
cannot be mapped and are loaded whole into memory.

The loaded object must be a dict of tensors, or a dict whose only dict value under ``state_dict``
or ``model`` is one (common training-script layouts).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import torch

from weightmerge.io._common import TORCH_TO_ST, check_rows
from weightmerge.io.base import TensorInfo


class UnsafeCheckpointError(ValueError):
    """A pickle that ``weights_only`` loading refuses (it would run arbitrary code)."""


def _reason(err: Exception) -> str:
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        return text[text.index(marker) + len(marker) :].strip().splitlines()[0]
    # torch >= 2.6 (2.13 included) puts a generic preamble first and the reason in a later
    # paragraph ("Trying to load unsupported GLOBAL posix.system ..."): keep that paragraph.
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    boiler = ("Weights only load failed", "Check the documentation of torch.load")
    specific = [p for p in paragraphs if not p.startswith(boiler)]
    if specific:
        return specific[0] if len(specific[0]) <= 300 else specific[0][:297] + "..."
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _unsafe(path: str, err: Exception) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refusing to load {path}: it is not a plain tensor state dict ({_reason(err)}). Loading it "
        "would need arbitrary unpickling, which can run code from the file. If you trust the file, "
        'convert it once to safetensors, e.g. python -c "import torch; from safetensors.torch import '
        f"save_file; sd = torch.load('{path}', weights_only=False); save_file({{k: v.contiguous() for "
        "k, v in sd.items()}, 'model.safetensors')\" (clone tensors that share memory), then use that."
    )


def _load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise _unsafe(path, err) from None
    except RuntimeError as err:
        if "mmap can only be used" not in str(err):
            raise ValueError(
                f"cannot read torch checkpoint {path}: {_reason(err)} (corrupted or truncated?)"
            ) from None
    try:  # legacy (pre-zip) serialization: cannot be mapped, load it whole
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _unsafe(path, err) from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(
            f"cannot read torch checkpoint {path}: {_reason(err)} (corrupted or truncated?)"
        ) from None


def _state_dict(path: str, obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [k for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)]
        if len(nested) == 1:
            obj = obj[nested[0]]
    if not isinstance(obj, Mapping):
        raise ValueError(f"torch checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ValueError(
                f"torch checkpoint {path}: entry {k!r} is a {type(v).__name__}, not a tensor; only "
                "flat name -> tensor state dicts are supported"
            )
        if v.dtype not in TORCH_TO_ST or v.layout != torch.strided or v.is_quantized:
            raise ValueError(f"torch checkpoint {path}: tensor {k!r} has unsupported dtype/layout {v.dtype}")
        out[k] = v
    return out


class TorchBinFile:
    """A TensorSource over one torch state-dict file (see the module docstring for what is loaded)."""

    def __init__(self, path: str, *, config: dict[str, Any] | None = None) -> None:
        self.path = path
        self.config = config
        self._sd: dict[str, torch.Tensor] | None = _state_dict(path, _load(path))

    def _tensors(self) -> dict[str, torch.Tensor]:
        if self._sd is None:
            raise ValueError(f"source {self.path} is closed")
        return self._sd

    def keys(self) -> list[str]:
        return sorted(self._tensors())

    def __contains__(self, name: object) -> bool:
        return name in self._tensors()

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self._tensors()[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.path}") from None

    def info(self, name: str) -> TensorInfo:
        t = self._get(name)
        return TensorInfo(name=name, shape=tuple(t.shape), dtype=t.dtype, file=self.path)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self._get(name)
        start, stop = check_rows(name=name, shape=tuple(t.shape), rows=rows)
        return t if rows is None else t[start:stop]

    def close(self) -> None:
        self._sd = None
