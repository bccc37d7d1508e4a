"""Where candidates are evaluated: in this process, in local worker processes, or on Ray actors.

Every executor evaluates a list of ``(index, point)`` and returns the results in the same order.
The base model and the models (the task vectors' inputs) go to the workers once: local workers get
them in shared memory (``Tensor.share_memory_()``; what crosses the process boundary is a handle),
Ray actors get one object-store reference (``ray.put`` once). Each worker builds its evaluator once.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from weightmerge.search.problem import Inputs, Template, env_threads, merge_candidate

Item = tuple[int, dict[str, Any]]
Done = Callable[[int, dict[str, Any]], None]


def evaluate_point(
    template: Template, inputs: Inputs, evaluator: Any, point: Mapping[str, Any]
) -> dict[str, Any]:
    """Merge one point and score it on validation; the scores and where the time went."""
    t0 = time.perf_counter()
    merged = merge_candidate(template, inputs, point)
    t1 = time.perf_counter()
    scores = evaluator.evaluate(merged, split="validation")
    t2 = time.perf_counter()
    return {
        "scores": scores,
        "merge_seconds": t1 - t0,
        "evaluate_seconds": t2 - t1,
        "worker": f"{os.uname().nodename}:{os.getpid()}",
    }


class SerialExecutor:
    workers = 1

    def __init__(self, template: Template, inputs: Inputs, factory: Any, threads: int) -> None:
        env_threads(threads)
        self._template, self._inputs = template, inputs
        self._evaluator = factory.build()

    def run(self, items: Sequence[Item], done: Done) -> list[dict[str, Any]]:
        out = []
        for index, point in items:
            r = evaluate_point(self._template, self._inputs, self._evaluator, point)
            done(index, r)
            out.append(r)
        return out

    def close(self) -> None:
        pass


_WORKER: dict[str, Any] = {}


def _init_worker(template: Template, inputs: Inputs, factory: Any, threads: int) -> None:
    env_threads(threads)
    _WORKER.update(template=template, inputs=inputs, evaluator=factory.build())


def _ping(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _work(point: dict[str, Any]) -> dict[str, Any]:
    return evaluate_point(_WORKER["template"], _WORKER["inputs"], _WORKER["evaluator"], point)


class LocalPoolExecutor:
    """``workers`` spawned processes; the inputs are moved to shared memory once."""

    def __init__(self, template: Template, inputs: Inputs, factory: Any, threads: int, workers: int) -> None:
        from concurrent.futures import ProcessPoolExecutor

        import torch.multiprocessing as mp

        self.workers = workers
        inputs.share_memory()
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=(template, inputs, factory, threads),
        )
        # start every worker now (imports, evaluator), so the first generation does not pay for it
        for _ in range(20):
            pids = {f.result() for f in [self._pool.submit(_ping, 0.05) for _ in range(workers)]}
            if len(pids) == workers:
                break

    def run(self, items: Sequence[Item], done: Done) -> list[dict[str, Any]]:
        from concurrent.futures import as_completed

        futures = {self._pool.submit(_work, point): (k, index) for k, (index, point) in enumerate(items)}
        out: list[dict[str, Any] | None] = [None] * len(items)
        for fut in as_completed(futures):
            k, index = futures[fut]
            r = fut.result()
            out[k] = r
            done(index, r)
        return [r for r in out if r is not None]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _RayWorker:
    def __init__(self, template: Template, tensors: Any, factory: Any, threads: int) -> None:
        env_threads(threads)
        base, models = tensors
        self._template = template
        self._inputs = Inputs(base=base, models=models)
        self._evaluator = factory.build()

    def evaluate(self, point: dict[str, Any]) -> dict[str, Any]:
        return evaluate_point(self._template, self._inputs, self._evaluator, point)

    def ready(self) -> bool:
        return True


def _ray_init(address: str, workers: int) -> Any:
    """Connect to ``address``; ``local`` starts a private instance on loopback with ``workers`` CPUs."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs the package 'ray': pip install 'weightmerge[ray]'") from None
    if ray.is_initialized():
        return ray
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
    if address == "local":
        ray.init(
            num_cpus=workers,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=env,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
        )
    else:
        ray.init(address=address, log_to_driver=False, runtime_env=env, configure_logging=False)
    return ray


class RayExecutor:
    """``workers`` Ray actors (1 CPU each) sharing one object-store copy of the inputs."""

    def __init__(
        self, template: Template, inputs: Inputs, factory: Any, threads: int, workers: int, address: str
    ) -> None:
        ray = _ray_init(address, workers)
        self._ray = ray
        self._owns = address == "local"
        self.workers = workers
        ref = ray.put((inputs.base, inputs.models))  # once; each actor reads it once
        actor = ray.remote(num_cpus=1)(_RayWorker)
        self._actors = [actor.remote(template, ref, factory, threads) for _ in range(workers)]
        ray.get([a.ready.remote() for a in self._actors])  # started (inputs read, evaluator built)

    def run(self, items: Sequence[Item], done: Done) -> list[dict[str, Any]]:
        ray = self._ray
        out: list[dict[str, Any] | None] = [None] * len(items)
        pending: dict[Any, tuple[int, int]] = {}
        queue = list(enumerate(items))
        free = list(self._actors)
        while queue or pending:
            while queue and free:
                k, (index, point) = queue.pop(0)
                a = free.pop(0)
                pending[a.evaluate.remote(point)] = (k, index, a)  # type: ignore[assignment]
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                k, index, a = pending.pop(ref)  # type: ignore[misc]
                r = ray.get(ref)
                out[k] = r
                done(index, r)
                free.append(a)
        return [r for r in out if r is not None]

    def close(self) -> None:
        for a in self._actors:
            self._ray.kill(a)
        if self._owns:
            self._ray.shutdown()


def make_executor(
    template: Template, inputs: Inputs, factory: Any, *, threads: int, workers: int, ray_address: str | None
) -> Any:
    if ray_address:
        return RayExecutor(template, inputs, factory, threads, workers, ray_address)
    if workers > 1:
        return LocalPoolExecutor(template, inputs, factory, threads, workers)
    return SerialExecutor(template, inputs, factory, threads)
