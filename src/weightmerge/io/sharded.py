"""A TensorSource over a sharded checkpoint: an index JSON (``weight_map``: tensor -> shard file)
and one source per shard. Consistency between the index and the shard headers is checked when the
source is opened, each problem reported with the file and tensor it concerns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from weightmerge.io._common import load_json
from weightmerge.io.base import TensorInfo, TensorSource

ShardOpener = Callable[[str], TensorSource]


def read_index(index_path: str) -> dict[str, str]:
    """The ``weight_map`` of an index JSON, checked: tensor name -> shard file name (relative)."""
    index = load_json(index_path, what="index")
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise ValueError(f"index {index_path} has no 'weight_map' object (tensor name -> shard file)")
    for name, file in wmap.items():
        if not isinstance(file, str) or not file:
            raise ValueError(f"index {index_path}: tensor {name!r} maps to {file!r}, not a file name")
        if os.path.isabs(file) or ".." in file.replace("\\", "/").split("/"):
            raise ValueError(
                f"index {index_path}: tensor {name!r} names shard {file!r} outside the directory"
            )
    return {str(k): v for k, v in wmap.items()}


class ShardedSource:
    """Tensors spread over shard files named by an index JSON."""

    def __init__(self, index_path: str, *, open_shard: ShardOpener, config: dict[str, Any] | None) -> None:
        self.path = index_path
        self.config = config
        wmap = read_index(index_path)
        directory = os.path.dirname(os.path.abspath(index_path))
        self._shards: dict[str, TensorSource] = {}
        try:
            for file in sorted(set(wmap.values())):
                shard_path = os.path.join(directory, file)
                if not os.path.isfile(shard_path):
                    example = next(n for n, f in wmap.items() if f == file)
                    raise FileNotFoundError(
                        f"index {index_path} names shard {file!r} (e.g. for tensor {example!r}), "
                        f"but {shard_path} does not exist"
                    )
                self._shards[file] = open_shard(shard_path)
            self._where = self._check(index_path, wmap)
        except BaseException:
            self.close()
            raise

    def _check(self, index_path: str, wmap: dict[str, str]) -> dict[str, TensorSource]:
        seen: dict[str, str] = {}
        for file, shard in self._shards.items():
            for name in shard.keys():  # noqa: SIM118  (a TensorSource is not iterable)
                if name in seen:
                    raise ValueError(
                        f"tensor {name!r} is stored twice: in shard {seen[name]!r} and in {file!r}"
                    )
                seen[name] = file
                if name not in wmap:
                    raise ValueError(f"tensor {name!r} in shard {file!r} is not listed in index {index_path}")
        for name, file in wmap.items():
            if seen.get(name) != file:
                where = f" (it is in {seen[name]!r})" if name in seen else ""
                raise ValueError(
                    f"index {index_path} lists tensor {name!r} in shard {file!r}, "
                    f"but that shard lacks it{where}"
                )
        return {name: self._shards[file] for name, file in wmap.items()}

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def _shard(self, name: str) -> TensorSource:
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.path}") from None

    def info(self, name: str) -> TensorInfo:
        return self._shard(name).info(name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self._shard(name).read(name, rows)

    @property
    def files(self) -> list[str]:
        return sorted(self._shards)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
