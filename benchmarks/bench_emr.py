"""Benchmark EMR artifacts: merge into one, check it, measure its size, materialize, switch tasks.

    .venv/bin/python benchmarks/bench_emr.py --preset 168m --dtype float32 --experts 4 --runs 3
    .venv/bin/python benchmarks/bench_emr.py --quick          # smoke run: tiny preset, seconds

Steps (every command a fresh process, measured with bench_measure: wall, CPU, peak RSS):

1. *inputs*: make_models.py's checkpoints (generated once, then reused from the cache).
2. *merge*: ``weightmerge merge`` with ``merge_method: emr`` (bench_merge.py's config and command)
   into an artifact directory; then ``weightmerge emr materialize ART --task T OUT`` for every task
   (these runs are the check runs and the warm-up: they bring the files into the page cache).
3. *check* (a worker process): ``artifact.verify()``; task names, rescalers and merged tensor names
   equal the in-memory ``merge_state_dicts(base, experts, "emr")`` (inputs given as lazy mappings
   over the checkpoint files; the result holds base, unified vector and masks: about 2 + n/4
   model sizes in float32, plus one task's state dict at a time); for every task,
   ``load_emr(ART).task_state_dict(task, base)`` and the materialized checkpoint equal
   ``EMRResult.task_state_dict(i)`` exactly (same names, dtypes, shapes, 0 differing elements).
   If the artifact stores the unified vector in a narrower dtype than the compute dtype (bf16 or
   fp16 checkpoints: the documented default), the exact reference is the same API formula
   (``emr_reconstruct``) with the unified vector rounded to the stored dtype; the distance to the
   unrounded result is reported too.
4. *sizes*: artifact files on disk (unified, masks, manifest, rest) against n full expert
   checkpoints and against the theoretical size (unified bytes + n * ceil(numel / 8) per merged
   tensor + per-task tensors); mask and amortized bits per parameter per task.
5. *switch* (a worker process): the base loaded into transformers ``LlamaForCausalLM``, a first
   ``artifact.apply(model, A)``, then ``--switches`` switches B, A, B, ... in place, each timed;
   after every switch the model's state dict is compared with the fresh materialization of its
   task (step 2): A -> B -> A must be bit-identical to materializing A.
6. *time*: ``--runs`` more merges and ``--runs`` more materializations of task A (fresh processes,
   medians). ``--runs 0`` reports the check runs instead.

``--quick`` (the smoke test, tests/test_bench_emr_smoke.py): tiny preset, 2 experts, ``--runs 0``,
2 switches, only the first task materialized through the CLI (the other through
``EMRArtifact.materialize`` in the worker) and check + switch in one worker process: five Python
processes with torch instead of eight.

Results: JSON (default benchmarks/results/emr-<preset>-<dtype>-e<N>.json) and a markdown report on
stdout (``--report JSON`` renders a results file again). Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_measure import machine_info, median  # noqa: E402
from bench_merge import (  # noqa: E402
    METHODS,
    Bench,
    Inputs,
    Method,
    config_dict,
    ours_cmd,
    parse_size,
    venv_bin,
    write_yaml,
)
from make_models import DTYPE_ALIASES, DTYPES, PRESETS, Spec, default_root, make_models, param_count  # noqa: E402

WORKER = "_worker"  # argv[1] of the worker processes (check, switch)
RESULT = "result.json"  # what a worker writes into its output directory


# ---------------------------------------------------------------------------------------------
# workers (fresh processes; they import torch / transformers themselves)


def _tensor_diff_total(ours: Any, ref: Any) -> dict[str, Any]:  # mappings or CheckpointDirs
    """bench_compare.compare, with ``ok`` = same names, dtypes, shapes and 0 differing elements."""
    from bench_compare import compare

    res = compare(ours, ref)
    res["ok"] = "error" not in res and res.get("n_diff", 1) == 0
    return res


class LazyCheckpoint(Mapping[str, Any]):
    """A checkpoint directory as a read-only mapping name -> tensor, read on access."""

    def __init__(self, ckpt: Any) -> None:  # a bench_compare.CheckpointDir
        self.ckpt = ckpt
        self.names = ckpt.keys()

    def __getitem__(self, name: str) -> Any:
        if name not in self.ckpt.weight_map:
            raise KeyError(name)
        return self.ckpt[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def check_worker(p: Mapping[str, Any]) -> dict[str, Any]:
    """The artifact against the in-memory API (see the module docstring, step 3)."""
    import torch
    from bench_compare import CheckpointDir

    from weightmerge.api import merge_state_dicts
    from weightmerge.emr import load_emr
    from weightmerge.emr.result import EMRResult, emr_reconstruct

    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    # lazy mappings (each tensor read when the API asks for it): the inputs are not all held at
    # once; the result holds the base, the unified vector and the masks (+ one task's state dict)
    base = LazyCheckpoint(CheckpointDir(p["base"]))
    experts = [LazyCheckpoint(CheckpointDir(d)) for d in p["models"]]
    t1 = time.perf_counter()
    res = merge_state_dicts(base, experts, "emr", {"rescale": p["rescale"]})
    assert isinstance(res, EMRResult)
    del experts
    out["in_memory_merge_s"] = time.perf_counter() - t1
    art = load_emr(p["artifact"])
    try:
        art.verify()
        out["verify"] = {"ok": True}
    except ValueError as err:
        out["verify"] = {"ok": False, "error": str(err)}
    out["tasks"] = {"ok": art.tasks == list(p["tasks"]), "artifact": art.tasks, "expected": p["tasks"]}
    out["rescalers"] = {
        "ok": art.rescalers == [float(r) for r in res.rescalers],
        "artifact": art.rescalers,
        "in_memory": [float(r) for r in res.rescalers],
    }
    out["merged_tensors"] = {
        "ok": sorted(art.tensors) == sorted(res.unified),
        "n": len(art.tensors),
        "n_in_memory": len(res.unified),
    }
    out["unified_rounded"] = any(t.unified_dtype != art.compute_dtype for t in art.tensors.values())
    out["reference"] = (
        "merge_state_dicts(base, experts, 'emr').task_state_dict(i)"
        if not out["unified_rounded"]
        else "emr_reconstruct(base, unified rounded to the stored dtype, mask_i, rescaler_i)"
    )
    per_task = []
    for i, task in enumerate(art.tasks):
        row: dict[str, Any] = {"task": task}
        ref = res.task_state_dict(i)
        if out["unified_rounded"]:
            r = torch.tensor(res.rescalers[i], dtype=art.compute_dtype)
            exact = dict(ref)
            for k in res.unified:
                u = res.unified[k].to(art.tensors[k].unified_dtype).to(art.compute_dtype)
                exact[k] = emr_reconstruct(base[k], u, res.masks[i][k], r)
            row["vs_unrounded"] = _tensor_diff_total(exact, ref)
            ref = exact
        row["task_state_dict"] = _tensor_diff_total(art.task_state_dict(task, p["base"]), ref)
        mat = p["materialized"].get(task)
        if mat is not None:
            row["materialized"] = _tensor_diff_total(CheckpointDir(mat), ref)
            row["materialized"]["config_json"] = (Path(mat) / "config.json").is_file()
            row["materialized"]["ok"] &= row["materialized"]["config_json"]
            row["materialized"]["via"] = "cli" if task in p.get("cli_materialized", ()) else "api"
        row["ok"] = row["task_state_dict"]["ok"] and row.get("materialized", {"ok": True})["ok"]
        per_task.append(row)
        del ref
    out["per_task"] = per_task
    out["materialized_tasks"] = sorted(p["materialized"])
    out["ok"] = bool(
        out["verify"]["ok"]
        and out["tasks"]["ok"]
        and out["rescalers"]["ok"]
        and out["merged_tensors"]["ok"]
        and per_task
        and all(r["ok"] for r in per_task)
        and set(p["materialized"]) == set(art.tasks)
    )
    out["worker_s"] = time.perf_counter() - t0
    return out


def _model_vs_checkpoint(model: Any, ckpt_dir: str) -> dict[str, Any]:
    from bench_compare import CheckpointDir

    sd = model.state_dict()
    return _tensor_diff_total({k: v.detach() for k, v in sd.items()}, CheckpointDir(ckpt_dir))


def switch_worker(p: Mapping[str, Any]) -> dict[str, Any]:
    """In-place task switching of a transformers model (see the module docstring, step 5)."""
    import resource

    import torch
    from transformers import LlamaForCausalLM

    from weightmerge.emr import load_emr

    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(p["base"], dtype=DTYPES[p["dtype"]])
    model.eval()
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()}
    art = load_emr(p["artifact"])
    a, b = p["task_a"], p["task_b"]
    mats = p["materialized"]
    t1 = time.perf_counter()
    art.apply(model, a)
    out["first_apply_s"] = time.perf_counter() - t1
    first = _model_vs_checkpoint(model, mats[a])
    steps: list[dict[str, Any]] = [{"task": a, "first": True, "check": first}]
    current = a
    for _ in range(int(p["switches"])):
        target = b if current == a else a
        t = time.perf_counter()
        art.apply(model, target)
        dt = time.perf_counter() - t
        steps.append({"task": target, "switch_s": dt, "check": _model_vs_checkpoint(model, mats[target])})
        current = target
    out["steps"] = steps
    out["switch_s"] = [s["switch_s"] for s in steps[1:]]
    out["sequence"] = " -> ".join(s["task"] for s in steps)
    out["current_task"] = art.current_task(model)
    out["aba_ok"] = len(steps) >= 3 and steps[2]["task"] == a and bool(steps[2]["check"]["ok"])
    out["all_steps_ok"] = all(s["check"]["ok"] for s in steps)
    out["ok"] = bool(out["aba_ok"] and out["all_steps_ok"] and out["current_task"] == current)
    out["worker_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


PARTS = {"check": check_worker, "switch": switch_worker}


def worker(p: Mapping[str, Any]) -> dict[str, Any]:
    """One fresh process: first the materializations through the API (``api_materialize``, task ->
    directory; what ``--quick`` does for all tasks but the first), then the ``parts`` in order."""
    out: dict[str, Any] = {}
    mats = dict(p["materialized"])
    if p.get("api_materialize"):
        from weightmerge.emr import load_emr

        t0 = time.perf_counter()
        with load_emr(p["artifact"]) as art:
            for task, d in p["api_materialize"].items():
                art.materialize(task, p["base"], d)
                mats[task] = d
        out["api_materialize_s"] = time.perf_counter() - t0
    q = {**p, "materialized": mats}
    for part in p["parts"]:
        out[part] = PARTS[part](q)
    return out


def worker_main(argv: Sequence[str]) -> int:
    params, out_dir = argv
    res = worker(json.loads(Path(params).read_text()))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / RESULT).write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------
# the benchmark (a small process: it runs commands and reads file sizes)


def emr_method(rescale: str) -> Method:
    return replace(METHODS["emr"], params={"rescale": rescale})


def materialize_cmd(artifact: Path, task: str, out: Path) -> list[str]:
    return [venv_bin("weightmerge"), "emr", "materialize", str(artifact), "--task", task, str(out)]


def run_worker(b: Bench, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Run ``worker(params)`` in a fresh, measured process; one result per part (with the
    process's wall, CPU and peak RSS), or a failed result per part if the process failed."""
    label = "+".join(params["parts"])
    pfile = b.work / "cfg" / f"worker-{label}.json"
    pfile.parent.mkdir(parents=True, exist_ok=True)
    pfile.write_text(json.dumps(dict(params), indent=2) + "\n")
    out = b.work / "out" / f"worker-{label}"
    cmd = [sys.executable, str(Path(__file__).resolve()), WORKER, str(pfile), str(out)]
    r = b.run(label, "worker", cmd, out, keep=True)
    proc = {"parts": label, "wall_s": r.wall_s, "cpu_s": r.cpu_s, "maxrss_bytes": r.maxrss_bytes}
    if r.rc != 0:
        err = f"worker {label} failed (rc {r.rc}): {r.stderr_tail[-1500:]}"
        return {part: {"ok": False, "error": err, "process": proc} for part in params["parts"]}
    res = json.loads((out / RESULT).read_text())
    return {part: {**res[part], "process": proc} for part in params["parts"]}


def _dir_files(d: Path) -> dict[str, int]:
    return {str(f.relative_to(d)): f.stat().st_size for f in sorted(d.rglob("*")) if f.is_file()}


def sizes(artifact: Path, inp: Inputs) -> dict[str, Any]:
    """Artifact bytes on disk by kind, against full checkpoints and the theoretical size."""
    import torch

    from weightmerge.emr import load_emr
    from weightmerge.emr.files import parse_dtype
    from weightmerge.emr.writer import MANIFEST

    with load_emr(artifact) as art:
        info = art.info()
        files = _dir_files(artifact)
        unified_files = sorted({t.file for t in art.tensors.values()})
        task_files = [f for pt in art.per_task for f in (pt["file"], pt.get("config")) if f]
        manifest = MANIFEST
        by_kind = {
            "unified": sum(files[f] for f in unified_files),
            "masks": sum(files[f] for f in art.mask_files),
            "manifest": files[manifest],
            "per_task": sum(files[f] for f in task_files),
        }
        core = sum(by_kind.values())
        other = {
            f: n
            for f, n in files.items()
            if f not in {*unified_files, *art.mask_files, *task_files, manifest}
        }
        n = len(art.tasks)

        def itemsize(dt: torch.dtype) -> int:
            return torch.empty((), dtype=dt).element_size()

        theo_unified = sum(t.numel * itemsize(t.unified_dtype) for t in art.tensors.values())
        theo_masks = n * sum(math.ceil(t.numel / 8) for t in art.tensors.values())
        theo_task = sum(
            math.prod(v["shape"]) * itemsize(parse_dtype(v["dtype"]))
            for pt in art.per_task
            for v in pt["tensors"].values()
        )
        merged_params = info["merged_params"]
        mask_bits = [8 * files[f] / merged_params for f in art.mask_files]
        n_mask_files = len(art.mask_files)
    expert_files = [_dir_files(Path(m)) for m in inp.models]
    experts_all = sum(sum(f.values()) for f in expert_files)
    experts_weights = sum(n_ for f in expert_files for name, n_ in f.items() if name.endswith(".safetensors"))
    theoretical = theo_unified + theo_masks + theo_task
    total_params = info_params(inp)
    return {
        "files": files,
        "by_kind": by_kind,
        "core_bytes": core,
        "other_files": other,
        "dir_bytes": sum(files.values()),
        "n_unified_files": len(unified_files),
        "n_mask_files": n_mask_files,
        "theoretical": {
            "unified_bytes": theo_unified,
            "masks_bytes": theo_masks,
            "per_task_bytes": theo_task,
            "total_bytes": theoretical,
        },
        "overhead_bytes": core - theoretical,
        "overhead_rel": core / theoretical - 1 if theoretical else None,
        "experts_bytes": experts_all,
        "experts_weight_bytes": experts_weights,
        "ratio_vs_experts": core / experts_weights if experts_weights else None,
        "dir_ratio_vs_experts": sum(files.values()) / experts_all if experts_all else None,
        "theoretical_ratio_vs_experts": theoretical / experts_weights if experts_weights else None,
        "merged_params": merged_params,
        "params": total_params,
        "mask_bits_per_param": mask_bits,
        "amortized_bits_per_param_per_task": 8 * core / (n * total_params) if total_params else None,
        "checkpoint_bits_per_param": 8 * experts_weights / (n * total_params) if total_params else None,
        "info": info,
    }


def info_params(inp: Inputs) -> int:
    spec = json.loads((inp.root / "spec.json").read_text())
    return int(spec["params"])


def _runs(b: Bench, label: str, tool: str) -> list[dict[str, Any]]:
    return [r for r in b.runs if r["label"] == label and r["tool"] == tool and r["rc"] == 0]


def _timing(b: Bench, label: str, timed: str, fallback: str) -> dict[str, Any]:
    runs = _runs(b, label, timed)
    source = timed
    if not runs:
        runs, source = _runs(b, label, fallback), fallback
    out: dict[str, Any] = {"n": len(runs), "source": source}
    for key in ("wall_s", "cpu_s", "maxrss_bytes", "peak_anon_bytes", "peak_file_bytes"):
        out[key] = median([r[key] for r in runs]) if runs else None
    out["wall_all_s"] = [r["wall_s"] for r in runs]
    out["load_before"] = [r["load_before"][0] for r in runs]
    return out


def run_bench(args: argparse.Namespace, command: str) -> dict[str, Any]:
    spec = Spec(args.preset, args.dtype, args.experts, args.seed, parse_size(args.input_shard))
    root = make_models(spec, args.root)
    inp = Inputs(root, args.dtype, args.experts)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"weightmerge-bench-emr-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    b = Bench(args, inp, work)
    b.log(f"inputs {root}; work {work}")
    m = emr_method(args.rescale)
    cfg_path = write_yaml(work / "cfg" / "emr.yaml", config_dict(m, inp, ours=True))
    art = work / "out" / "artifact"
    tasks = [Path(p).name for p in inp.models]
    result: dict[str, Any] = {
        "command": command,
        "config": {
            "preset": args.preset,
            "params": param_count(PRESETS[args.preset]),
            "dtype": args.dtype,
            "experts": args.experts,
            "seed": args.seed,
            "rescale": args.rescale,
            "runs": args.runs,
            "merge_runs": args.merge_runs,
            "switches": args.switches,
            "shard_size": args.shard_size,
            "input_shard": args.input_shard,
            "merge_config": config_dict(m, inp, ours=True),
            "tasks": tasks,
            "quick": args.quick,
        },
        "checks": {},
    }
    checks = result["checks"]
    try:
        # 1. merge + materialize every task (check runs, warm-up)
        r = b.run("merge", "chk", ours_cmd(cfg_path, art, args.shard_size), art, keep=True)
        if r.rc != 0:
            checks["merge"] = {"ok": False, "error": r.stderr_tail[-1500:]}
            return _finish(b, result)
        checks["merge"] = {"ok": True}
        # every task through the CLI (--quick: the first; the others through the API in the worker)
        cli_tasks = tasks[:1] if args.quick else tasks
        mats: dict[str, str] = {}
        for task in cli_tasks:
            out = work / "out" / f"mat-{task}"
            r = b.run("materialize", "chk", materialize_cmd(art, task, out), out, keep=True)
            if r.rc == 0:
                mats[task] = str(out)
            else:
                checks.setdefault("materialize_errors", {})[task] = r.stderr_tail[-1500:]
        api_mats = {t: str(work / "out" / f"mat-{t}") for t in tasks if t not in cli_tasks}
        # 2. check against the in-memory API; 3. switching (separate processes; --quick: one)
        task_a, task_b = tasks[0], tasks[1]
        params = {
            "base": inp.base,
            "models": inp.models,
            "dtype": args.dtype,
            "artifact": str(art),
            "tasks": tasks,
            "rescale": args.rescale,
            "materialized": mats,
            "cli_materialized": sorted(mats),
            "api_materialize": api_mats,
            "task_a": task_a,
            "task_b": task_b,
            "switches": args.switches,
        }
        if args.quick:
            res = run_worker(b, {**params, "parts": ["check", "switch"]})
        else:
            res = run_worker(b, {**params, "parts": ["check"]})
            res.update(run_worker(b, {**params, "api_materialize": {}, "parts": ["switch"]}))
        checks["reconstruction"], sw = res["check"], res["switch"]
        checks["switch"] = sw
        b.log(f"check: {'ok' if checks['reconstruction'].get('ok') else 'FAILED'}")
        b.log(f"switch: {'ok' if sw.get('ok') else 'FAILED'} ({sw.get('sequence', '')})")
        # 4. sizes
        result["sizes"] = sizes(art, inp)
        mats.update(api_mats)
        for d in mats.values():
            shutil.rmtree(d, ignore_errors=True)
        # 5. timed runs
        for i in range(args.merge_runs):
            out = work / "out" / "merge-timed"
            b.log(f"merge run {i + 1}/{args.merge_runs}")
            b.run("merge", "time", ours_cmd(cfg_path, out, args.shard_size), out)
        for i in range(args.runs):
            out = work / "out" / "mat-timed"
            b.log(f"materialize run {i + 1}/{args.runs}")
            b.run("materialize", "time", materialize_cmd(art, task_a, out), out)
        result["timing"] = {
            "merge": _timing(b, "merge", "time", "chk"),
            "materialize": _timing(b, "materialize", "time", "chk"),
            "materialize_task": task_a,
            "switch": {
                k: sw.get(k)
                for k in ("load_s", "first_apply_s", "switch_s", "sequence", "torch_threads", "process")
            },
            "switch_median_s": median(sw["switch_s"]) if sw.get("switch_s") else None,
        }
    finally:
        shutil.rmtree(work / "out", ignore_errors=True)
    return _finish(b, result)


def _finish(b: Bench, result: dict[str, Any]) -> dict[str, Any]:
    result["machine"] = machine_info(str(REPO))
    result["runs"] = b.runs
    checks = result["checks"]
    required = {"merge", "reconstruction", "switch"}
    result["ok"] = (
        required <= set(checks)
        and "materialize_errors" not in checks
        and all(checks[k].get("ok") for k in required)
    )
    return result


# ---------------------------------------------------------------------------------------------
# report


def _fmt(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def _mib(v: float | None) -> str:
    return "–" if v is None else f"{v / 2**20:.1f}"


def _ok(c: Mapping[str, Any] | None) -> str:
    if not c:
        return "not run"
    return "ok" if c.get("ok") else "**FAILED**"


def markdown(result: Mapping[str, Any]) -> str:
    mi, cfg, checks = result["machine"], result["config"], result["checks"]
    lines = [
        f"EMR artifact, preset `{cfg['preset']}` ({cfg['params'] / 1e6:.1f}M parameters), {cfg['dtype']}, "
        f"{cfg['experts']} experts + base, `rescale: {cfg['rescale']}`. Run {mi['date_utc']} on "
        f"{mi['cpu_model']} ({mi['cpu_affinity']} cores usable, "
        f"{mi['mem_total_bytes'] / 2**30:.0f} GiB RAM), "
        f"torch {mi['torch']} ({mi['torch_threads']} threads), weightmerge commit `{mi['commit'][:10]}`"
        + (" (+ uncommitted changes)" if mi.get("worktree_dirty") else "")
        + ".",
        "",
        "Command:",
        "",
        "```",
        result["command"],
        "```",
        "",
        "| check | result |",
        "|---|---|",
    ]
    rec = checks.get("reconstruction", {})
    lines.append(f"| `weightmerge merge` (emr) | {_ok(checks.get('merge'))} |")
    if rec.get("per_task"):
        n_el = sum(r["task_state_dict"].get("n_elements", 0) for r in rec["per_task"])
        n_diff = sum(r["task_state_dict"].get("n_diff", 0) for r in rec["per_task"])
        ref = "in-memory `merge_state_dicts(..., 'emr').task_state_dict(i)`"
        if rec.get("unified_rounded"):
            ref += " with the unified vector rounded to its stored dtype"
        lines.append(
            f"| `load_emr(ART).task_state_dict(task, base)` == {ref}, {len(rec['per_task'])} tasks "
            f"| {'ok' if all(r['task_state_dict']['ok'] for r in rec['per_task']) else '**FAILED**'}: "
            f"{n_diff} of {n_el} elements differ |"
        )
        mats = [r["materialized"] for r in rec["per_task"] if "materialized" in r]
        m_el = sum(m.get("n_elements", 0) for m in mats)
        m_diff = sum(m.get("n_diff", 0) for m in mats)
        n_cli = sum(m.get("via") == "cli" for m in mats)
        via = "all" if n_cli == len(mats) else f"{n_cli} of them; `EMRArtifact.materialize`: the others"
        lines.append(
            f"| `weightmerge emr materialize` (CLI: {via}) == the same, {len(mats)} tasks "
            f"| {'ok' if mats and all(m['ok'] for m in mats) else '**FAILED**'}: "
            f"{m_diff} of {m_el} elements differ |"
        )
        if rec.get("unified_rounded"):
            un = [r["vs_unrounded"] for r in rec["per_task"]]
            lines.append(
                f"| (information) rounded-unified reconstruction vs unrounded `task_state_dict(i)` "
                f"| {sum(u.get('n_diff', 0) for u in un)} elements differ, max "
                f"{max(u.get('max_abs', 0) for u in un):.3g} abs, "
                f"{max(u.get('max_ulp', 0) for u in un):.0f} ulp |"
            )
        lines.append(
            f"| tasks, rescalers, merged tensor names == in-memory; `verify()` (sha256 of every file) "
            f"| {_ok({'ok': rec['tasks']['ok'] and rec['rescalers']['ok'] and rec['merged_tensors']['ok']})}"
            f"; verify {_ok(rec['verify'])} |"
        )
    elif rec:
        lines.append(f"| reconstruction | **FAILED** ({str(rec.get('error', ''))[:300]}) |")
    sw = checks.get("switch", {})
    if sw.get("steps"):
        lines.append(
            f"| switching `{sw['sequence']}`: A -> B -> A == fresh materialization of A "
            f"| {'ok' if sw.get('aba_ok') else '**FAILED**'}; every step == materialization of its task: "
            f"{'ok' if sw.get('all_steps_ok') else '**FAILED**'} |"
        )
    elif sw:
        lines.append(f"| switching | **FAILED** ({str(sw.get('error', ''))[:300]}) |")
    if "materialize_errors" in checks:
        lines.append(f"| materialize | **FAILED** for {sorted(checks['materialize_errors'])} |")

    sz = result.get("sizes")
    if sz:
        n = cfg["experts"]
        k = sz["by_kind"]
        th = sz["theoretical"]
        mb = sz["mask_bits_per_param"]
        lines += [
            "",
            "| size on disk | bytes | MiB | |",
            "|---|---:|---:|---|",
            f"| unified task vector ({sz['n_unified_files']} file(s)) | {k['unified']:,} "
            f"| {_mib(k['unified'])} "
            f"| theoretical {th['unified_bytes']:,} |",
            f"| masks ({sz['n_mask_files']} files) | {k['masks']:,} | {_mib(k['masks'])} "
            f"| theoretical n·⌈numel/8⌉ = {th['masks_bytes']:,} |",
            f"| manifest | {k['manifest']:,} | {_mib(k['manifest'])} | |",
        ]
        if k["per_task"]:
            lines.append(f"| per-task tensors and configs | {k['per_task']:,} | {_mib(k['per_task'])} | |")
        lines += [
            f"| **artifact** | **{sz['core_bytes']:,}** | **{_mib(sz['core_bytes'])}** "
            f"| theoretical {th['total_bytes']:,}: overhead {sz['overhead_bytes']:,} B "
            f"({_fmt(100 * sz['overhead_rel'], '.4f', ' %')}) |",
            f"| other files in the directory (model card, config) | {sum(sz['other_files'].values()):,} "
            f"| {_mib(sum(sz['other_files'].values()))} | {', '.join(sz['other_files'])} |",
            f"| {n} full expert checkpoints (safetensors) | {sz['experts_weight_bytes']:,} "
            f"| {_mib(sz['experts_weight_bytes'])} "
            f"| artifact / experts = **{_fmt(sz['ratio_vs_experts'], '.4f')}** "
            f"(theoretical {_fmt(sz['theoretical_ratio_vs_experts'], '.4f')}) |",
            "",
            f"Bits per parameter per task: mask {min(mb):.4f}"
            + (f"–{max(mb):.4f}" if max(mb) != min(mb) else "")
            + f" (header included; {sz['merged_params']:,} merged of {sz['params']:,} parameters); "
            f"whole artifact amortized over the {n} tasks "
            f"{_fmt(sz['amortized_bits_per_param_per_task'], '.3f')} "
            f"vs {_fmt(sz['checkpoint_bits_per_param'], '.1f')} for a full checkpoint.",
        ]

    tm = result.get("timing")
    if tm:
        sw_t = tm["switch"]
        proc = sw_t.get("process") or {}

        def row(what: str, t: Mapping[str, Any]) -> str:
            src = "" if t["source"] == "time" else " (check runs)"
            return (
                f"| {what} | {t['n']}{src} | {_fmt(t['wall_s'])} | {_fmt(t['cpu_s'])} "
                f"| {_mib(t['maxrss_bytes'])} | {_mib(t['peak_anon_bytes'])} / {_mib(t['peak_file_bytes'])} "
                f"| {_fmt(min(t['load_before'], default=None), '.1f')}"
                f"–{_fmt(max(t['load_before'], default=None), '.1f')} |"
            )

        st = sw_t.get("switch_s") or []
        lines += [
            "",
            "| timing (fresh processes, medians) | runs | wall s | CPU s | peak RSS MiB "
            "| polled peak anon / file MiB | load before |",
            "|---|---:|---:|---:|---:|---:|---|",
            row("`weightmerge merge` -> artifact", tm["merge"]),
            row(f"`weightmerge emr materialize --task {tm['materialize_task']}`", tm["materialize"]),
            f"| switching process (`{proc.get('parts', 'switch')}` worker: imports, load, first apply, "
            f"switches, checks) | 1 | {_fmt(proc.get('wall_s'))} "
            f"| {_fmt(proc.get('cpu_s'))} | {_mib(proc.get('maxrss_bytes'))} | | |",
            "",
            "| in-place switching (in the switching process) | n | seconds |",
            "|---|---:|---:|",
            f"| `LlamaForCausalLM.from_pretrained(base)` | 1 | {_fmt(sw_t.get('load_s'))} |",
            "| first `artifact.apply(model, A)` (sha256 of the model's tensors and the files, "
            "copy of the base) "
            f"| 1 | {_fmt(sw_t.get('first_apply_s'))} |",
            f"| each further switch, median (min–max) | {len(st)} | {_fmt(tm.get('switch_median_s'), '.3f')} "
            f"({_fmt(min(st, default=None), '.3f')}–{_fmt(max(st, default=None), '.3f')}) |",
        ]
    lines += ["", f"Overall: {'all checks passed' if result.get('ok') else '**CHECKS FAILED**'}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER]:
        return worker_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny preset, 2 experts, no extra timed runs"
    )
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default 168m (--quick: tiny)")
    p.add_argument(
        "--dtype", default="float32", help="float32 (default) | bfloat16 | float16 (fp32, bf16 ok)"
    )
    p.add_argument("--experts", type=int, default=None, help="default 4 (--quick: 2)")
    p.add_argument("--seed", type=int, default=0, help="model generation seed")
    p.add_argument("--rescale", default="per_tensor_mean", choices=("per_tensor_mean", "global"))
    p.add_argument("--runs", type=int, default=None, help="timed materializations (default 3; --quick: 0)")
    p.add_argument("--merge-runs", type=int, default=None, help="timed merges (default: --runs)")
    p.add_argument("--switches", type=int, default=None, help="switches after the first apply (default 6)")
    p.add_argument("--shard-size", default="5GB", help="artifact shard size (default 5GB)")
    p.add_argument("--input-shard", default="1GB", help="input checkpoint shard size (default 1GB)")
    p.add_argument("--root", type=Path, default=default_root(), help="model cache root")
    p.add_argument("--work", type=Path, default=None, help="scratch dir for configs/outputs")
    p.add_argument("--max-load", type=float, default=None, help="wait for 1-min load below this")
    p.add_argument("--max-wait", type=float, default=120.0, help="longest wait for --max-load (s)")
    p.add_argument("--timeout", type=float, default=3600.0, help="per-run timeout (s)")
    p.add_argument("--json", type=Path, default=None, help="results file (default benchmarks/results/...)")
    p.add_argument("--report", type=Path, default=None, help="only render a results JSON (no runs)")
    args = p.parse_args(argv)
    if args.report is not None:
        print(markdown(json.loads(args.report.read_text())), end="")
        return 0
    args.dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    if args.dtype not in DTYPES:
        p.error(f"unknown dtype {args.dtype!r}; known: {sorted(DTYPES)}")
    args.preset = args.preset or ("tiny" if args.quick else "168m")
    args.experts = args.experts if args.experts is not None else (2 if args.quick else 4)
    args.runs = args.runs if args.runs is not None else (0 if args.quick else 3)
    args.merge_runs = args.merge_runs if args.merge_runs is not None else args.runs
    args.switches = args.switches if args.switches is not None else (2 if args.quick else 6)
    if args.experts < 2:
        p.error("--experts must be at least 2 (switching goes between two tasks)")
    if args.switches < 2:
        p.error("--switches must be at least 2 (A -> B -> A)")
    if min(args.runs, args.merge_runs) < 0:
        p.error("--runs and --merge-runs must be >= 0")
    command = shlex.join([".venv/bin/python", "benchmarks/bench_emr.py", *argv])
    result = run_bench(args, command)
    out_json = args.json or HERE / "results" / f"emr-{args.preset}-{args.dtype}-e{args.experts}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(markdown(result), end="")
    print(f"results: {out_json}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
