"""--resume check on a real-size model: an uninterrupted merge, then the same merge killed with
SIGKILL at several points (given as fractions of the output's tensors already journaled) and
continued with ``--resume``; every output file is compared byte for byte (sha256) with the
uninterrupted run's. Prints one line per kill and a JSON summary.

    .venv/bin/python benchmarks/make_models.py --preset 405m --dtype bf16 --experts 2 --root /tmp/m
    .venv/bin/python benchmarks/bench_resume.py --models /tmp/m/405m-bfloat16-e2-s0 --work /tmp/r \\
        --method dare_ties --kill-at 0,0.5,0.9
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

WM = [sys.executable, "-m", "weightmerge"]
PARAMS = {"ties": {"weight": 0.5, "density": 0.3}, "dare_ties": {"weight": 0.5, "density": 0.3}}


def digest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.iterdir()):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        out[p.name] = h.hexdigest()
    return out


def journal_lines(parent: Path, name: str) -> int:
    for n in os.listdir(parent):
        if n.startswith(f".{name}.wm-tmp-"):
            try:
                return len((parent / n / "wm-journal.txt").read_text().splitlines())
            except FileNotFoundError:
                return 0
    return -1


def run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([*WM, *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"merge failed: {r.stderr[-2000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True, help="a make_models.py directory (base, expert_*)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--method", default="dare_ties", choices=sorted(PARAMS))
    ap.add_argument("--kill-at", default="0,0.5,0.9", help="fractions of the tensors journaled at the kill")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    experts = sorted(p for p in args.models.iterdir() if p.name.startswith("expert_"))
    cfg = args.work / "cfg.yaml"
    doc = {
        "merge_method": args.method,
        "base_model": str(args.models / "base"),
        "models": [{"model": str(e)} for e in experts],
        "parameters": PARAMS[args.method],
    }
    cfg.write_text(yaml.safe_dump(doc))
    n_tensors = len(
        json.loads((args.models / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    )
    ref = args.work / "ref"
    shutil.rmtree(ref, ignore_errors=True)
    full_s = run(["merge", str(cfg), str(ref), "-q"])
    want = digest(ref)
    print(f"uninterrupted: {full_s:.1f} s, {len(want)} files, {n_tensors} tensors")
    results = []
    for k, frac in enumerate(float(f) for f in args.kill_at.split(",")):
        out = args.work / f"out{k}"
        shutil.rmtree(out, ignore_errors=True)
        target = max(0, int(frac * n_tensors))
        t0 = time.perf_counter()
        p = subprocess.Popen([*WM, "merge", str(cfg), str(out), "-q"])
        while journal_lines(args.work, out.name) < target and p.poll() is None:
            time.sleep(0.01)
        at = journal_lines(args.work, out.name)
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed_s = time.perf_counter() - t0
        if p.returncode != -signal.SIGKILL:
            raise SystemExit(f"kill {k}: the merge ended (rc {p.returncode}) before the kill point")
        resume_s = run(["merge", str(cfg), str(out), "-q", "--resume"])
        got = digest(out)
        same = got == want
        results.append(
            {
                "kill_fraction": frac,
                "journaled_at_kill": at,
                "killed_after_s": round(killed_s, 1),
                "resume_s": round(resume_s, 1),
                "bit_identical": same,
            }
        )
        print(
            f"kill {k}: SIGKILL after {killed_s:.1f} s with {at} of {n_tensors} tensors journaled; "
            f"--resume took {resume_s:.1f} s; output {'bit-identical' if same else 'DIFFERS'}"
        )
        shutil.rmtree(out, ignore_errors=True)
    summary = {
        "method": args.method,
        "models": str(args.models),
        "uninterrupted_s": round(full_s, 1),
        "tensors": n_tensors,
        "kills": results,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if all(r["bit_identical"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
