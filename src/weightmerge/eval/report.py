"""Aggregating per-seed results (mean and spread) and writing the markdown report.

The report dict (written as ``report.json``) has three parts:

* ``manifest``: versions, machine, the resolved config and its hash, seeds, model fingerprint,
  command line, start/finish time and total seconds;
* ``per_seed``: every number of every seed (experts, reference rows, every method and grid point,
  the experts-count sweep, held-out references, timings);
* ``summary``: ``{"mean", "std", "n", "values"}`` over seeds for each row's averages and per-task
  accuracies, the sweep and the held-out references. ``std`` is the sample standard deviation
  (0 for a single value).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from weightmerge.eval.config import EvalConfig
from weightmerge.eval.tables import fmt, stat
from weightmerge.eval.tables import table as _table


def row_order(cfg: EvalConfig) -> list[str]:
    order = ["individual"]
    for entry in cfg.methods:
        order.append(entry.name)
        if entry.grid:
            order.append(f"{entry.name} (tuned)")
        if entry.search is not None:
            order.append(f"{entry.name} (search)")
    if cfg.multitask:
        order.append("multitask")
    order.append("base")
    return order


def _experts_of(label: str, n_tasks: int) -> int:
    """How many experts a row's score comes from: 1 for the experts themselves, 0 for the base,
    all the held-in tasks for a merge or the multitask model."""
    return {"individual": 1, "base": 0}.get(label, n_tasks)


def flat_rows(cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per score of a run: model (and its size), base, number of experts, method, seed,
    normalised held-in / held-out and mean accuracy. Merges of subsets of the experts (the
    ``n_experts`` axis) are records too (``subset`` names their tasks)."""
    out: list[dict[str, Any]] = []
    for cell in cells:
        common = {"model": cell["model"], "n_parameters": cell["n_parameters"], "base": cell["base"]}
        for s in cell["per_seed"]:
            n = len(s["experts"])
            for label, r in s["rows"].items():
                out.append(
                    {
                        **common,
                        "method": label,
                        "n_experts": _experts_of(label, n),
                        "seed": s["seed"],
                        "params": r.get("params"),
                        "normalized_held_in": r.get("normalized_avg"),
                        "avg_held_in": r.get("avg"),
                        "normalized_held_out": r.get("held_out_normalized_avg"),
                        "held_out": r.get("held_out"),
                    }
                )
            for label, sizes in s.get("sweep", {}).items():
                for k, runs in sizes.items():
                    if int(k) == n:
                        continue  # the full merge is the row above
                    for run in runs:
                        out.append(
                            {
                                **common,
                                "method": label,
                                "n_experts": int(k),
                                "seed": s["seed"],
                                "subset": run["tasks"],
                                "normalized_held_in": run["normalized_avg"],
                                "normalized_held_out": run.get("held_out_normalized_avg"),
                            }
                        )
    return out


def _per_task(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    tasks: list[str] = []
    for r in rows:
        for t in r.get(key, {}):
            if t not in tasks:
                tasks.append(t)
    return {t: stat([r.get(key, {}).get(t) for r in rows]) for t in tasks}


def aggregate(cfg: EvalConfig, per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for label in row_order(cfg):
        seeds = [s["rows"][label] for s in per_seed if label in s["rows"]]
        rows[label] = {
            "avg": stat([r["avg"] for r in seeds]),
            "normalized_avg": stat([r["normalized_avg"] for r in seeds]),
            "held_out_normalized_avg": stat([r.get("held_out_normalized_avg") for r in seeds]),
            "held_in": _per_task(seeds, "held_in"),
            "normalized": _per_task(seeds, "normalized"),
            "held_out": _per_task(seeds, "held_out"),
            "params": [r.get("params") for r in seeds],
        }
    sweep: dict[str, dict[str, Any]] = {}
    for entry in cfg.methods:
        sizes: dict[str, list[float | None]] = {}
        for s in per_seed:
            for k, runs in s["sweep"].get(entry.name, {}).items():
                sizes.setdefault(k, []).extend(r["normalized_avg"] for r in runs)
        if sizes:
            sweep[entry.name] = {k: stat(v) for k, v in sorted(sizes.items(), key=lambda kv: int(kv[0]))}
    refs: dict[str, Any] = {}
    for h in cfg.held_out:
        details = [s["held_out_references"][h] for s in per_seed]
        refs[h] = {
            "kind": details[0]["kind"],
            **({"head": details[0]["head"]} if "head" in details[0] else {}),
            **{
                k: stat([d.get(k) for d in details])
                for k in ("base", "base_with_expert_head", "expert")
                if k in details[0]
            },
        }
    experts = {
        t: {
            "val_accuracy": stat([s["experts"][t]["val_accuracy"] for s in per_seed]),
            "test_accuracy": stat([s["experts"][t]["test_accuracy"] for s in per_seed]),
            "train_seconds": stat([s["experts"][t]["train_seconds"] for s in per_seed]),
            "cached": [s["experts"][t]["cached"] for s in per_seed],
        }
        for t in cfg.tasks
    }
    return {
        "order": row_order(cfg),
        "rows": rows,
        "sweep": sweep,
        "held_out_references": refs,
        "experts": experts,
    }


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _fmt_params(params: Sequence[Any]) -> str:
    if all(p is None for p in params):
        return ""  # a reference row
    distinct: list[str] = []
    for p in params:
        text = ", ".join(f"{k}={v}" for k, v in sorted((p or {}).items())) or "defaults"
        distinct.append(text)
    if not distinct:
        return ""
    if len(set(distinct)) == 1:
        return distinct[0]
    return " / ".join(distinct)  # one per seed (tuned rows pick per seed)


def markdown(report: Mapping[str, Any]) -> str:
    man, summ = report["manifest"], report["summary"]
    cfg = man["config"]
    seeds = man["seeds"]
    tasks, held_out = cfg["tasks"], cfg["held_out"]
    out = [
        f"# weightmerge eval: {cfg['name']}",
        "",
        f"Model `{man['model']['name']}`; {len(tasks)} held-in tasks, {len(held_out)} held-out; "
        f"seeds {seeds} (mean ± sample std over seeds); sizes train/validation/test "
        f"{cfg['sizes']['train']}/{cfg['sizes']['validation']}/{cfg['sizes']['test']}; "
        f"config hash `{man['config_hash'][:12]}`; weightmerge {man['weightmerge']}, torch {man['torch']}, "
        f"transformers {man['transformers']}; {man['seconds']:.0f} s in all.",
        "",
        "## Held-in tasks",
        "",
        "Normalised held-in = merged test accuracy / the task's expert test accuracy, averaged over "
        "tasks; `(tuned)` rows pick the grid point with the best normalised validation score. "
        "Per-task columns: test accuracy (mean over seeds).",
        "",
    ]
    header = ["method", "params", "norm. held-in", "avg acc"]
    if held_out:
        header.append("norm. held-out")
    header += tasks
    body = []
    for label in summ["order"]:
        r = summ["rows"][label]
        line = [label, _fmt_params(r["params"]), fmt(r["normalized_avg"]), fmt(r["avg"])]
        if held_out:
            line.append(fmt(r["held_out_normalized_avg"]))
        line += [fmt(r["held_in"].get(t), spread=False) for t in tasks]
        body.append(line)
    out += _table(header, body)
    if held_out:
        out += [
            "",
            "## Held-out tasks",
            "",
            "Test accuracy. Normalised held-out = accuracy / the base reference (base body with a head "
            "fitted on frozen base features for the reused label space, or the few-shot probe on the "
            "base body), averaged over held-out tasks.",
            "",
        ]
        refs = summ["held_out_references"]
        ref_lines = []
        for h in held_out:
            ref = refs[h]
            if ref["kind"] == "reused_head":
                ref_lines.append(
                    f"- `{h}` reuses the head of `{ref['head']}`: base reference {fmt(ref['base'])}; "
                    f"base body + expert head {fmt(ref['base_with_expert_head'])}; expert "
                    f"`{ref['head']}` {fmt(ref['expert'])}"
                )
            else:
                ref_lines.append(f"- `{h}`: few-shot probe; base {fmt(ref['base'])}")
        out += [*ref_lines, ""]
        body = []
        for label in summ["order"]:
            r = summ["rows"][label]
            body.append(
                [label, fmt(r["held_out_normalized_avg"])] + [fmt(r["held_out"].get(h)) for h in held_out]
            )
        out += _table(["method", "norm. held-out", *held_out], body)
    if summ["sweep"]:
        sizes = sorted({int(k) for v in summ["sweep"].values() for k in v})
        out += [
            "",
            "## Number of experts merged",
            "",
            "Normalised held-in score of merges of k experts (seeded random subsets; mean ± std over "
            "seeds and subsets); default parameters of each entry.",
            "",
        ]
        body = [[label, *(fmt(v.get(str(k))) for k in sizes)] for label, v in summ["sweep"].items()]
        out += _table(["method", *(f"k={k}" for k in sizes)], body)
    pairs = paired_differences(report)
    if pairs:
        out += [
            "",
            "## Paired differences",
            "",
            "Normalised held-in of method A minus method B on the same experts, per seed; and over "
            "every (seed, task) pair: mean difference and how often A is ahead / level / behind.",
            "",
        ]
        body = [
            [f"{d['a']} − {d['b']}", ", ".join(f"{x:+.3f}" for x in d["per_seed"]), f"{d['mean']:+.3f}",
             f"{d['task_mean']:+.4f}", f"{d['ahead']} / {d['level']} / {d['behind']}"]
            for d in pairs
        ]  # fmt: skip
        out += _table(["A − B", "per seed", "mean", "per (seed, task) mean", "ahead / level / behind"], body)
    out += ["", "## Experts", ""]
    body = [
        [t, fmt(e["val_accuracy"]), fmt(e["test_accuracy"]), fmt(e["train_seconds"], digits=1)]
        for t, e in summ["experts"].items()
    ]
    out += _table(["task", "validation acc", "test acc", "train seconds"], body)
    cmd = man.get("command")
    if cmd:
        out += ["", "Command: `" + " ".join(cmd) + "`"]
    return "\n".join(out) + "\n"


ORDERING = ("emr", "pcb", "ties", "task_arithmetic", "average")


def paired_differences(report: Mapping[str, Any], order: Sequence[str] = ORDERING) -> list[dict[str, Any]]:
    """Paired differences of normalised held-in between consecutive rows of ``order`` that the
    run has (e.g. pcb − ties, ties − task_arithmetic, task_arithmetic − average), per seed and
    per (seed, task); the same experts make the pairs."""
    per_seed = report.get("per_seed", [])
    present = [m for m in order if per_seed and all(m in s["rows"] for s in per_seed)]
    out = []
    for a, b in itertools.pairwise(present):
        diffs = [s["rows"][a]["normalized_avg"] - s["rows"][b]["normalized_avg"] for s in per_seed]
        task_diffs = [
            s["rows"][a]["normalized"][t] - s["rows"][b]["normalized"][t]
            for s in per_seed
            for t in s["rows"][a]["normalized"]
            if s["rows"][a]["normalized"][t] is not None and s["rows"][b]["normalized"].get(t) is not None
        ]
        out.append(
            {
                "a": a,
                "b": b,
                "per_seed": diffs,
                "mean": sum(diffs) / len(diffs),
                "task_mean": sum(task_diffs) / len(task_diffs) if task_diffs else math.nan,
                "ahead": sum(d > 1e-12 for d in task_diffs),
                "level": sum(abs(d) <= 1e-12 for d in task_diffs),
                "behind": sum(d < -1e-12 for d in task_diffs),
            }
        )
    return out


def console_table(report: Mapping[str, Any]) -> str:
    """A compact fixed-width table for the terminal."""
    if "summary" not in report:
        from weightmerge.eval import study

        return study.console_table(report)
    summ = report["summary"]
    has_ho = bool(report["manifest"]["config"]["held_out"])
    head = f"{'method':<28} {'norm. held-in':>16} {'avg acc':>16}" + (
        f" {'norm. held-out':>16}" if has_ho else ""
    )
    lines = [head, "-" * len(head)]
    for label in summ["order"]:
        r = summ["rows"][label]
        line = f"{label:<28} {fmt(r['normalized_avg']):>16} {fmt(r['avg']):>16}"
        if has_ho:
            line += f" {fmt(r['held_out_normalized_avg']):>16}"
        lines.append(line)
    return "\n".join(lines)


def dumps(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


def write_outputs(report: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """report.json, report.md and the PNG plots under ``out_dir``; returns {kind: path}."""
    from weightmerge.eval.plots import write_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    _atomic_write(paths["json"], dumps(report))
    if "summary" in report:  # one (model, base) cell
        _atomic_write(paths["markdown"], markdown(report))
        plots = write_plots(report, out_dir)
    else:
        from weightmerge.eval import study

        _atomic_write(paths["markdown"], study.markdown(report))
        plots = study.write_plots(report, out_dir)
    for p in plots:
        paths[p.stem] = p
    return paths


def _atomic_write(path: Path, text: str) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
