"""The I/O floor of a merge: read every input tensor and write an output of the same size, nothing
else, through weightmerge's own read path (memory-mapped safetensors via ``open_source``) and
writer (``ShardedSafetensorsWriter``: positioned writes, fsync at finalize).

    .venv/bin/python benchmarks/io_floor.py OUT INPUT_DIR [INPUT_DIR ...] [--shard-size 2GB]

Every tensor of every input is copied out of the map into a reused buffer of its stored dtype
(that forces the pages in, as a merge must); the first input's tensors are written to OUT in
sorted name order. Prints one JSON line: seconds spent reading and writing, bytes moved.
A merge cannot be faster than this process (same interpreter, same imports, same files).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1000, "M": 1000**2, "G": 1000**3}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def io_floor(out: Path, inputs: list[str], *, shard_size: int) -> dict[str, float]:
    from weightmerge.io.sources import open_source
    from weightmerge.io.writer import ShardedSafetensorsWriter

    t0 = time.perf_counter()
    sources = [open_source(p) for p in inputs]
    first = sources[0]
    names = sorted(first.keys())
    layout = [(n, first.info(n).shape, first.info(n).dtype) for n in names]
    out.mkdir(parents=True, exist_ok=False)
    writer = ShardedSafetensorsWriter(str(out), layout, shard_size=shard_size)
    read_s = write_s = 0.0
    read_bytes = write_bytes = 0
    buf = torch.empty(0, dtype=torch.uint8)
    for name in names:
        t1 = time.perf_counter()
        for src in sources:
            t = src.read(name)
            nbytes = t.numel() * t.element_size()
            if buf.numel() < nbytes:
                buf = torch.empty(nbytes, dtype=torch.uint8)
            view = buf[:nbytes].view(t.dtype).view(t.shape) if nbytes else t.clone()
            view.copy_(t)
            read_bytes += nbytes
        t2 = time.perf_counter()
        kept = first.read(name)
        writer.write(name, kept)
        write_bytes += kept.numel() * kept.element_size()
        write_s += time.perf_counter() - t2
        read_s += t2 - t1
    t3 = time.perf_counter()
    writer.finalize()
    close = getattr(writer, "close", None)
    if close is not None:
        close()
    for s in sources:
        s.close()
    finalize_s = time.perf_counter() - t3
    return {
        "read_s": read_s,
        "write_s": write_s,
        "finalize_s": finalize_s,
        "total_s": time.perf_counter() - t0,
        "read_bytes": read_bytes,
        "write_bytes": write_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--shard-size", default="2GB")
    args = p.parse_args(argv)
    res = io_floor(args.out, args.inputs, shard_size=parse_size(args.shard_size))
    print(json.dumps(res))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
