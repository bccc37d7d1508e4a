"""Element-wise implementation choices measured in isolation, each first checked for equal results:

* EMR's elected sign as arithmetic on a bool (``methods/emr.py: elect``) against ``torch.where``
  with scalar operands;
* EMR's |M_t * unified| as a product (``methods/emr.py: _den_partials``) against ``torch.where``;
* AdamW with ``fused=True`` (``eval/train.py``) against the default per-parameter loop.

    .venv/bin/python benchmarks/bench_micro.py [--numel 4000000] [--models 4] [--repeat 5]

Prints one line per choice: the median wall time of each form and their ratio. The machine's load
moves both forms alike; compare ratios, not times, across runs (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(what: str, ours: float, other: float, other_name: str) -> None:
    times = f"ours {ours * 1e3:9.2f} ms   {other_name} {other * 1e3:9.2f} ms"
    print(f"{what:<34} {times}   ratio {other / ours:5.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=4_000_000, help="elements per task vector")
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(a.models, a.numel, generator=g)
    total = tau.sum(dim=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")

    def sign_arith() -> torch.Tensor:
        return (total > 0).to(tau.dtype).mul_(2.0).sub_(1.0)

    def sign_where() -> torch.Tensor:
        return torch.where(total > 0, 1.0, -1.0)

    assert torch.equal(sign_arith(), sign_where())
    report("EMR elected sign", timed(sign_arith, a.repeat), timed(sign_where, a.repeat), "where")

    signed = tau * sign_arith()
    masks = signed > 0
    epsilon = signed.clamp(min=0).amax(dim=0)

    def kept_product() -> torch.Tensor:
        return masks.to(epsilon.dtype).mul_(epsilon.abs())

    def kept_where() -> torch.Tensor:
        return torch.where(masks, epsilon.abs(), 0.0)

    assert torch.equal(kept_product(), kept_where())
    report("EMR |M_t * unified|", timed(kept_product, a.repeat), timed(kept_where, a.repeat), "where")

    params = [torch.nn.Parameter(torch.randn(256, 256, generator=g)) for _ in range(40)]
    for q in params:
        q.grad = torch.randn(q.shape, generator=g)
    fused = torch.optim.AdamW(params, lr=1e-3, fused=True)
    loop = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    report("AdamW step, 40 x 256^2 params", timed(fused.step, a.repeat), timed(loop.step, a.repeat), "loop")


if __name__ == "__main__":
    main()
