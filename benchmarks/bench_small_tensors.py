"""Per-tensor overhead of ``weightmerge merge``: the same number of parameters stored as many small
tensors or as few large ones.

    .venv/bin/python benchmarks/bench_small_tensors.py --runs 3

Two checkpoint sets (base + ``--experts`` experts, bf16, one shard each) hold the same parameter
count: ``--many`` tensors of ``--numel`` elements, and ``--many // 100`` tensors of ``100 * --numel``.
For each, first the check (``task_arithmetic`` output equal bit for bit to the in-memory
``merge_state_dicts``), then ``--runs`` alternating rounds of three whole processes: the merge,
the I/O floor (benchmarks/io_floor.py: read every input, write the output) and ``weightmerge
--help`` (start-up and imports only). Medians are printed with:

* the merge's and the floor's per-tensor overhead, (many - few) / (tensor count difference);
* the ratio of the merge's time many / few.

The baseline is the "few" layout in the same run. The issue asked for small tensors to be batched
into one job. They are not, and this script measures what that costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_measure import machine_info, median, run_measured  # noqa: E402
from bench_merge import venv_bin  # noqa: E402


def make_set(root: Path, count: int, numel: int, experts: int, seed: int) -> None:
    """base + experts with ``count`` 1-D bf16 tensors of ``numel`` elements each (reused if present)."""
    from safetensors.torch import save_file

    stamp = root / "spec.json"
    spec = {"count": count, "numel": numel, "experts": experts, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return
    shutil.rmtree(root, ignore_errors=True)
    g = torch.Generator().manual_seed(seed)
    base = {f"layer.{i}.weight": torch.randn(numel, generator=g).to(torch.bfloat16) for i in range(count)}
    for name in ["base", *[f"expert_{e}" for e in range(1, experts + 1)]]:
        d = root / name
        d.mkdir(parents=True)
        sd = base
        if name != "base":
            sd = {
                k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
                for k, v in base.items()
            }
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "toy"}))
    stamp.write_text(json.dumps(spec))


def config(root: Path, experts: int) -> Path:
    lines = ["merge_method: task_arithmetic", f"base_model: {root / 'base'}", "models:"]
    lines += [f"  - model: {root / f'expert_{e}'}" for e in range(1, experts + 1)]
    lines += ["parameters:", "  lambda: 0.5", "dtype: float32", "out_dtype: bfloat16", ""]
    path = root / "ta.yaml"
    path.write_text("\n".join(lines))
    return path


def check(root: Path, experts: int, out: Path) -> dict[str, Any]:
    """The merge's output against the in-memory API (bit for bit)."""
    from safetensors.torch import load_file

    from weightmerge import merge_state_dicts

    def load(d: Path) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for f in sorted(d.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        return sd

    base = load(root / "base")
    models = [load(root / f"expert_{e}") for e in range(1, experts + 1)]
    ref = merge_state_dicts(base, models, "task_arithmetic", {"lambda": 0.5})
    assert isinstance(ref, dict)
    got = load(out)
    bad = [k for k in ref if not torch.equal(ref[k].view(torch.int16), got[k].view(torch.int16))]
    return {"ok": not bad and sorted(ref) == sorted(got), "tensors": len(ref), "differing": len(bad)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--many", type=int, default=4000, help="tensor count of the many-small layout")
    ap.add_argument("--numel", type=int, default=4096, help="elements per small tensor")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--dir",
        default=os.environ.get("WEIGHTMERGE_BENCH_DIR", str(Path.home() / ".cache" / "weightmerge-bench")),
    )
    ap.add_argument("--json", default=str(HERE / "results"), help="folder for the result JSON")
    a = ap.parse_args(argv)
    few = max(1, a.many // 100)
    layouts = {
        "many": (a.many, a.numel),
        "few": (few, a.numel * a.many // few),
    }
    roots = {k: Path(a.dir) / f"small-tensors-{c}x{n}-e{a.experts}" for k, (c, n) in layouts.items()}
    for k, (c, n) in layouts.items():
        print(f"[{time.strftime('%H:%M:%S')}] inputs {k}: {c} tensors of {n} elements", flush=True)
        make_set(roots[k], c, n, a.experts, seed=0)
    work = Path(tempfile.mkdtemp(prefix="wm-small-"))
    result: dict[str, Any] = {"command": sys.argv, "machine": machine_info(str(HERE.parent)), "layouts": {}}
    try:
        cfgs = {k: config(roots[k], a.experts) for k in layouts}
        for k in layouts:  # check first (also the warm-up)
            out = work / f"check-{k}"
            r = run_measured([venv_bin("weightmerge"), "merge", str(cfgs[k]), str(out), "--quiet"])
            if r.rc != 0:
                print(r.stderr_tail, file=sys.stderr)
                return 1
            chk = check(roots[k], a.experts, out)
            print(f"[{time.strftime('%H:%M:%S')}] check {k}: {chk}", flush=True)
            if not chk["ok"]:
                return 1
            result["layouts"][k] = {
                "tensors": layouts[k][0],
                "numel": layouts[k][1],
                "check": chk,
                "runs": [],
            }
            shutil.rmtree(out)
        inputs = {
            k: [str(roots[k] / "base")] + [str(roots[k] / f"expert_{e}") for e in range(1, a.experts + 1)]
            for k in layouts
        }
        for rnd in range(a.runs):
            order = list(layouts) if rnd % 2 == 0 else list(reversed(layouts))
            for k in order:
                out = work / f"out-{k}"
                merge = run_measured([venv_bin("weightmerge"), "merge", str(cfgs[k]), str(out), "--quiet"])
                shutil.rmtree(out, ignore_errors=True)
                floor = run_measured([sys.executable, str(HERE / "io_floor.py"), str(out), *inputs[k]])
                shutil.rmtree(out, ignore_errors=True)
                start = run_measured([venv_bin("weightmerge"), "--help"])
                for r in (merge, floor, start):
                    if r.rc != 0:
                        print(r.stderr_tail, file=sys.stderr)
                        return 1
                result["layouts"][k]["runs"].append(
                    {"merge": merge.as_dict(), "floor": floor.as_dict(), "startup": start.as_dict()}
                )
                print(
                    f"[{time.strftime('%H:%M:%S')}] round {rnd + 1} {k:4s}: merge {merge.wall_s:.2f} s, "
                    f"floor {floor.wall_s:.2f} s, start-up {start.wall_s:.2f} s",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {
        k: {what: median([r[what]["wall_s"] for r in v["runs"]]) for what in ("merge", "floor", "startup")}
        for k, v in result["layouts"].items()
    }
    extra = layouts["many"][0] - layouts["few"][0]
    summary = {
        "median_wall_s": med,
        "merge_overhead_ms_per_tensor": 1e3 * (med["many"]["merge"] - med["few"]["merge"]) / extra,
        "floor_overhead_ms_per_tensor": 1e3 * (med["many"]["floor"] - med["few"]["floor"]) / extra,
        "merge_many_over_few": med["many"]["merge"] / med["few"]["merge"],
    }
    result["summary"] = summary
    print()
    print("| layout | tensors | merge wall s | I/O floor wall s | start-up s |")
    print("|---|---:|---:|---:|---:|")
    for k in layouts:
        print(
            f"| {k} | {layouts[k][0]} | {med[k]['merge']:.2f} | {med[k]['floor']:.2f} "
            f"| {med[k]['startup']:.2f} |"
        )
    print()
    print(
        f"merge: {summary['merge_overhead_ms_per_tensor']:.3f} ms per extra tensor "
        f"(many / few = {summary['merge_many_over_few']:.2f}); "
        f"I/O floor: {summary['floor_overhead_ms_per_tensor']:.3f} ms per extra tensor"
    )
    Path(a.json).mkdir(parents=True, exist_ok=True)
    path = (
        Path(a.json) / f"small-tensors-{a.many}x{a.numel}-e{a.experts}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    path.write_text(json.dumps(result, indent=1))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
