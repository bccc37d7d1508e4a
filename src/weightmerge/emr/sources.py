"""Base-model access for EMR artifacts: any TensorSource, an in-memory dict, or a path; and the
base identity (path + content hashes) recorded in the artifact so a wrong base is refused.

Identity = sha256 per tensor over its raw stored bytes (row-major, little-endian, in its stored
dtype), then

    header_sha256  = sha256 of the JSON list [[name, dtype, shape], ...]           (sorted names)
    content_sha256 = sha256 of the JSON list [[name, dtype, shape, sha256], ...]   (sorted names)

so the identity depends on the tensors only, not on how the checkpoint is sharded or stored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from weightmerge.emr.files import dtype_name
from weightmerge.io.base import TensorInfo, TensorSource
from weightmerge.io.memory import DictSource
from weightmerge.io.safetensors_format import tensor_bytes

HASH_CHUNK_BYTES = 64 * 2**20
Rows = tuple[int, int] | None


def open_base(base: TensorSource | Mapping[str, torch.Tensor] | str | os.PathLike[str]) -> TensorSource:
    """A TensorSource for ``base``: returned as is, wrapped (dict), or opened (path)."""
    if isinstance(base, (str, os.PathLike)):
        from weightmerge.io.sources import open_source

        return open_source(str(base))
    if isinstance(base, TensorSource):
        return base
    if isinstance(base, Mapping):
        return DictSource(base)
    raise TypeError(f"base must be a TensorSource, a dict of tensors or a path, got {type(base).__name__}")


def row_chunks(shape: tuple[int, ...], row_bytes: int, max_bytes: int) -> Iterator[Rows]:
    """Row ranges of at most ``max_bytes`` (at least one row); None for tensors of < 2 dims."""
    if len(shape) < 2 or shape[0] == 0:
        yield None
        return
    rows = max(1, max_bytes // max(row_bytes, 1))
    if rows >= shape[0]:
        yield None
        return
    for start in range(0, shape[0], rows):
        yield (start, min(shape[0], start + rows))


def _row_bytes(info: TensorInfo) -> int:
    return info.nbytes // info.shape[0] if len(info.shape) >= 2 and info.shape[0] else info.nbytes


def _read_rows(src: TensorSource, name: str, rows: Rows) -> torch.Tensor:
    return src.read(name, rows)


def tensor_sha256(read: Callable[[Rows], torch.Tensor], info: TensorInfo) -> str:
    """sha256 of a tensor's stored bytes, read in row chunks of at most ``HASH_CHUNK_BYTES``."""
    h = hashlib.sha256()
    for rows in row_chunks(info.shape, _row_bytes(info), HASH_CHUNK_BYTES):
        t = read(rows)
        if t.dtype != info.dtype:
            raise TypeError(f"tensor {info.name!r}: read {t.dtype}, the header says {info.dtype}")
        h.update(tensor_bytes(t).data)
    return h.hexdigest()


def _listing(tensors: Mapping[str, Mapping[str, Any]], *, digests: bool) -> bytes:
    rows = [
        [k, v["dtype"], list(v["shape"]), *([v["sha256"]] if digests else [])]
        for k, v in sorted(tensors.items())
    ]
    return json.dumps(rows, separators=(",", ":")).encode()


def header_sha256(tensors: Mapping[str, Mapping[str, Any]]) -> str:
    return hashlib.sha256(_listing(tensors, digests=False)).hexdigest()


def describe_path(path: str) -> str:
    return os.path.abspath(path) if os.path.exists(path) else path


def base_identity(
    base: TensorSource | Mapping[str, torch.Tensor], *, path: str | None = None
) -> dict[str, Any]:
    """The identity recorded in an artifact: path, header and content sha256, per-tensor digests.

    Reads every tensor of ``base`` once (in chunks of at most 64 MiB).
    """
    src = open_base(base)
    tensors: dict[str, dict[str, Any]] = {}
    for name in src.keys():  # noqa: SIM118 (a TensorSource, not a dict)
        info = src.info(name)
        digest = tensor_sha256(functools.partial(_read_rows, src, name), info)
        tensors[name] = {"dtype": dtype_name(info.dtype), "shape": list(info.shape), "sha256": digest}
    return {
        "path": describe_path(path if path is not None else src.path),
        "header_sha256": header_sha256(tensors),
        "content_sha256": hashlib.sha256(_listing(tensors, digests=True)).hexdigest(),
        "tensors": tensors,
    }


def check_identity(identity: Mapping[str, Any]) -> None:
    """Validate a base identity dict (from :func:`base_identity`)."""
    for key in ("path", "header_sha256", "content_sha256", "tensors"):
        if key not in identity:
            raise ValueError(
                f"base identity lacks {key!r}; build it with weightmerge.emr.base_identity(base)"
            )
    tensors = identity["tensors"]
    if header_sha256(tensors) != identity["header_sha256"]:
        raise ValueError("base identity: header_sha256 does not match its tensor list")
    if hashlib.sha256(_listing(tensors, digests=True)).hexdigest() != identity["content_sha256"]:
        raise ValueError("base identity: content_sha256 does not match its tensor digests")
