"""Benchmark ``weightmerge merge`` against ``mergekit-yaml`` and against the I/O floor.

    .venv/bin/python benchmarks/bench_merge.py --preset 168m --dtype bfloat16 --experts 4 --runs 3 \\
        --flatness-preset 405m --write-doc

For every method (``--methods``), first correctness, then time:

1. *check* (also the warm-up: it brings the inputs into the page cache): one run of ours and, for
   methods mergekit has, one of ``mergekit-yaml`` on the same YAML (``dtype: float32`` so both
   compute in float32, ``out_dtype`` = the checkpoint dtype); outputs compared element by element
   (see bench_compare.py: bit-exact expected; mergekit ``ties`` differs only at threshold ties;
   ``dare_ties`` compared bit-exact at density 1 and statistically at the timed density). Methods
   mergekit lacks are compared with the in-memory ``merge_state_dicts`` (child process).
2. *time*: ``--runs`` rounds; in each, the I/O floor (benchmarks/io_floor.py), then for each
   method ours and mergekit back to back, alternating which goes first. Every run is a fresh
   process: wall clock from spawn to exit, CPU time and peak RSS (``ru_maxrss``) of that process.
   Medians are reported, with the load average around each run (the machine is shared).
3. optionally *flatness*: ours (and the floor) on a second preset with the same largest tensor
   (``--flatness-preset``), to show peak RSS does not grow with the model.

Results: JSON (``--json``, default benchmarks/results/) with every run and the machine; a markdown
report printed, and written into docs/benchmarks.md between the ``bench:begin``/``bench:end``
markers with ``--write-doc``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_compare import compare_dirs, dare_stats_dirs, reference_check  # noqa: E402
from bench_measure import RunResult, machine_info, median, run_measured  # noqa: E402
from make_models import DTYPE_ALIASES, PRESETS, Spec, default_root, make_models, param_count  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


@dataclass(frozen=True)
class Method:
    key: str  # row label
    merge_method: str
    params: Mapping[str, Any] = field(default_factory=dict)  # global `parameters`
    model_params: Mapping[str, Any] = field(default_factory=dict)  # every model's `parameters`
    uses_base: bool = True
    mergekit: bool = False  # mergekit 0.1.5 has it with the same semantics
    random: bool = False  # seeded draws (compared statistically with mergekit)
    target_vs_mergekit: float | None = None  # wall-time ratio ours/mergekit to reach
    target_vs_ta: float | None = None  # wall-time ratio ours/task_arithmetic to reach


METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method(
            "linear",
            "linear",
            {"normalize": True},
            {"weight": 1.0},
            uses_base=False,
            mergekit=True,
            target_vs_mergekit=0.5,
        ),
        Method(
            "task_arithmetic",
            "task_arithmetic",
            {"lambda": 0.4},
            {"weight": 1.0},
            mergekit=True,
            target_vs_mergekit=0.5,
        ),
        Method("ties", "ties", {}, {"weight": 1.0, "density": 0.2}, mergekit=True, target_vs_mergekit=0.2),
        Method(
            "dare_ties",
            "dare_ties",
            {},
            {"weight": 1.0, "density": 0.2},
            mergekit=True,
            random=True,
            target_vs_mergekit=0.5,
        ),
        Method(
            "ties_global",
            "ties",
            {"variant": "paper", "scope": "global", "density": 0.2, "lambda": 1.0},
            target_vs_ta=3.0,
        ),
        Method(
            "pcb",
            "pcb",
            {"keep_ratio": 0.1, "clamp_ratio": 0.01, "lambda": 1.0, "inter": "A", "scope": "global"},
            target_vs_ta=3.0,
        ),
        Method("emr", "emr", {}, target_vs_ta=3.0),
    )
}
DEFAULT_METHODS = list(METHODS)
FLOOR_TARGET = 3.0  # every method within 3x the I/O floor
RSS_TARGET = 0.5  # peak RSS <= 1/2 of mergekit's
SEED = 0


# ---------------------------------------------------------------------------------------------
# configs and commands


@dataclass(frozen=True)
class Inputs:
    root: Path  # the spec directory
    dtype: str
    experts: int

    @property
    def base(self) -> str:
        return str(self.root / "base")

    @property
    def models(self) -> list[str]:
        return [str(self.root / f"expert_{e}") for e in range(1, self.experts + 1)]


def config_dict(m: Method, inp: Inputs, *, ours: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {"merge_method": m.merge_method}
    if m.uses_base:
        cfg["base_model"] = inp.base
    cfg["models"] = [
        {"model": p, **({"parameters": dict(m.model_params)} if m.model_params else {})} for p in inp.models
    ]
    if m.params:
        cfg["parameters"] = dict(m.params)
    cfg["dtype"] = "float32"
    cfg["out_dtype"] = inp.dtype
    if ours and m.random:
        cfg["seed"] = SEED
    return cfg


def write_yaml(path: Path, cfg: Mapping[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
    return path


def venv_bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def ours_cmd(cfg: Path, out: Path, shard_size: str, extra: Sequence[str] = ()) -> list[str]:
    return [
        venv_bin("weightmerge"),
        "merge",
        str(cfg),
        str(out),
        "--quiet",
        "--no-copy-tokenizer",
        "--shard-size",
        shard_size,
        *extra,
    ]


def mergekit_cmd(cfg: Path, out: Path, shard_bytes: int, random: bool) -> list[str]:
    cmd = [
        venv_bin("mergekit-yaml"),
        str(cfg),
        str(out),
        "--no-copy-tokenizer",
        "--quiet",
        "--out-shard-size",
        str(shard_bytes),  # mergekit counts bytes here despite its help text
    ]
    return cmd + (["--random-seed", str(SEED)] if random else [])


def floor_cmd(out: Path, inp: Inputs, m_uses_base: bool, shard_size: str) -> list[str]:
    inputs = ([inp.base] if m_uses_base else []) + inp.models
    return [sys.executable, str(HERE / "io_floor.py"), str(out), *inputs, "--shard-size", shard_size]


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1000, "M": 1000**2, "G": 1000**3}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


# ---------------------------------------------------------------------------------------------
# running


class Bench:
    def __init__(self, args: argparse.Namespace, inp: Inputs, work: Path) -> None:
        self.args = args
        self.inp = inp
        self.work = work
        self.runs: list[dict[str, Any]] = []
        self.log_lines: list[str] = []

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        self.log_lines.append(line)
        print(line, file=sys.stderr, flush=True)

    def wait_quiet(self) -> None:
        limit = self.args.max_load
        if limit is None:
            return
        t0 = time.time()
        while os.getloadavg()[0] > limit and time.time() - t0 < self.args.max_wait:
            time.sleep(5)

    def run(self, label: str, tool: str, cmd: list[str], out: Path, *, keep: bool = False) -> RunResult:
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.wait_quiet()
        r = run_measured(cmd, timeout_s=self.args.timeout)
        rec = {"label": label, "tool": tool, **r.as_dict()}
        self.runs.append(rec)
        self.log(
            f"{label:>16s} {tool:9s} rc={r.rc} wall {r.wall_s:7.2f} s  cpu {r.cpu_s:7.2f} s  "
            f"rss {r.maxrss_bytes / 2**20:7.0f} MiB  load {r.load_before[0]:.2f}"
        )
        if r.rc != 0:
            self.log(f"  FAILED: {shlex.join(cmd)}\n{r.stderr_tail}")
        if not keep and out.exists():
            shutil.rmtree(out)
        return r


def check_method(b: Bench, m: Method) -> dict[str, Any]:
    """Correctness of one method (doubles as the warm-up run)."""
    inp = b.inp
    cfg_ours = write_yaml(b.work / "cfg" / f"{m.key}.yaml", config_dict(m, inp, ours=True))
    out_ours = b.work / "out" / f"{m.key}-ours"
    shard = b.args.shard_size
    r = b.run(m.key, "ours-chk", ours_cmd(cfg_ours, out_ours, shard), out_ours, keep=True)
    res: dict[str, Any] = {"reference": None, "ok": False}
    if r.rc != 0:
        res["error"] = "weightmerge failed: " + r.stderr_tail[-500:]
        return res
    try:
        if m.mergekit and not b.args.no_mergekit:
            res.update(_check_vs_mergekit(b, m, out_ours))
        else:
            res["reference"] = "merge_state_dicts (in memory)"
            params = {**m.params, **m.model_params}
            ref = _in_child(
                reference_check,
                method=m.merge_method,
                params=params,
                seed=SEED,
                base_dir=inp.base if m.uses_base else None,
                model_dirs=inp.models,
                out_dir=str(out_ours),
            )
            res.update(ref)
    except Exception as err:  # a check that crashes is a failed check, recorded
        res["ok"] = False
        res["error"] = f"{type(err).__name__}: {err}"
    finally:
        shutil.rmtree(out_ours, ignore_errors=True)
    b.log(f"{m.key:>16s} check: {_check_summary(res)}")
    return res


def _in_child(fn: Any, **kw: Any) -> Any:
    """Run ``fn(**kw)`` in a fresh spawned process (its memory is returned when it exits)."""
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, **kw).result()


def _check_vs_mergekit(b: Bench, m: Method, out_ours: Path) -> dict[str, Any]:
    inp = b.inp
    shard_bytes = parse_size(b.args.shard_size)
    cfg_mk = write_yaml(b.work / "cfg" / f"{m.key}.mergekit.yaml", config_dict(m, inp, ours=False))
    out_mk = b.work / "out" / f"{m.key}-mergekit"
    r = b.run(m.key, "mk-chk", mergekit_cmd(cfg_mk, out_mk, shard_bytes, m.random), out_mk, keep=True)
    if r.rc != 0:
        return {"reference": "mergekit", "ok": False, "error": "mergekit failed: " + r.stderr_tail[-500:]}
    res: dict[str, Any] = {"reference": "mergekit 0.1.5"}
    try:
        if m.random:
            st = _in_child(dare_stats_dirs, ours_dir=str(out_ours), ref_dir=str(out_mk), base_dir=inp.base)
            res["stats_at_timed_density"] = st
            applicable = st["numel"] > 0
            stats_ok = not applicable or (st["changed_rel"] < 0.01 and st["l1_rel"] < 0.01)
            st["applicable"] = applicable  # no tensor large enough for statistics (tiny presets)
            # bit-exact at density 1 (no drops): the rest of the method
            m1 = replace(m, key=m.key + "_d1", model_params={**m.model_params, "density": 1.0})
            c_ours = write_yaml(b.work / "cfg" / f"{m1.key}.yaml", config_dict(m1, inp, ours=True))
            c_mk = write_yaml(b.work / "cfg" / f"{m1.key}.mergekit.yaml", config_dict(m1, inp, ours=False))
            o1, k1 = b.work / "out" / f"{m1.key}-ours", b.work / "out" / f"{m1.key}-mergekit"
            r1 = b.run(m1.key, "ours-chk", ours_cmd(c_ours, o1, b.args.shard_size), o1, keep=True)
            r2 = b.run(m1.key, "mk-chk", mergekit_cmd(c_mk, k1, shard_bytes, True), k1, keep=True)
            if r1.rc != 0 or r2.rc != 0:
                return {**res, "ok": False, "error": "density-1 run failed"}
            exact = _in_child(compare_dirs, ours_dir=str(o1), ref_dir=str(k1))
            shutil.rmtree(o1, ignore_errors=True)
            shutil.rmtree(k1, ignore_errors=True)
            res["exact_at_density_1"] = exact
            res.update({k: exact.get(k) for k in ("n_elements", "n_diff", "max_abs", "max_ulp")})
            res["ok"] = bool(stats_ok and exact.get("n_diff", 1) == 0)
            return res
        tie_density = None
        if m.merge_method == "ties" and m.params.get("variant", "mergekit") == "mergekit":
            tie_density = float(m.model_params.get("density", 1.0))
        cmp = _in_child(
            compare_dirs,
            ours_dir=str(out_ours),
            ref_dir=str(out_mk),
            base_dir=inp.base,
            expert_dirs=inp.models,
            tie_density=tie_density,
        )
        res.update(cmp)
        if "error" in cmp:
            res["ok"] = False
        elif tie_density is not None:
            res["ok"] = cmp.get("unexplained", 1) == 0
        else:
            res["ok"] = cmp["n_diff"] == 0
        return res
    finally:
        shutil.rmtree(out_mk, ignore_errors=True)


def _check_summary(res: Mapping[str, Any]) -> str:
    if "error" in res and "n_diff" not in res:
        return f"FAILED ({res['error'][:200]})"
    s = "ok" if res.get("ok") else "FAILED"
    s += f" vs {res.get('reference')}: {res.get('n_diff', '?')} of {res.get('n_elements', '?')}"
    s += " elements differ"
    if res.get("n_diff"):
        s += f" (max {res.get('max_abs', 0):.3g} abs, {res.get('max_ulp', 0):.0f} ulp)"
    if "unexplained" in res:
        s += f"; not at a threshold tie: {int(res['unexplained'])}"
    if "stats_at_timed_density" in res:
        st = res["stats_at_timed_density"]
        s += f"; at the timed density: changed-entries rel. diff {st['changed_rel']:.2e}, "
        s += f"L1 rel. diff {st['l1_rel']:.2e} (exact at density 1)"
    if "error" in res:
        s += f" [{res['error'][:200]}]"
    return s


def time_rounds(b: Bench, methods: Sequence[Method], runs: int) -> None:
    inp, shard = b.inp, b.args.shard_size
    shard_bytes = parse_size(shard)
    for r in range(runs):
        b.log(f"round {r + 1}/{runs}")
        out = b.work / "out" / "floor"
        b.run("io_floor", "floor", floor_cmd(out, inp, True, shard), out)
        for k, m in enumerate(methods):
            cfg = b.work / "cfg" / f"{m.key}.yaml"
            o_ours = b.work / "out" / f"{m.key}-ours"
            jobs = [("ours", ours_cmd(cfg, o_ours, shard), o_ours)]
            if m.mergekit and not b.args.no_mergekit:
                cmk = b.work / "cfg" / f"{m.key}.mergekit.yaml"
                o_mk = b.work / "out" / f"{m.key}-mk"
                jobs.append(("mergekit", mergekit_cmd(cmk, o_mk, shard_bytes, m.random), o_mk))
            if (r + k) % 2:
                jobs.reverse()
            for tool, cmd, out in jobs:
                b.run(m.key, tool, cmd, out)


# ---------------------------------------------------------------------------------------------
# summary


def _med(runs: Sequence[Mapping[str, Any]], label: str, tool: str, key: str) -> float | None:
    vals = [r[key] for r in runs if r["label"] == label and r["tool"] == tool and r["rc"] == 0]
    return median(vals) if vals else None


def summarize(
    runs: Sequence[Mapping[str, Any]], methods: Sequence[Method], checks: Mapping[str, Any]
) -> dict[str, Any]:
    floor = _med(runs, "io_floor", "floor", "wall_s")
    ta = _med(runs, "task_arithmetic", "ours", "wall_s")
    rows = []
    for m in methods:
        row: dict[str, Any] = {"method": m.key}
        for tool in ("ours", "mergekit"):
            for key in ("wall_s", "cpu_s", "maxrss_bytes", "peak_anon_bytes", "peak_file_bytes"):
                row[f"{tool}_{key}"] = _med(runs, m.key, tool, key)
            row[f"{tool}_n"] = sum(
                1 for r in runs if r["label"] == m.key and r["tool"] == tool and r["rc"] == 0
            )
        ow, mw = row["ours_wall_s"], row["mergekit_wall_s"]
        orss, mrss = row["ours_maxrss_bytes"], row["mergekit_maxrss_bytes"]
        row["wall_ratio"] = ow / mw if ow and mw else None
        row["rss_ratio"] = orss / mrss if orss and mrss else None
        oc, mc = row["ours_cpu_s"], row["mergekit_cpu_s"]
        row["cpu_ratio"] = oc / mc if oc and mc else None
        row["floor_ratio"] = ow / floor if ow and floor else None
        row["ta_ratio"] = ow / ta if ow and ta and m.key != "task_arithmetic" else None
        targets: dict[str, Any] = {}
        if m.target_vs_mergekit is not None and row["wall_ratio"] is not None:
            targets[f"wall <= {m.target_vs_mergekit:g} x mergekit"] = (
                row["wall_ratio"] <= m.target_vs_mergekit
            )
        if row["rss_ratio"] is not None:
            targets[f"rss <= {RSS_TARGET:g} x mergekit"] = row["rss_ratio"] <= RSS_TARGET
        if m.target_vs_ta is not None and row["ta_ratio"] is not None:
            targets[f"wall <= {m.target_vs_ta:g} x task_arithmetic"] = row["ta_ratio"] <= m.target_vs_ta
        if row["floor_ratio"] is not None:
            targets[f"wall <= {FLOOR_TARGET:g} x io floor"] = row["floor_ratio"] <= FLOOR_TARGET
        row["targets"] = targets
        row["check"] = checks.get(m.key, {})
        rows.append(row)
    return {
        "floor_wall_s": floor,
        "floor_cpu_s": _med(runs, "io_floor", "floor", "cpu_s"),
        "floor_maxrss_bytes": _med(runs, "io_floor", "floor", "maxrss_bytes"),
        "rows": rows,
    }


def _fmt(v: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def _mib(v: float | None) -> str:
    return "–" if v is None else f"{v / 2**20:.0f}"


def markdown(result: Mapping[str, Any]) -> str:
    mi, s, cfg = result["machine"], result["summary"], result["config"]
    loads = [r["load_before"][0] for r in result["runs"] if r["tool"] in ("ours", "mergekit", "floor")]
    lines = [
        f"Run {mi['date_utc']} on {mi['cpu_model']} ({mi['cpu_affinity']} cores usable, "
        f"{mi['mem_total_bytes'] / 2**30:.0f} GiB RAM), torch {mi['torch']} ({mi['torch_threads']} threads), "
        f"mergekit {mi['mergekit']}, weightmerge commit `{mi['commit'][:10]}`"
        + (" (+ uncommitted changes)" if mi.get("worktree_dirty") else "")
        + ".",
        "",
        f"Inputs: preset `{cfg['preset']}` ({cfg['params'] / 1e6:.0f}M parameters), {cfg['dtype']}, "
        f"{cfg['experts']} experts + base, shards of {cfg['input_shard']}; output shard size "
        f"{cfg['shard_size']}. {cfg['runs']} timed runs per cell, median shown; load average (1 min) "
        f"before the timed runs: {min(loads, default=0):.1f} to {max(loads, default=0):.1f} "
        "(shared machine).",
        "",
        "Command:",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"I/O floor (read every input tensor, write one output, same process start-up): "
        f"**{_fmt(s['floor_wall_s'], '.1f', ' s')}** wall, {_fmt(s.get('floor_cpu_s'), '.1f', ' s')} CPU, "
        f"peak RSS {_mib(s['floor_maxrss_bytes'])} MiB.",
        "",
        "| method | check | ours wall s | mergekit wall s | ours / mergekit | ours / floor | ours / TA "
        "| ours CPU s | mergekit CPU s | CPU ratio | ours peak RSS MiB | mergekit peak RSS MiB | RSS ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in s["rows"]:
        chk = row["check"]
        if not chk:
            c = "not run"
        elif chk.get("ok"):
            c = f"ok: {chk.get('n_diff', 0)} diff"
            if chk.get("n_diff"):
                why = (
                    "all at threshold ties"
                    if "unexplained" in chk
                    else f"max {chk.get('max_ulp', 0):.0f} ulp"
                )
                c += f" ({why})"
            if "stats_at_timed_density" in chk:
                c = "ok: exact at density 1, stats at 0.2"
            c += " vs " + ("mergekit" if "mergekit" in str(chk.get("reference")) else "in-memory")
        else:
            c = "**FAILED**"
        lines.append(
            f"| {row['method']} | {c} | {_fmt(row['ours_wall_s'])} | {_fmt(row['mergekit_wall_s'])} "
            f"| {_fmt(row['wall_ratio'], '.2f')} | {_fmt(row['floor_ratio'], '.2f')} "
            f"| {_fmt(row['ta_ratio'], '.2f')} | {_fmt(row['ours_cpu_s'])} | {_fmt(row['mergekit_cpu_s'])} "
            f"| {_fmt(row['cpu_ratio'], '.2f')} "
            f"| {_mib(row['ours_maxrss_bytes'])} | {_mib(row['mergekit_maxrss_bytes'])} "
            f"| {_fmt(row['rss_ratio'], '.2f')} |"
        )
    lines += ["", "Targets:", ""]
    for row in s["rows"]:
        for name, ok in row["targets"].items():
            lines.append(f"- {row['method']}: {name}: {'met' if ok else '**not met**'}")
    fl = result.get("flatness")
    if fl:
        lines += [
            "",
            f"Memory flatness (ours, same largest tensor): `{fl['small']['preset']}` "
            f"({fl['small']['params'] / 1e6:.0f}M) vs `{fl['large']['preset']}` "
            f"({fl['large']['params'] / 1e6:.0f}M):",
            "",
            "| method | small wall s | large wall s | small peak RSS MiB | large peak RSS MiB | RSS growth |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in fl["rows"]:
            growth = r["large_rss"] / r["small_rss"] if r["small_rss"] and r["large_rss"] else None
            lines.append(
                f"| {r['method']} | {_fmt(r['small_wall'])} | {_fmt(r['large_wall'])} "
                f"| {_mib(r['small_rss'])} | {_mib(r['large_rss'])} | {_fmt(growth, '.2f', 'x')} |"
            )
    return "\n".join(lines) + "\n"


def write_doc(md: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _old, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{md}{END}{tail}")


# ---------------------------------------------------------------------------------------------


def flatness(
    b: Bench, args: argparse.Namespace, methods: Sequence[Method], small: dict[str, Any]
) -> dict[str, Any]:
    spec = Spec(args.flatness_preset, b.inp.dtype, args.experts, args.seed, parse_size(args.input_shard))
    root = make_models(spec, args.root)
    big = Inputs(root, b.inp.dtype, args.experts)
    fb = Bench(args, big, b.work / "flat")
    rows = []
    for m in methods:
        cfg = write_yaml(fb.work / "cfg" / f"{m.key}.yaml", config_dict(m, big, ours=True))
        for _ in range(args.flatness_runs):
            fb.run(
                m.key,
                "ours",
                ours_cmd(cfg, fb.work / "out" / m.key, args.shard_size),
                fb.work / "out" / m.key,
            )
        rows.append(
            {
                "method": m.key,
                "small_wall": _med(small["runs"], m.key, "ours", "wall_s"),
                "small_rss": _med(small["runs"], m.key, "ours", "maxrss_bytes"),
                "large_wall": _med(fb.runs, m.key, "ours", "wall_s"),
                "large_rss": _med(fb.runs, m.key, "ours", "maxrss_bytes"),
            }
        )
    b.log_lines += fb.log_lines
    return {
        "small": {"preset": args.preset, "params": param_count(PRESETS[args.preset])},
        "large": {"preset": args.flatness_preset, "params": param_count(PRESETS[args.flatness_preset])},
        "rows": rows,
        "runs": fb.runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="168m", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="model generation seed")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {list(METHODS)}")
    p.add_argument("--runs", type=int, default=3, help="timed runs per cell (median reported)")
    p.add_argument("--shard-size", default="2GB", help="output shard size, both tools (default 2GB)")
    p.add_argument("--input-shard", default="1GB", help="input checkpoint shard size (default 1GB)")
    p.add_argument("--root", type=Path, default=default_root(), help="model cache root")
    p.add_argument("--work", type=Path, default=None, help="scratch dir for configs/outputs")
    p.add_argument("--no-mergekit", action="store_true", help="skip mergekit (checks vs in-memory)")
    p.add_argument("--skip-check", action="store_true", help="time without checking (not for reports)")
    p.add_argument("--flatness-preset", default=None, help="second preset, same largest tensor (405m)")
    p.add_argument("--flatness-methods", default="task_arithmetic,ties")
    p.add_argument("--flatness-runs", type=int, default=1)
    p.add_argument("--max-load", type=float, default=None, help="wait for 1-min load below this")
    p.add_argument("--max-wait", type=float, default=120.0, help="longest wait for --max-load (s)")
    p.add_argument("--timeout", type=float, default=3600.0, help="per-run timeout (s)")
    p.add_argument("--json", type=Path, default=None, help="results file (default benchmarks/results/...)")
    p.add_argument("--write-doc", action="store_true", help=f"write the report into {DOC.relative_to(REPO)}")
    p.add_argument("--report", type=Path, default=None, help="only render a results JSON (no runs)")
    args = p.parse_args(argv)
    if args.report is not None:
        md = markdown(json.loads(args.report.read_text()))
        print(md)
        if args.write_doc:
            write_doc(md)
        return 0
    args.dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    methods = [METHODS[k] for k in keys]
    if any(m.target_vs_ta for m in methods) and "task_arithmetic" not in keys:
        print("note: task_arithmetic not in --methods: no ratios against it", file=sys.stderr)

    spec = Spec(args.preset, args.dtype, args.experts, args.seed, parse_size(args.input_shard))
    root = make_models(spec, args.root)
    inp = Inputs(root, args.dtype, args.experts)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"weightmerge-bench-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    b = Bench(args, inp, work)
    command = shlex.join(
        [".venv/bin/python", "benchmarks/bench_merge.py", *(argv if argv is not None else sys.argv[1:])]
    )
    b.log(f"inputs {root}; work {work}")

    checks: dict[str, Any] = {}
    try:
        for m in methods:
            if args.skip_check:
                write_yaml(work / "cfg" / f"{m.key}.yaml", config_dict(m, inp, ours=True))
                if m.mergekit:
                    write_yaml(work / "cfg" / f"{m.key}.mergekit.yaml", config_dict(m, inp, ours=False))
                continue
            checks[m.key] = check_method(b, m)
            if m.mergekit and not args.no_mergekit and not (work / "cfg" / f"{m.key}.mergekit.yaml").exists():
                write_yaml(work / "cfg" / f"{m.key}.mergekit.yaml", config_dict(m, inp, ours=False))
        time_rounds(b, methods, args.runs)
        timed = [r for r in b.runs if r["tool"] in ("ours", "mergekit", "floor")]
        result: dict[str, Any] = {
            "command": command,
            "machine": machine_info(str(REPO)),
            "config": {
                "preset": args.preset,
                "params": param_count(PRESETS[args.preset]),
                "dtype": args.dtype,
                "experts": args.experts,
                "runs": args.runs,
                "shard_size": args.shard_size,
                "input_shard": args.input_shard,
                "methods": {m.key: config_dict(m, inp, ours=True) for m in methods},
            },
            "checks": checks,
            "summary": summarize(timed, methods, checks),
            "runs": b.runs,
        }
        if args.flatness_preset:
            fm = [METHODS[k.strip()] for k in args.flatness_methods.split(",") if k.strip()]
            result["flatness"] = flatness(b, args, fm, {"runs": timed})
    finally:
        shutil.rmtree(work / "out", ignore_errors=True)
    out_json = args.json or (
        HERE / "results" / f"{args.preset}-{args.dtype}-e{args.experts}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = markdown(result)
    print(md)
    b.log(f"results: {out_json}")
    if args.write_doc:
        write_doc(md)
        b.log(f"wrote {DOC}")
    failed = [k for k, c in checks.items() if not c.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
