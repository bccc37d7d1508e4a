"""Reading EMR artifacts: per-task state dicts (lazy), in-place task switching of a loaded model,
streamed materialization of one task as a normal HF checkpoint, and ``info``.

Task ``t`` of a merged tensor is ``weightmerge.emr.result.emr_reconstruct(base, unified, mask_t,
rescaler_t)`` with the unified vector in the recorded compute dtype; the other tensors are the
base's, and the task's own tensors (heads, excluded or shape-mismatched tensors) replace or add to
them. Every operation checks, before it writes anything: the task name, the base (header and
per-tensor sha256 against the recorded identity) and the artifact's files (sizes and headers when
loading, sha256 once per file before its first use).
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import re
import shutil
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightmerge.emr import bits
from weightmerge.emr.files import Entry, dtype_name, parse_dtype
from weightmerge.emr.result import emr_reconstruct
from weightmerge.emr.sources import (
    HASH_CHUNK_BYTES,
    _read_rows,
    header_sha256,
    open_base,
    row_chunks,
    tensor_sha256,
)
from weightmerge.emr.writer import (
    DEFAULT_SHARD_BYTES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    RESCALES,
    file_sha256,
)
from weightmerge.io._common import inside_model
from weightmerge.io.atomic import atomic_output_dir, check_output_clear, copy_tokenizer_files
from weightmerge.io.base import TensorInfo, TensorSource
from weightmerge.io.safetensors_format import dtype_code, numel, read_header
from weightmerge.io.writer import ShardedSafetensorsWriter

BaseLike = TensorSource | Mapping[str, torch.Tensor] | str | os.PathLike[str]
Rows = tuple[int, int] | None
DEFAULT_CHUNK_BYTES = 256 * 2**20
# Copied from the base checkpoint's directory next to a materialized task, with the tokenizer files.
SIDE_FILES = ("generation_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class MergedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # output (materialized) dtype
    unified_dtype: torch.dtype
    file: str

    @property
    def numel(self) -> int:
        return numel(self.shape)


class ArtifactError(ValueError):
    """The artifact directory is incomplete, corrupted or of an unknown format."""


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def load_emr(path: str | os.PathLike[str]) -> EMRArtifact:
    """Open an EMR artifact directory (checks the manifest, file sizes and headers; reads no data)."""
    return EMRArtifact(path)


class EMRArtifact:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(f"{self.path} is not an EMR artifact (no {MANIFEST})")
        try:
            m = json.loads(mpath.read_text())
        except RecursionError:
            raise ArtifactError(f"{mpath}: JSON nested too deeply") from None
        except ValueError as err:
            raise ArtifactError(f"{mpath}: not valid JSON ({err})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise ArtifactError(f"{mpath}: not a {FORMAT} manifest")
        if m.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{mpath}: format version {m.get('format_version')!r}; this weightmerge reads version "
                f"{FORMAT_VERSION} (upgrade weightmerge for newer artifacts)"
            )
        self.manifest = m
        try:
            self.tasks: list[str] = list(m["tasks"])
            self.rescalers: list[float] = [float(r) for r in m["rescalers"]]
            self.rescale: str = m["rescale"]
            self.compute_dtype = parse_dtype(m["compute_dtype"])
            self.base: dict[str, Any] = m["base"]
            self.tensors = {
                k: MergedTensor(
                    k, tuple(v["shape"]), parse_dtype(v["dtype"]), parse_dtype(v["unified_dtype"]), v["file"]
                )
                for k, v in m["tensors"].items()
            }
            self.per_task: list[dict[str, Any]] = m["per_task"]
            self.mask_files: list[str] = m["mask_files"]
            self.files: dict[str, dict[str, Any]] = m["files"]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ArtifactError(f"{mpath}: malformed manifest ({_excerpt(err)})") from None
        try:
            self._validate(mpath)
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise ArtifactError(f"{mpath}: malformed manifest ({_excerpt(err)})") from None
        self._handles: dict[str, Any] = {}
        self._verified: set[str] = set()
        self._switch: weakref.WeakKeyDictionary[Any, _SwitchState] = weakref.WeakKeyDictionary()

    def _validate(self, mpath: Path) -> None:
        n = len(self.tasks)
        if not (len(self.rescalers) == len(self.mask_files) == len(self.per_task) == n) or n == 0:
            raise ArtifactError(
                f"{mpath}: {n} tasks but {len(self.rescalers)} rescalers, "
                f"{len(self.mask_files)} mask files, {len(self.per_task)} per-task entries"
            )
        if self.rescale not in RESCALES:
            raise ArtifactError(f"{mpath}: unknown rescale mode {_excerpt(self.rescale)}")
        bad = [r for r in self.rescalers if not (math.isfinite(r) and r >= 0.0)]
        if bad:
            raise ArtifactError(f"{mpath}: rescaler {bad[0]!r} is not a finite non-negative number")
        if not self.compute_dtype.is_floating_point:
            raise ArtifactError(
                f"{mpath}: compute_dtype {self.manifest['compute_dtype']!r} is not a floating dtype"
            )
        self._check_names(mpath)
        self._check_files()

    # -- validation --------------------------------------------------------------------------

    def _check_names(self, mpath: Path) -> None:
        """Every file name in the manifest is hostile until shown otherwise: it must be a plain
        relative name that resolves (symlinks followed) inside the artifact directory, and every
        file the artifact uses must be listed in ``files`` with a byte count and a sha256."""
        root = self.path.resolve()
        if not isinstance(self.files, dict):
            raise ArtifactError(f"{mpath}: 'files' is not a mapping")
        for f, meta in self.files.items():
            _check_inside(root, f, mpath)
            if (
                not isinstance(meta, dict)
                or not isinstance(meta.get("sha256"), str)
                or not _SHA256.fullmatch(meta["sha256"])
                or not isinstance(meta.get("bytes"), int)
                or isinstance(meta.get("bytes"), bool)
            ):
                raise ArtifactError(f"{mpath}: file {_excerpt(f)} has no valid bytes/sha256 record")
        used: list[Any] = [t.file for t in self.tensors.values()] + list(self.mask_files)
        for pt in self.per_task:
            if not isinstance(pt, dict) or not isinstance(pt.get("tensors"), dict):
                raise ArtifactError(f"{mpath}: malformed per-task entry {_excerpt(pt)}")
            used += [pt.get(k) for k in ("file", "config") if pt.get(k) is not None]
        used += list(self.manifest.get("unified_files") or [])
        for f in used:
            _check_inside(root, f, mpath)
            if f not in self.files:
                raise ArtifactError(
                    f"{mpath}: file {_excerpt(f)} is used but not listed with a sha256 in 'files'"
                )

    def _check_files(self) -> None:
        for f, meta in self.files.items():
            p = self.path / f
            if not p.is_file():
                raise ArtifactError(f"artifact {self.path}: file {f} is missing")
            size = p.stat().st_size
            if size != meta["bytes"]:
                raise ArtifactError(
                    f"artifact {self.path}: {f} has {size} bytes, the manifest records {meta['bytes']} "
                    "(corrupted?)"
                )
        expect: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        for t in self.tensors.values():
            expect.setdefault(t.file, {})[t.name] = (dtype_code(t.unified_dtype), t.shape)
        for f in self.mask_files:
            expect[f] = {t.name: ("U8", (bits.packed_size(t.numel),)) for t in self.tensors.values()}
        for pt in self.per_task:
            if pt["file"] is not None:
                expect[pt["file"]] = {
                    k: (dtype_code(parse_dtype(v["dtype"])), tuple(v["shape"]))
                    for k, v in pt["tensors"].items()
                }
        for f, tensors in expect.items():
            if f not in self.files:
                raise ArtifactError(f"artifact {self.path}: {f} is not in the manifest's file list")
            try:
                header, _ = read_header(self.path / f)
            except ValueError as err:
                raise ArtifactError(f"artifact {self.path}: {err}") from None
            for name, (code, shape) in tensors.items():
                st = header.get(name)
                if st is None or st.dtype_code != code or st.shape != shape:
                    got = "missing" if st is None else f"{st.dtype_code}{list(st.shape)}"
                    raise ArtifactError(
                        f"artifact {self.path}: {f}: tensor {name!r} is {got}, expected {code}{list(shape)} "
                        "(corrupted?)"
                    )
            extra = sorted(set(header) - set(tensors))
            if extra:
                raise ArtifactError(f"artifact {self.path}: {f} holds unexpected tensor {extra[0]!r}")

    def verify_files(self, files: Sequence[str]) -> None:
        """Check the sha256 of ``files`` against the manifest (once per file per artifact object)."""
        for f in files:
            if f in self._verified:
                continue
            digest = file_sha256(self.path / f)
            if digest != self.files[f]["sha256"]:
                raise ArtifactError(
                    f"artifact {self.path}: {f} is corrupted (sha256 {digest[:12]}..., the manifest records "
                    f"{self.files[f]['sha256'][:12]}...)"
                )
            self._verified.add(f)

    def verify(self) -> None:
        """Check every file of the artifact (sizes, headers, sha256)."""
        self._check_files()
        self.verify_files(sorted(self.files))

    def task_files(self, i: int) -> list[str]:
        files = [*sorted({t.file for t in self.tensors.values()}), self.mask_files[i]]
        return files + [self.per_task[i][k] for k in ("file", "config") if self.per_task[i].get(k)]

    def task_index(self, task: str | int) -> int:
        if isinstance(task, int) and not isinstance(task, bool):
            if not 0 <= task < len(self.tasks):
                raise IndexError(f"task index {task} out of range for {len(self.tasks)} tasks")
            return task
        if task not in self.tasks:
            raise ValueError(
                f"no task {task!r} in {self.path}{_did_you_mean(str(task), self.tasks)} "
                f"(tasks: {', '.join(self.tasks)})"
            )
        return self.tasks.index(task)

    def check_base(self, src: TensorSource, names: Sequence[str] | None = None) -> None:
        """Refuse a base whose tensor names, dtypes or shapes differ from the recorded identity
        (all tensors, or only ``names``). Reads headers only."""
        rec = self.base["tensors"]
        label = f"base {src.path!r} does not match the artifact's base {self.base['path']!r}"
        keys = set(src.keys())
        if names is None:
            listing = {}
            for k in keys:
                info = src.info(k)
                listing[k] = {"dtype": dtype_name(info.dtype), "shape": list(info.shape)}
            if header_sha256(listing) == self.base["header_sha256"]:
                return
            names = sorted(set(rec) | keys)
        for k in names:
            if k not in rec:
                raise ValueError(f"{label}: it has tensor {k!r}, the recorded base has not")
            if k not in keys:
                raise ValueError(f"{label}: it lacks tensor {k!r}")
            info = src.info(k)
            got = (dtype_name(info.dtype), list(info.shape))
            want = (rec[k]["dtype"], list(rec[k]["shape"]))
            if got != want:
                raise ValueError(f"{label}: tensor {k!r} is {got[0]}{got[1]}, recorded {want[0]}{want[1]}")
        if names is None:
            raise ValueError(f"{label}: header sha256 differs")

    def check_base_content(self, src: TensorSource, names: Sequence[str]) -> None:
        """Refuse a base whose tensors ``names`` differ from the recorded sha256 (reads them)."""
        for k in names:
            digest = tensor_sha256(functools.partial(_read_rows, src, k), src.info(k))
            self._check_digest(k, digest, f"base {src.path!r}")

    def check_base_tensor(self, name: str, t: torch.Tensor, what: str = "the base") -> None:
        """Refuse an in-memory base tensor whose sha256 differs from the recorded one."""
        info = TensorInfo(name, tuple(t.shape), t.dtype, what)
        digest = tensor_sha256(lambda rows: t if rows is None else t[rows[0] : rows[1]], info)
        self._check_digest(name, digest, what)

    def _check_digest(self, name: str, digest: str, what: str) -> None:
        want = self.base["tensors"][name]["sha256"]
        if digest != want:
            raise ValueError(
                f"{what} is not the artifact's base {self.base['path']!r}: tensor {name!r} has sha256 "
                f"{digest[:12]}..., recorded {want[:12]}... (content sha256 of the right base: "
                f"{self.base['content_sha256'][:16]}...)"
            )

    # -- reading -----------------------------------------------------------------------------

    def _handle(self, f: str) -> Any:
        h = self._handles.get(f)
        if h is None:
            from safetensors import safe_open

            h = self._handles[f] = safe_open(str(self.path / f), framework="pt")
        return h

    def unified(self, name: str, rows: Rows = None) -> torch.Tensor:
        """The unified task vector of ``name`` (or a row range), in the compute dtype."""
        t = self.tensors[name]
        h = self._handle(t.file)
        u = h.get_tensor(name) if rows is None or not t.shape else h.get_slice(name)[rows[0] : rows[1]]
        return u.to(self.compute_dtype)

    def mask(self, task: str | int, name: str, rows: Rows = None) -> torch.Tensor:
        """Task ``task``'s bool mask of ``name`` (or a row range), shaped like the tensor (chunk)."""
        i = self.task_index(task)
        t = self.tensors[name]
        row_numel = math.prod(t.shape[1:]) if t.shape else 1
        r0, r1 = (0, t.shape[0] if t.shape else 1) if rows is None else rows
        start, stop = r0 * row_numel, r1 * row_numel
        shape = t.shape if rows is None else (r1 - r0, *t.shape[1:])
        if stop <= start:
            return torch.zeros(shape, dtype=torch.bool)
        b0, b1 = start // 8, (stop + 7) // 8
        data = self._handle(self.mask_files[i]).get_slice(name)[b0:b1]
        if stop == t.numel and not bits.padding_ok(int(data[-1]), t.numel):
            raise ArtifactError(
                f"artifact {self.path}: {self.mask_files[i]}: tensor {name!r} has non-zero "
                "padding bits in its last byte (corrupted?)"
            )
        return bits.unpack(data, numel=t.numel, first_byte=b0, start=start, stop=stop).reshape(shape)

    def task_tensor(self, task: str | int, name: str) -> torch.Tensor:
        """One of the task's own (not merged) tensors."""
        i = self.task_index(task)
        pt = self.per_task[i]
        if name not in pt["tensors"]:
            raise KeyError(f"task {self.tasks[i]!r} has no own tensor {name!r}")
        return self._handle(pt["file"]).get_tensor(name)

    def reconstruct(self, task: str | int, name: str, base: torch.Tensor, rows: Rows = None) -> torch.Tensor:
        """Task ``task``'s value of merged tensor ``name`` (or a row range) from the base values."""
        i = self.task_index(task)
        t = self.tensors[name]
        r = torch.tensor(self.rescalers[i], dtype=self.compute_dtype)
        out = emr_reconstruct(base, self.unified(name, rows), self.mask(i, name, rows), r)
        return out.to(t.dtype)

    def own_names(self, task: str | int) -> list[str]:
        return sorted(self.per_task[self.task_index(task)]["tensors"])

    def output_names(self, task: str | int) -> list[str]:
        return sorted(set(self.base["tensors"]) | set(self.own_names(task)))

    # -- products ----------------------------------------------------------------------------

    def task_state_dict(self, task: str | int, base: BaseLike) -> TaskStateDict:
        """A lazy mapping name -> tensor of task ``task`` (each tensor built when read; the base
        tensor's sha256 is checked on each read)."""
        i = self.task_index(task)
        src = open_base(base)
        self.check_base(src)
        self.verify_files(self.task_files(i))
        return TaskStateDict(self, i, src)

    def materialize(
        self,
        task: str | int,
        base: BaseLike,
        out: str | os.PathLike[str],
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        verify_base: bool = True,
    ) -> Path:
        return materialize(
            self,
            task,
            base,
            out,
            max_shard_bytes=max_shard_bytes,
            chunk_bytes=chunk_bytes,
            verify_base=verify_base,
        )

    def apply(self, model: Any, task: str | int, *, base: BaseLike | None = None) -> None:
        """Switch ``model`` (a loaded torch model) to task ``task`` in place.

        First call on a model: with ``base`` (a source, dict or path) the base values are read from
        it each switch; without it the model must hold the base weights now (checked by sha256)
        and a copy of its merged tensors is kept on the side (memory: the merged tensors once,
        in the base dtype). Every switch recomputes the merged tensors from the base values, so
        any sequence of switches ending on task A leaves exactly a fresh materialization of A.
        Time: proportional to the merged + per-task tensors; other tensors are not touched.
        """
        i = self.task_index(task)
        targets = _model_tensors(model)
        own = self.per_task[i]["tensors"]
        state = self._switch.get(model)
        restore = [k for k in self._partial_own() if k not in own]
        self._check_model(targets, own, restore, state)
        self.verify_files(self.task_files(i))
        if state is None:
            state = self._first_state(targets, base)
        with torch.no_grad():
            for name in self.tensors:
                _assign(targets[name], self.reconstruct(i, name, state.base(name)))
            for name in own:
                _assign(targets[name], self.task_tensor(i, name))
            for name in restore:
                if name in targets:
                    _assign(targets[name], state.base(name))
        state.current = self.tasks[i]
        self._switch[model] = state

    def current_task(self, model: Any) -> str | None:
        """The task ``apply`` last switched ``model`` to (None: never switched by this artifact)."""
        state = self._switch.get(model)
        return state.current if state is not None else None

    def _check_model(
        self,
        targets: Mapping[str, torch.Tensor],
        own: Mapping[str, Any],
        restore: Sequence[str],
        state: _SwitchState | None,
    ) -> None:
        missing = [k for k in self.tensors if k not in targets]
        if missing:
            raise ValueError(
                f"the model has no tensor {missing[0]!r} ({len(missing)} merged tensors missing; "
                f"model tensors look like {sorted(targets)[:3]}): is it the artifact's architecture?"
            )
        for k, t in self.tensors.items():
            if tuple(targets[k].shape) != t.shape:
                raise ValueError(
                    f"model tensor {k!r} has shape {list(targets[k].shape)}, the artifact {list(t.shape)}"
                )
        lacking = [k for k in own if k not in targets]
        if lacking:
            raise ValueError(f"the model has no tensor {lacking[0]!r}, which this task provides")
        if state is None:
            no_base = [k for k in self._partial_own() if k in targets and k not in self.base["tensors"]]
            if no_base:
                raise ValueError(
                    f"tensor {no_base[0]!r} belongs to some tasks only and is not in the base: "
                    "cannot switch to a task without it"
                )

    def _partial_own(self) -> list[str]:
        """Own tensors that some tasks have and others lack (switching away restores the base)."""
        sets = [set(pt["tensors"]) for pt in self.per_task]
        return sorted(set().union(*sets) - set.intersection(*sets))

    def _first_state(self, targets: Mapping[str, torch.Tensor], base: BaseLike | None) -> _SwitchState:
        names = list(self.tensors) + [k for k in self._partial_own() if k in targets]
        if base is not None:
            src = open_base(base)
            self.check_base(src, names)
            self.check_base_content(src, names)
            return _SwitchState(source=src)
        values: dict[str, torch.Tensor] = {}
        for k in names:
            t = targets[k].detach()
            if dtype_name(t.dtype) != self.base["tensors"][k]["dtype"]:
                raise ValueError(
                    f"model tensor {k!r} is {t.dtype}, the artifact's base stores "
                    f"{self.base['tensors'][k]['dtype']}: load the model in the base dtype"
                )
            cpu = t.to("cpu", copy=True)
            self.check_base_tensor(k, cpu, "the model")
            values[k] = cpu
        return _SwitchState(base_values=values)

    def info(self, *, per_tensor: bool = False) -> dict[str, Any]:
        """Sizes on disk, bits per parameter, mask densities (fractions of ones)."""
        merged_params = sum(t.numel for t in self.tensors.values())
        ones = [self._mask_ones(f) for f in self.mask_files]
        size = {f: meta["bytes"] for f, meta in self.files.items()}
        manifest_bytes = (self.path / MANIFEST).stat().st_size
        unified_files = sorted({t.file for t in self.tensors.values()})
        unified_bytes = sum(size[f] for f in unified_files)
        base_bytes = sum(
            math.prod(v["shape"]) * torch.empty((), dtype=parse_dtype(v["dtype"])).element_size()
            for v in self.base["tensors"].values()
        )
        tasks = []
        for i, task in enumerate(self.tasks):
            own_bytes = sum(size[f] for f in (self.per_task[i]["file"], self.per_task[i]["config"]) if f)
            mb = size[self.mask_files[i]]
            total_ones = sum(ones[i].values())
            tasks.append(
                {
                    "name": task,
                    "rescaler": self.rescalers[i],
                    "mask_bytes": mb,
                    "mask_bits_per_param": 8 * mb / merged_params if merged_params else 0.0,
                    "mask_ones_fraction": total_ones / merged_params if merged_params else 0.0,
                    "own_tensors": len(self.per_task[i]["tensors"]),
                    "own_bytes": own_bytes,
                    "task_bits_per_param": 8 * (mb + own_bytes) / merged_params if merged_params else 0.0,
                }
            )
        total = sum(size.values()) + manifest_bytes
        full = len(self.tasks) * base_bytes
        out: dict[str, Any] = {
            "path": str(self.path),
            "format_version": self.manifest["format_version"],
            "weightmerge_version": self.manifest.get("weightmerge_version"),
            "rescale": self.rescale,
            "compute_dtype": dtype_name(self.compute_dtype),
            "merged_tensors": len(self.tensors),
            "merged_params": merged_params,
            "unified_bytes": unified_bytes,
            "unified_bits_per_param": 8 * unified_bytes / merged_params if merged_params else 0.0,
            "manifest_bytes": manifest_bytes,
            "total_bytes": total,
            "base": {
                "path": self.base["path"],
                "content_sha256": self.base["content_sha256"],
                "bytes": base_bytes,
            },
            "full_checkpoints_bytes": full,
            "size_ratio": total / full if full else 0.0,
            "tasks": tasks,
        }
        if per_tensor:
            out["tensors"] = [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "dtype": dtype_name(t.dtype),
                    "mask_ones_fraction": [
                        ones[i][t.name] / t.numel if t.numel else 0.0 for i in range(len(ones))
                    ],
                }
                for t in self.tensors.values()
            ]
        return out

    def _mask_ones(self, f: str) -> dict[str, int]:
        header, _ = read_header(self.path / f)
        data = np.memmap(self.path / f, dtype=np.uint8, mode="r")
        out = {}
        for name, st in header.items():
            step = HASH_CHUNK_BYTES
            out[name] = sum(
                int(np.bitwise_count(data[p : min(p + step, st.end)]).sum())
                for p in range(st.begin, st.end, step)
            )
        del data
        return out

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> EMRArtifact:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EMRArtifact({str(self.path)!r}, tasks={self.tasks})"


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _excerpt(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (manifests are untrusted: never echo them whole)."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} characters)"


def _check_inside(root: Path, name: object, mpath: Path) -> None:
    """Refuse a manifest file name that is not a plain relative path resolving inside ``root``."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ArtifactError(f"{mpath}: file name {_excerpt(name)} is not a non-empty string")
    pure = Path(name)
    if pure.is_absolute() or ".." in pure.parts or name.startswith("~"):
        raise ArtifactError(f"{mpath}: file name {_excerpt(name)} points outside the artifact directory")
    if not (root / name).resolve().is_relative_to(root):
        raise ArtifactError(
            f"{mpath}: file {_excerpt(name)} is a link that leads outside the artifact directory"
        )


@dataclass
class _SwitchState:
    base_values: dict[str, torch.Tensor] | None = None
    source: TensorSource | None = None
    current: str | None = None

    def base(self, name: str) -> torch.Tensor:
        if self.source is not None:
            return self.source.read(name)
        assert self.base_values is not None
        return self.base_values[name]


def _model_tensors(model: Any) -> dict[str, torch.Tensor]:
    sd = getattr(model, "state_dict", None)
    if sd is None:
        raise TypeError(f"model must be a torch module (has state_dict), got {type(model).__name__}")
    return dict(sd(keep_vars=True))


def _assign(target: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(target.shape) == tuple(value.shape):
        target.copy_(value)
    else:  # a per-task head of another size: swap the storage (module attributes are not updated)
        target.data = value.to(device=target.device, dtype=target.dtype)


class TaskStateDict(Mapping[str, torch.Tensor]):
    """A task's full state dict, each tensor reconstructed when accessed."""

    def __init__(self, artifact: EMRArtifact, task: int, source: TensorSource) -> None:
        self.artifact, self.task, self.source = artifact, task, source
        self._names = artifact.output_names(task)
        self._own = set(artifact.own_names(task))

    def __getitem__(self, name: str) -> torch.Tensor:
        a = self.artifact
        if name in self._own:
            return a.task_tensor(self.task, name)
        if name not in a.base["tensors"]:
            raise KeyError(name)
        b = self.source.read(name)
        a.check_base_tensor(name, b, f"base {self.source.path!r}")
        return a.reconstruct(self.task, name, b) if name in a.tensors else b.clone()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _base_dir(src: TensorSource) -> Path | None:
    p = Path(str(src.path))
    if p.is_dir():
        return p
    return p.parent if p.is_file() else None


def materialize(
    artifact: EMRArtifact | str | os.PathLike[str],
    task: str | int,
    base: BaseLike,
    out: str | os.PathLike[str],
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    verify_base: bool = True,
) -> Path:
    """Write task ``task`` as a normal HF checkpoint at ``out`` (safetensors, sharded over
    ``max_shard_bytes`` with an index; config.json: the task's own if recorded, else the base's;
    tokenizer/generation files copied from the base directory).

    Memory: row chunks of at most ``chunk_bytes`` of output (a few such buffers live at once).
    Checks (before anything is created): task name, base header, base content (sha256 of every
    tensor, one extra read of the base; ``verify_base=False`` skips the content check), the
    artifact files this task uses. Written with ``weightmerge.io``'s sharded writer into an atomic
    output directory (renamed into place at the end).
    """
    a = artifact if isinstance(artifact, EMRArtifact) else load_emr(artifact)
    i = a.task_index(task)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another output")
    check_output_clear(out, [a.path, *([base] if isinstance(base, (str, os.PathLike)) else [])])
    src = open_base(base)
    a.check_base(src)
    a.verify_files(a.task_files(i))
    if verify_base:
        a.check_base_content(src, sorted(a.base["tensors"]))
    own = a.per_task[i]["tensors"]
    entries = []
    for name in a.output_names(i):
        if name in own:
            entries.append(Entry(name, tuple(own[name]["shape"]), parse_dtype(own[name]["dtype"])))
        elif name in a.tensors:
            entries.append(Entry(name, a.tensors[name].shape, a.tensors[name].dtype))
        else:
            info = src.info(name)
            entries.append(Entry(name, tuple(info.shape), info.dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(out, force=False) as tmp:
        layout = [(e.name, e.shape, e.dtype) for e in entries]
        with ShardedSafetensorsWriter(tmp, layout, shard_size=max_shard_bytes) as writer:
            for e in entries:
                _write_output_tensor(a, i, src, writer, e, chunk_bytes)
        _copy_side_files(a, i, src, tmp)
    return out


def _write_output_tensor(
    a: EMRArtifact, i: int, src: TensorSource, writer: ShardedSafetensorsWriter, e: Entry, chunk_bytes: int
) -> None:
    if e.name in a.per_task[i]["tensors"]:
        writer.write(e.name, a.task_tensor(i, e.name))
        return
    row_numel = math.prod(e.shape[1:]) if e.shape else 1
    for rows in row_chunks(e.shape, row_numel * e.itemsize, chunk_bytes):
        b = src.read(e.name, rows)
        writer.write(e.name, a.reconstruct(i, e.name, b, rows) if e.name in a.tensors else b, rows)


def _copy_side_files(a: EMRArtifact, i: int, src: TensorSource, out: Path) -> None:
    base_dir = _base_dir(src)
    cfg = a.per_task[i]["config"]
    if cfg:  # a name checked inside the artifact and its sha256 verified (task_files) before use
        a.verify_files([cfg])
        shutil.copyfile(a.path / cfg, out / "config.json")
    elif (
        base_dir is not None
        and (base_dir / "config.json").is_file()
        and inside_model(base_dir / "config.json", base_dir)
    ):
        shutil.copyfile(base_dir / "config.json", out / "config.json")
    elif src.config is not None:
        (out / "config.json").write_text(json.dumps(src.config, indent=2) + "\n")
    if base_dir is not None:
        for f in SIDE_FILES:
            if (base_dir / f).is_file() and inside_model(base_dir / f, base_dir):
                shutil.copyfile(base_dir / f, out / f)
        copy_tokenizer_files(base_dir, out)


__all__ = ["ArtifactError", "EMRArtifact", "TaskStateDict", "load_emr", "materialize"]
