"""CPU time of one matrix merge of tsv_m and iso_c against one float64 SVD, on the matrix shapes of
the 168M benchmark model (4 task vectors of random normal entries), in this process, one thread:

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/profile_svd_methods.py

CPU time (``time.process_time``) rather than wall time: the development machine is shared. Where
the time of an SVD method goes (docs/benchmarks.md, "Data-free methods of 2025")."""

from __future__ import annotations

import time

import torch

from weightmerge.methods.iso_c import iso_c_matrix
from weightmerge.methods.tsv_m import tsv_merge_matrix

SHAPES = [(768, 768), (3264, 768), (768, 3264), (32000, 768)]


def cpu(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.process_time()
    fn()
    return time.process_time() - t


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print("| shape | tsv_m s CPU | iso_c s CPU | one float64 SVD s CPU |")
    print("|---|---|---|---|")
    for shape in SHAPES:
        tau = torch.randn(4, *shape, generator=g) * 0.01
        a = cpu(lambda t=tau: tsv_merge_matrix(t))
        b = cpu(lambda t=tau: iso_c_matrix(t))
        c = cpu(lambda t=tau: torch.linalg.svd(t[0].double(), full_matrices=False))
        print(f"| {shape[0]} x {shape[1]} | {a:.2f} | {b:.2f} | {c:.2f} |", flush=True)


if __name__ == "__main__":
    main()
