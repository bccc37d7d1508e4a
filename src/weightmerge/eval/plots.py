"""PNG plots of a report (matplotlib, no display needed: figures are rendered with the Agg canvas).

* ``normalized_held_in.png``: bar chart of the normalised held-in score per method (mean ± std);
* ``per_task_radar.png``: per-task test accuracy / expert accuracy of each method on a radar chart
  (the PCB paper's per-task radar, every axis scaled to its expert);
* ``experts_sweep.png``: normalised held-in score vs number of experts merged;
* ``held_out_vs_held_in.png``: normalised held-out vs normalised held-in score per method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

COLORS = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _rows_with(summary: Mapping[str, Any], key: str) -> list[str]:
    return [label for label in summary["order"] if summary["rows"][label].get(key) is not None]


def plot_normalized_bar(summary: Mapping[str, Any], path: Path, *, title: str) -> None:
    labels = _rows_with(summary, "normalized_avg")
    means = [summary["rows"][lb]["normalized_avg"]["mean"] for lb in labels]
    stds = [summary["rows"][lb]["normalized_avg"]["std"] for lb in labels]
    fig = _figure(max(6.0, 0.55 * len(labels) + 2.5), 4.6)
    ax = fig.add_subplot()
    colors = [
        "#444444" if lb == "individual" else "#bbbbbb" if lb == "base" else COLORS[i % len(COLORS)]
        for i, lb in enumerate(labels)
    ]
    bars = ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color=colors, edgecolor="black", lw=0.5)
    for b, m in zip(bars, means, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, m + 0.01, f"{m:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=9)
    ax.set_ylabel("normalised held-in score (merged / expert)")
    ax.set_ylim(0, max(1.1, max(m + s for m, s in zip(means, stds, strict=True)) + 0.08))
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def _radar_rows(summary: Mapping[str, Any], limit: int = 9) -> list[str]:
    labels = [lb for lb in summary["order"] if not lb.endswith("(tuned)") and lb != "base"]
    return labels[:limit]


def plot_radar(summary: Mapping[str, Any], tasks: Sequence[str], path: Path, *, title: str) -> None:
    """Per-task accuracy divided by the expert's (each axis scaled to its expert, as the PCB paper's
    radar charts scale each task's axis), so differences between methods stay visible."""
    from matplotlib.figure import Figure

    labels = _radar_rows(summary)
    n = len(tasks)
    angles = [2 * math.pi * i / n for i in range(n)]
    series = {}
    for lb in labels:
        per = summary["rows"][lb].get("normalized") or {}
        series[lb] = [per[t]["mean"] if per.get(t) else float("nan") for t in tasks]
    finite = [v for vals in series.values() for v in vals if v == v]
    lo = max(0.0, math.floor((min(finite, default=0.0) - 0.05) * 10) / 10)
    fig = Figure(figsize=(9.0, 6.6), dpi=110)
    fig.subplots_adjust(left=0.16, right=0.68, top=0.84, bottom=0.1)
    ax: Any = fig.add_subplot(projection="polar")  # a PolarAxes (typed as Axes by matplotlib)
    for i, lb in enumerate(labels):
        vals = series[lb]
        color = "#444444" if lb == "individual" else COLORS[i % len(COLORS)]
        style = "--" if lb == "individual" else "-"
        ax.plot(
            [*angles, angles[0]], [*vals, vals[0]], style, color=color, lw=1.6, label=lb, marker="o", ms=3
        )
    ax.set_xticks(angles, list(tasks), fontsize=8)
    ax.tick_params(axis="x", pad=14)
    ax.set_ylim(lo, 1.02)
    ticks = [round(lo + k * (1.0 - lo) / 4, 2) for k in range(5)]
    ax.set_yticks(ticks, [f"{t:.2f}" for t in ticks], fontsize=7)
    ax.set_rlabel_position(90 / max(n, 1))
    fig.suptitle(title, fontsize=11)
    fig.legend(loc="center left", bbox_to_anchor=(0.76, 0.5), fontsize=8, frameon=False)
    fig.savefig(path)


def plot_sweep(summary: Mapping[str, Any], path: Path, *, title: str) -> None:
    sweep = summary["sweep"]
    fig = _figure(6.6, 4.4)
    ax = fig.add_subplot()
    ks: set[int] = set()
    for i, (label, sizes) in enumerate(sweep.items()):
        pts = sorted((int(k), v) for k, v in sizes.items() if v is not None)
        if not pts:
            continue
        ks.update(k for k, _ in pts)
        xs = [k for k, _ in pts]
        ax.errorbar(
            xs,
            [v["mean"] for _, v in pts],
            yerr=[v["std"] for _, v in pts],
            marker="o",
            capsize=3,
            color=COLORS[i % len(COLORS)],
            label=label,
        )
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(sorted(ks))
    ax.set_xlabel("number of experts merged")
    ax.set_ylabel("normalised held-in score")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.savefig(path)


def plot_held_out_scatter(summary: Mapping[str, Any], path: Path, *, title: str) -> None:
    labels = [
        lb
        for lb in summary["order"]
        if summary["rows"][lb].get("normalized_avg") and summary["rows"][lb].get("held_out_normalized_avg")
    ]
    fig = _figure(6.6, 4.8)
    ax = fig.add_subplot()
    for i, lb in enumerate(labels):
        r = summary["rows"][lb]
        x, y = r["normalized_avg"], r["held_out_normalized_avg"]
        color = "#444444" if lb == "individual" else "#999999" if lb == "base" else COLORS[i % len(COLORS)]
        ax.errorbar(
            x["mean"],
            y["mean"],
            xerr=x["std"],
            yerr=y["std"],
            fmt="o",
            color=color,
            capsize=2,
            ms=6,
            label=lb,
        )
        ax.annotate(lb, (x["mean"], y["mean"]), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xlabel("normalised held-in score (merged / expert)")
    ax.set_ylabel("normalised held-out score (model / base)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    fig.savefig(path)


def write_plots(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write every plot the report has data for; returns the files written."""
    summary = report["summary"]
    cfg = report["manifest"]["config"]
    name = cfg["name"]
    n_seeds = len(report["manifest"]["seeds"])
    suffix = f" ({n_seeds} seed{'s' if n_seeds > 1 else ''})"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    p = out_dir / "normalized_held_in.png"
    plot_normalized_bar(summary, p, title=f"{name}: normalised held-in score{suffix}")
    written.append(p)
    if len(cfg["tasks"]) >= 3:
        p = out_dir / "per_task_radar.png"
        plot_radar(summary, cfg["tasks"], p, title=f"{name}: per-task accuracy / expert accuracy{suffix}")
        written.append(p)
    if summary["sweep"]:
        p = out_dir / "experts_sweep.png"
        plot_sweep(summary, p, title=f"{name}: held-in score vs experts merged{suffix}")
        written.append(p)
    if cfg["held_out"]:
        p = out_dir / "held_out_vs_held_in.png"
        plot_held_out_scatter(summary, p, title=f"{name}: held-out vs held-in{suffix}")
        written.append(p)
    return written
