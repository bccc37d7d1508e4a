"""Benchmark the data-free merging methods of 2025 (tsv_m, iso_c, iso_cts, consensus_ta, cart,
wudi, doge_ta) against task_arithmetic and against fusion-bench 0.2.33's implementation of the
same method on the same input, in one run.

    .venv/bin/python benchmarks/bench_methods_2025.py --preset 168m --dtype bfloat16 --experts 4 \\
        --threads 2 --wudi-steps 10 --doge-steps 10 --write-doc

For every method: first correctness, then time.

1. *check*: ``weightmerge merge`` (streamed, ``dtype: float32``, ``out_dtype: float32``) and
   fusion-bench's function (in a child process: the checkpoints loaded into memory in float32,
   task vectors, the function, base + result) on the same checkpoints; the merged task vectors
   (output - base) are compared tensor by tensor: the largest relative Frobenius difference must
   stay under ``--tolerance`` (ours runs its SVDs in float64, fusion-bench in float32).
   ``cart`` has no fusion-bench implementation: it is checked against the in-memory API instead.
2. *time*: each run a fresh, measured process (wall clock, CPU time, peak RSS: bench_measure.py):
   task_arithmetic, ours and fusion-bench for each method, ``--runs`` rounds, medians.

wudi and doge_ta iterate per matrix (400 Adam steps by default; fusion-bench's doge_ta fixes 400):
``--wudi-steps`` / ``--doge-steps`` time fewer steps, said in the table. fusion-bench's doge_ta
merges only keys containing "encoder" and a Llama checkpoint has none, so doge_ta is timed
against no fusion-bench run; fusion-bench's wudi forms an (m, m) product per task and step (4 GiB
each for a 32000-row embedding): ``--skip-fusion-bench wudi`` leaves it out on large models. Such
methods are checked against the in-memory API (same bits expected).

Results: JSON under benchmarks/results/, a markdown table printed and, with ``--write-doc``,
written into docs/benchmarks.md between the ``methods2025:begin``/``methods2025:end`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_measure import RunResult, machine_info, median, run_measured  # noqa: E402
from bench_merge import venv_bin, write_yaml  # noqa: E402
from make_models import Spec, default_root, make_models, param_count  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- methods2025:begin -->", "<!-- methods2025:end -->"
ALL = ["tsv_m", "iso_c", "iso_cts", "consensus_ta", "cart", "wudi", "doge_ta"]
SVD_METHODS = {"tsv_m", "iso_c", "iso_cts", "cart"}
TARGET_VS_TA = 5.0  # SVD methods within 5x task_arithmetic's wall time
FB_FUNCS = {"tsv_m", "iso_c", "iso_cts", "consensus_ta", "wudi"}


def method_params(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if name == "task_arithmetic":
        return {"lambda": 1.0}
    if name == "consensus_ta":
        return {"lambda": 1.0, "mask_lambda": 0.6, "k": 2}
    if name == "wudi":
        return {"steps": args.wudi_steps}
    if name == "doge_ta":
        return {"steps": args.doge_steps}
    return {}


def config(name: str, root: Path, experts: int, params: Mapping[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {"merge_method": name}
    if name != "cart":
        cfg["base_model"] = str(root / "base")
    cfg["models"] = [{"model": str(root / f"expert_{e}")} for e in range(1, experts + 1)]
    if params:
        cfg["parameters"] = dict(params)
    cfg["dtype"] = "float32"
    cfg["out_dtype"] = "float32"
    return cfg


# ---------------------------------------------------------------------------------------------
# fusion-bench (child process)


def _load(path: Path) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from weightmerge.io.sources import open_source

    src = open_source(str(path))
    try:
        return {k: src.read(k).to(torch.float32) for k in src.keys()}  # noqa: SIM118
    finally:
        src.close()


def fb_child(name: str, root: Path, experts: int, params: Mapping[str, Any], out: Path) -> None:
    """Run fusion-bench's implementation of ``name`` in this process; save base + merged task vector."""
    import contextlib
    import io

    import torch
    from safetensors.torch import save_file

    base = _load(root / "base")
    tvs = []
    for e in range(1, experts + 1):
        m = _load(root / f"expert_{e}")
        tvs.append({k: m[k] - base[k] for k in base})
        del m
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        if name == "tsv_m":
            from fusion_bench.method.task_singular_vector.utils import TSVM_utils

            merged = TSVM_utils.compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")
        elif name == "iso_c":
            from fusion_bench.method.isotropic_merging.iso_utils import iso_c

            merged = iso_c(tvs, accelerator="cpu")
        elif name == "iso_cts":
            from fusion_bench.method.isotropic_merging.iso_utils import iso_cts

            merged = iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu")
        elif name == "wudi":
            from fusion_bench.method.wudi.wudi import wudi_merging

            with torch.enable_grad():
                merged = wudi_merging(tvs, accelerator="cpu", iter_num=int(params["steps"]))
        elif name == "consensus_ta":
            from fusion_bench.method.tall_mask.utils import generate_task_masks

            keys = sorted(base)
            flat_tv = torch.stack([torch.cat([tv[k].reshape(-1) for k in keys]) for tv in tvs])
            flat_base = torch.cat([base[k].reshape(-1) for k in keys])
            masks = generate_task_masks(flat_tv, flat_base + flat_tv, flat_base, tall_mask_lambda=0.6)
            kept = (masks.sum(dim=0) >= 2) * flat_tv.sum(dim=0)
            merged, pos = {}, 0
            for k in keys:
                n = base[k].numel()
                merged[k] = kept[pos : pos + n].reshape(base[k].shape)
                pos += n
        else:
            raise ValueError(f"no fusion-bench implementation of {name!r}")
    result = {k: (base[k] + merged[k].detach()).contiguous() for k in base}
    save_file(result, str(out))


def fb_cmd(name: str, root: Path, experts: int, params: Mapping[str, Any], out: Path) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--fb-child",
        name,
        "--root",
        str(root),
        "--experts",
        str(experts),
        "--params",
        json.dumps(dict(params)),
        "--out",
        str(out),
    ]


# ---------------------------------------------------------------------------------------------
# checks


def read_dir(path: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def max_rel_diff(got: Mapping[str, Any], want: Mapping[str, Any], base: Mapping[str, Any]) -> float:
    """Largest relative Frobenius difference of the merged task vectors (output - base)."""
    worst = 0.0
    for k, w in want.items():
        tw = w.double() - base[k].double()
        tg = got[k].double() - base[k].double()
        den = float(tw.norm())
        err = float((tg - tw).norm())
        worst = max(worst, err / den if den > 0 else err)
    return worst


def in_memory_check(name: str, root: Path, experts: int, params: Mapping[str, Any], got_dir: Path) -> float:
    """The streamed output against ``merge_state_dicts`` on the same inputs (float32): for the
    methods fusion-bench lacks or is not run on."""
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from weightmerge.api import merge_state_dicts

    models = [_load(root / f"expert_{e}") for e in range(1, experts + 1)]
    base = None if name == "cart" else _load(root / "base")
    want = merge_state_dicts(base, models, name, dict(params), compute_dtype=torch.float32)
    assert isinstance(want, dict)
    got = read_dir(got_dir)
    return max(float((got[k].double() - want[k].double()).abs().max()) for k in want)


# ---------------------------------------------------------------------------------------------
# main


def run(cmd: list[str], threads: int) -> RunResult:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    res = run_measured(cmd, env=env)
    if res.rc != 0:
        raise RuntimeError(f"{cmd[:3]} failed (rc {res.rc}):\n{res.stderr_tail}")
    return res


def summary(r: RunResult) -> dict[str, float]:
    return {"wall_s": r.wall_s, "cpu_s": r.cpu_s, "rss_mib": r.maxrss_bytes / 2**20, "load": r.load_before[0]}


def markdown(result: Mapping[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"Run of {meta['date']} at {meta['git']}, {meta['machine']}; `{meta['command']}`. "
        f"Model: {meta['preset']} ({meta['params']:,} parameters, {meta['dtype']}), {meta['experts']} "
        f"experts, {meta['threads']} threads, median of {meta['runs']} run(s) each, every run a fresh "
        "process; float32 compute and output; 1-minute load average at the start of the runs "
        f"{min(r['ours']['load'] for r in result['methods'].values()):.1f}-"
        f"{max(r['ours']['load'] for r in result['methods'].values()):.1f}.",
        "",
        "| method | wall s | CPU s | peak RSS MiB | TA wall s (same round) | × TA wall | × TA CPU "
        "| fusion-bench wall s | fusion-bench RSS MiB | ours / fusion-bench wall | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["methods"].items():
        fb = row.get("fb")
        ta = row["ta"]
        ratio = row["ours"]["wall_s"] / ta["wall_s"]
        cpu_ratio = row["ours"]["cpu_s"] / ta["cpu_s"]
        target = f" (target ≤ {TARGET_VS_TA:g})" if name in SVD_METHODS else ""
        lines.append(
            f"| {row['label']} | {row['ours']['wall_s']:.1f} | {row['ours']['cpu_s']:.1f} | "
            f"{row['ours']['rss_mib']:.0f} | {ta['wall_s']:.1f} | {ratio:.1f}{target} | {cpu_ratio:.1f} | "
            + (
                f"{fb['wall_s']:.1f} | {fb['rss_mib']:.0f} | {row['ours']['wall_s'] / fb['wall_s']:.2f} | "
                if fb
                else "- | - | - | "
            )
            + f"{row['check']} |"
        )
    return "\n".join(lines) + "\n"


def write_doc(md: str) -> None:
    text = DOC.read_text()
    block = f"{BEGIN}\n{md}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Data-free methods of 2025\n\n" + block + "\n"
    DOC.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="168m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(ALL))
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wudi-steps", type=int, default=400)
    p.add_argument("--doge-steps", type=int, default=400)
    p.add_argument(
        "--tolerance", type=float, default=1e-3, help="largest relative difference vs fusion-bench"
    )
    p.add_argument("--no-fusion-bench", action="store_true")
    p.add_argument(
        "--skip-fusion-bench",
        default="",
        help="methods not run through fusion-bench (checked against the in-memory API instead)",
    )
    p.add_argument("--work", default="/tmp/wm-bench-2025")
    p.add_argument("--json", default=None)
    p.add_argument("--write-doc", action="store_true")
    p.add_argument("--combine", nargs="+", default=None, help="JSON results of earlier runs: one table")
    # child mode
    p.add_argument("--fb-child", default=None)
    p.add_argument("--root", default=None)
    p.add_argument("--params", default="{}")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.fb_child:
        fb_child(args.fb_child, Path(args.root), args.experts, json.loads(args.params), Path(args.out))
        return 0

    if args.combine:
        parts = [json.loads(Path(f).read_text()) for f in args.combine]
        combined = {"meta": dict(parts[0]["meta"]), "methods": {}}
        combined["meta"]["command"] = " ; ".join(pt["meta"]["command"] for pt in parts)
        for pt in parts:
            combined["methods"].update(pt["methods"])
        md = markdown(combined)
        print(md)
        if args.write_doc:
            write_doc(md)
        return 0
    methods = [m for m in args.methods.split(",") if m]
    skip_fb = {m for m in args.skip_fusion_bench.split(",") if m}
    unknown = sorted(set(methods) - set(ALL))
    if unknown:
        p.error(f"unknown methods {unknown}; known: {ALL}")
    import torch

    torch.set_num_threads(args.threads)  # as the timed runs: BLAS results can depend on the count
    spec = Spec(args.preset, args.dtype, args.experts, args.seed, 1000**3)
    root = make_models(spec, default_root())
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    wm = [venv_bin("weightmerge")]

    def ours(name: str, tag: str) -> tuple[RunResult, Path]:
        cfg = write_yaml(work / f"{name}.yaml", config(name, root, args.experts, method_params(name, args)))
        out = work / f"out-{name}-{tag}"
        shutil.rmtree(out, ignore_errors=True)
        res = run(
            [
                *wm,
                "merge",
                str(cfg),
                str(out),
                "--quiet",
                "--no-copy-tokenizer",
                "--threads",
                str(args.threads),
            ],
            args.threads,
        )
        return res, out

    result: dict[str, Any] = {"methods": {}}
    base_sd = read_dir(root / "base") if not args.no_fusion_bench else {}
    ta_runs = []
    for name in methods:
        params = method_params(name, args)
        label = name + (f" ({params['steps']} steps)" if "steps" in params else "")
        print(f"== {label}: check", file=sys.stderr, flush=True)
        first, out = ours(name, "check")
        row: dict[str, Any] = {"label": label, "params": params}
        fb_runs: list[RunResult] = []
        use_fb = name in FB_FUNCS and not args.no_fusion_bench and name not in skip_fb
        if use_fb:
            fb_out = work / f"fb-{name}.safetensors"
            fb_runs.append(run(fb_cmd(name, root, args.experts, params, fb_out), args.threads))
            diff = max_rel_diff(read_dir(out), read_dir(fb_out), base_sd)
            ok = diff <= args.tolerance
            row["check"] = f"{'ok' if ok else 'FAIL'}: max rel. diff vs fusion-bench {diff:.1e}"
            fb_out.unlink()
            if not ok:
                print(f"{name}: {row['check']}", file=sys.stderr)
        else:
            diff = in_memory_check(name, root, args.experts, params, out)
            row["check"] = f"{'ok' if diff == 0 else 'FAIL'}: max abs diff vs in-memory API {diff:.1e}"
        shutil.rmtree(out, ignore_errors=True)
        runs = [first]
        row_ta: list[RunResult] = []
        for i in range(args.runs):
            print(f"== {label}: round {i + 1}", file=sys.stderr, flush=True)
            ta, ta_out = ours("task_arithmetic", f"r{i}")
            ta_runs.append(ta)
            row_ta.append(ta)
            shutil.rmtree(ta_out, ignore_errors=True)
            if i > 0 or args.runs > 1:
                r, o = ours(name, f"r{i}")
                runs.append(r)
                shutil.rmtree(o, ignore_errors=True)
            if use_fb and (i > 0 or args.runs > 1):
                fb_out = work / f"fb-{name}-{i}.safetensors"
                fb_runs.append(run(fb_cmd(name, root, args.experts, params, fb_out), args.threads))
                fb_out.unlink()
        if args.runs > 1:
            runs = runs[1:]  # the check run warmed the page cache
            fb_runs = fb_runs[1:]
        row["ours"] = {
            k: median([summary(r)[k] for r in runs]) for k in ("wall_s", "cpu_s", "rss_mib", "load")
        }
        row["ta"] = {
            k: median([summary(r)[k] for r in row_ta]) for k in ("wall_s", "cpu_s", "rss_mib", "load")
        }
        if fb_runs:
            row["fb"] = {
                k: median([summary(r)[k] for r in fb_runs]) for k in ("wall_s", "cpu_s", "rss_mib", "load")
            }
        result["methods"][name] = row
    result["ta"] = {
        k: median([summary(r)[k] for r in ta_runs]) for k in ("wall_s", "cpu_s", "rss_mib", "load")
    }
    info = machine_info(str(REPO))
    cmd = "benchmarks/bench_methods_2025.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result["meta"] = {
        "date": time.strftime("%Y-%m-%d"),
        "git": str(info.get("commit", "?"))[:7] + (" (dirty)" if info.get("worktree_dirty") else ""),
        "machine": f"{info.get('cpu_model', '?')}, {info.get('cpu_affinity', '?')} cores",
        "command": cmd,
        "preset": args.preset,
        "params": param_count(spec.shape),
        "dtype": args.dtype,
        "experts": args.experts,
        "threads": args.threads,
        "runs": args.runs,
        "machine_info": info,
    }
    md = markdown(result)
    print(md)
    out_json = (
        Path(args.json)
        if args.json
        else HERE / "results" / f"methods2025-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.write_doc:
        write_doc(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
