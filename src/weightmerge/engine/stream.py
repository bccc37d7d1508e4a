"""Execution of a planned merge, in memory or streamed: readers over the plan's sources, the shared
driver, each merged tensor (or row chunk) handed to the method's output writer
(``weightmerge.io.output``), with a progress bar."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from weightmerge.engine.driver import MergeInputs, MergeOutcome, Rows, run_merge, sweeps_of
from weightmerge.engine.plan import MergePlan
from weightmerge.io.base import TensorSource
from weightmerge.io.output import OutputWriter
from weightmerge.methods.aux import gather_aux


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-on-access mapping over a TensorSource (for per-tensor statistics such as Fisher).

    The last tensor read is kept, so the row chunks of one tensor read its statistics once.
    (Statistics are read whole: a row-chunked merge holds one full statistics tensor per model.)
    """

    def __init__(self, src: TensorSource) -> None:
        self.src = src
        self._keys = set(src.keys())
        self._last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        if self._last is None or self._last[0] != key:
            self._last = (key, self.src.read(key))
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)


class _Progress:
    def __init__(self, total_bytes: int, quiet: bool) -> None:
        self.bar: Any = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                dynamic_ncols=True,
                desc="merge",
            )

    def phase(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description(name)

    def add(self, nbytes: int, tensor: str) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(tensor[-40:], refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _reader(src: TensorSource, alias: Mapping[str, str]) -> Callable[[str, Rows], torch.Tensor]:
    def read(name: str, rows: Rows) -> torch.Tensor:
        return src.read(alias.get(name, name), rows)

    return read


def stream_merge(
    plan: MergePlan,
    base: TensorSource | None,
    models: Sequence[TensorSource],
    *,
    writer: OutputWriter,
    seed: int = 0,
    quiet: bool = False,
    prefetch: bool = True,
    device: torch.device | None = None,
    allow_nonfinite: bool = False,
    skip_apply: frozenset[str] = frozenset(),
) -> tuple[MergeOutcome, dict[str, float]]:
    """Run ``plan``: the statistics passes, then the apply pass into ``writer.write`` (each merged
    tensor or row chunk, in the compute dtype, on ``device``, default the CPU). Copied tensors are
    the writer's business. Returns the driver outcome and timings; ``writer.finish`` is the
    caller's (with ``outcome.extras``).
    """
    method = plan.method
    model_params = plan.model_params
    ref = base if base is not None else models[0]
    merged = plan.merged
    chunk = {t.name: t.chunk_rows for t in merged}
    shapes = {t.name: t.shape for t in merged}
    sizes = {
        t.name: t.numel * len(models) * torch.empty((), dtype=ref.info(t.name).dtype).element_size()
        for t in merged
    }
    sweeps = 0
    for requests in method.passes(model_params):
        sweeps += sweeps_of(requests)
    progress = _Progress(sum(sizes.values()) * (sweeps + 1), quiet)
    timings: dict[str, float] = {}

    aux_maps: dict[str, list[Mapping[str, torch.Tensor]]] = {}
    for key in method.aux_inputs:
        value = model_params.get(key)
        if value is not None:
            aux_maps[key] = [LazyTensors(v) if isinstance(v, TensorSource) else v for v in value]
    aux_params = {**model_params, **aux_maps}

    def aux(name: str, rows: Rows) -> Mapping[str, torch.Tensor]:
        return gather_aux(method, aux_params, name, rows, shapes[name], plan.compute_dtype)

    last: dict[str, str] = {"phase": ""}

    def on_progress(phase: str, name: str) -> None:
        if phase != last["phase"]:
            progress.phase(phase)
            last["phase"] = phase
        rows = chunk.get(name)
        share = sizes[name] if rows is None else sizes[name] * min(rows, shapes[name][0]) // shapes[name][0]
        progress.add(share, name)

    params = plan.tensor_params
    inp = MergeInputs(
        names=[t.name for t in merged],
        shapes=shapes,
        base=_reader(base, {}) if base is not None else None,
        models=[_reader(m, plan.aliases[i] if plan.aliases else {}) for i, m in enumerate(models)],
        params_for=lambda name: params[name],
        model_params=model_params,
        seed=seed,
        compute_dtype=plan.compute_dtype,
        chunk_rows=lambda name: chunk.get(name),
        aux=aux if method.aux_inputs else (lambda _n, _r: {}),
        progress=on_progress,
        prefetch=prefetch,
        device=device if device is not None else torch.device("cpu"),
        labels=[f"model {i} ({m.path})" for i, m in enumerate(models)],
        allow_nonfinite=allow_nonfinite,
        skip_apply=skip_apply,
    )
    t1 = time.perf_counter()
    try:
        outcome = run_merge(inp, method, writer.write)
    finally:
        progress.close()
    timings["merge_s"] = time.perf_counter() - t1
    return outcome, timings
