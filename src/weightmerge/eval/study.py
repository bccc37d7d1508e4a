"""The report of a scale study: several models (the size axis) x several bases, each cell a full
benchmark run (``weightmerge.eval.runner.run_eval`` with ``models``/``bases``).

Tables (markdown) and figures (PNG) after "What Matters for Model Merging at Scale":

* normalised held-in and held-out score per method against model size, one panel per base
  (``scale_held_in.png``, ``scale_held_out.png``);
* normalised held-in score against the number of merged experts, one panel per base, one line per
  method, for each model (``scale_experts.png``);
* held-out: merges against the multitask model and the base (``scale_multitask.png``);
* ``findings``: the paper's findings checked on this run's numbers (each a sentence with the
  numbers it rests on, true or false).

Every statistic is the mean (± sample std) over seeds of a cell's per-seed average.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from weightmerge.eval.tables import fmt, stat
from weightmerge.eval.tables import table as _table

MERGE_EXCLUDE = ("individual", "base", "multitask")


def _cells(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(report["cells"])


def models_of(report: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(model, parameters) in order of size."""
    seen: dict[str, int] = {}
    for c in _cells(report):
        seen.setdefault(c["model"], int(c["n_parameters"]))
    return sorted(seen.items(), key=lambda kv: kv[1])


def bases_of(report: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for c in _cells(report):
        if c["base"] not in out:
            out.append(c["base"])
    return out


def cell(report: Mapping[str, Any], model: str, base: str) -> Mapping[str, Any] | None:
    return next((c for c in _cells(report) if c["model"] == model and c["base"] == base), None)


def methods_of(report: Mapping[str, Any], *, merges_only: bool = False) -> list[str]:
    order = _cells(report)[0]["summary"]["order"]
    return [m for m in order if not (merges_only and m in MERGE_EXCLUDE)]


def swept_methods(report: Mapping[str, Any]) -> list[str]:
    """Merge rows that have an experts-count sweep (the entries' default points)."""
    have = {m for c in _cells(report) for m in c["summary"]["sweep"]}
    return [m for m in methods_of(report, merges_only=True) if m in have]


def _value(report: Mapping[str, Any], model: str, base: str, method: str, key: str) -> dict[str, Any] | None:
    """Mean/std over seeds of ``key`` (normalized_avg, held_out_normalized_avg, avg) of one row."""
    c = cell(report, model, base)
    if c is None or method not in c["summary"]["rows"]:
        return None
    s: dict[str, Any] | None = c["summary"]["rows"][method].get(key)
    return s


value = _value


def sweep_value(
    report: Mapping[str, Any], model: str, base: str, method: str, k: int
) -> dict[str, Any] | None:
    c = cell(report, model, base)
    if c is None:
        return None
    s: dict[str, Any] | None = c["summary"]["sweep"].get(method, {}).get(str(k))
    return s


def _mean(s: Mapping[str, Any] | None) -> float | None:
    return None if s is None else float(s["mean"])


# ---------------------------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------------------------


LEARNT_MARGIN = 0.05


def unlearnt_cells(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(model, base) cells whose experts did not learn: their mean test accuracy is within
    ``LEARNT_MARGIN`` of the base body's with the experts' heads. A normalised score there divides
    by chance-level accuracy and says nothing, so the findings leave such cells out."""
    out = []
    for c in _cells(report):
        ind = c["summary"]["rows"].get("individual", {}).get("avg")
        base = c["summary"]["rows"].get("base", {}).get("avg")
        if ind is not None and base is not None and ind["mean"] <= base["mean"] + LEARNT_MARGIN:
            out.append((c["model"], c["base"]))
    return out


def findings(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The paper's main findings, each checked on this run: {"finding", "holds", "evidence"}.
    Cells whose experts did not learn (`unlearnt_cells`) are left out."""
    models = [m for m, _ in models_of(report)]
    bases = bases_of(report)
    merges = methods_of(report, merges_only=True)
    out: list[dict[str, Any]] = []
    skip = set(unlearnt_cells(report))

    def value(
        report: Mapping[str, Any], model: str, base: str, method: str, key: str
    ) -> dict[str, Any] | None:
        return None if (model, base) in skip else _value(report, model, base, method, key)

    def add(text: str, pairs: list[tuple[str, float, float]], *, better: str = "higher") -> None:
        if not pairs:
            return
        wins = sum(1 for _, a, b in pairs if (a > b if better == "higher" else a < b))
        ev = "; ".join(f"{lab}: {a:.3f} vs {b:.3f}" for lab, a, b in pairs)
        out.append(
            {"finding": text, "holds": wins > len(pairs) / 2, "wins": wins, "of": len(pairs), "evidence": ev}
        )

    # 1. stronger base -> better merging (held-in)
    if "multitask" in bases and "pretrained" in bases:
        pairs = []
        for m in models:
            for meth in merges:
                a = _mean(value(report, m, "multitask", meth, "normalized_avg"))
                b = _mean(value(report, m, "pretrained", meth, "normalized_avg"))
                if a is not None and b is not None:
                    pairs.append((f"{m} {meth}", a, b))
        add("Merging works better from the stronger (multitask-tuned) base than from the pretrained one "
            "(normalised held-in, multitask base vs pretrained base)", pairs)  # fmt: skip
    if "random" in bases and "pretrained" in bases:
        pairs = []
        for m in models:
            for meth in merges:
                a = _mean(value(report, m, "pretrained", meth, "normalized_avg"))
                b = _mean(value(report, m, "random", meth, "normalized_avg"))
                if a is not None and b is not None:
                    pairs.append((f"{m} {meth}", a, b))
        add("A pretrained base merges better than a random initialisation (normalised held-in, pretrained "
            "vs random)", pairs)  # fmt: skip
    # 2. bigger models merge better
    if len(models) >= 2:
        for base in bases:
            pairs = []
            for meth in merges:
                a = _mean(value(report, models[-1], base, meth, "normalized_avg"))
                b = _mean(value(report, models[0], base, meth, "normalized_avg"))
                if a is not None and b is not None:
                    pairs.append((f"{meth}", a, b))
            add(
                f"Larger models merge better ({base} base; normalised held-in, {models[-1]} vs {models[0]})",
                pairs,
            )
    # 3. methods become alike at scale: spread of merges shrinks with size
    if len(models) >= 2:
        pairs = []
        for base in bases:
            spreads = []
            for m in (models[0], models[-1]):
                vals = [_mean(value(report, m, base, meth, "normalized_avg")) for meth in merges]
                got = [v for v in vals if v is not None]
                spreads.append(max(got) - min(got) if got else math.nan)
            if not any(math.isnan(x) for x in spreads):
                pairs.append((f"{base} base, spread at {models[-1]} vs {models[0]}", spreads[1], spreads[0]))
        add("The merging methods become alike as models grow (spread of normalised held-in across methods, "
            "largest vs smallest model)", pairs, better="lower")  # fmt: skip
    # 4. merged models generalise better than the multitask model on held-out
    pairs = []
    for m in models:
        for base in bases:
            mt = _mean(value(report, m, base, "multitask", "held_out_normalized_avg"))
            if mt is None:
                continue
            for meth in merges:
                a = _mean(value(report, m, base, meth, "held_out_normalized_avg"))
                if a is not None:
                    pairs.append((f"{m} {base} {meth}", a, mt))
    add("Merged models generalise to held-out tasks better than the multitask model (normalised held-out, "
        "merge vs multitask)", pairs)  # fmt: skip
    # 5. merges beat the base on held-out
    pairs = []
    for m in models:
        for base in bases:
            for meth in merges:
                a = _mean(value(report, m, base, meth, "held_out_normalized_avg"))
                if a is not None:
                    pairs.append((f"{m} {base} {meth}", a, 1.0))
    add("Merges improve on the base model on held-out tasks (normalised held-out > 1)", pairs)
    # 6. more experts: held-in score falls with the number of experts (the usual interference)
    pairs = []
    for m in models:
        for base in bases:
            c = cell(report, m, base)
            if c is None or (m, base) in skip:
                continue
            for meth in merges:
                sw = c["summary"]["sweep"].get(meth, {})
                ks = sorted(int(k) for k in sw)
                if len(ks) >= 2:
                    pairs.append((f"{m} {base} {meth} k={ks[-1]} vs k={ks[0]}", _mean(sw[str(ks[-1])]) or 0.0,
                                  _mean(sw[str(ks[0])]) or 0.0))  # fmt: skip
    add(
        "Merging more experts lowers the normalised held-in score (most experts vs fewest)",
        pairs,
        better="lower",
    )
    return out


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def markdown(report: Mapping[str, Any]) -> str:
    man = report["manifest"]
    cfg = man["config"]
    models = models_of(report)
    bases = bases_of(report)
    methods = methods_of(report)
    cols = [(m, b) for m, _ in models for b in bases]
    head = [f"{m} / {b}" for m, b in cols]
    out = [
        f"# weightmerge eval: {cfg['name']} (scale study)",
        "",
        f"Models (body parameters): {', '.join(f'`{m}` ({n / 1e6:.2f} M)' for m, n in models)}; bases "
        f"{', '.join(f'`{b}`' for b in bases)}; {len(cfg['tasks'])} held-in tasks, {len(cfg['held_out'])} "
        f"held-out; seeds {man['seeds']} (mean ± sample std over seeds); config hash "
        f"`{man['config_hash'][:12]}`; weightmerge {man['weightmerge']}, torch {man['torch']}; "
        f"{man['seconds']:.0f} s in all.",
        "",
    ]
    for key, title in (
        ("normalized_avg", "Normalised held-in"),
        ("held_out_normalized_avg", "Normalised held-out"),
    ):
        out += [f"## {title}", ""]
        body = [[meth, *(fmt(value(report, m, b, meth, key)) for m, b in cols)] for meth in methods]
        out += [*_table(["method", *head], body), ""]
    if "multitask" in bases and "pretrained" in bases:
        out += ["## Base quality: multitask base minus pretrained base (normalised held-in)", ""]
        body = []
        for meth in [x for x in methods if x != "individual"]:
            line = [meth]
            for m, _ in models:
                mt = value(report, m, "multitask", meth, "normalized_avg")
                pre = value(report, m, "pretrained", meth, "normalized_avg")
                line.append("-" if mt is None or pre is None else f"{mt['mean'] - pre['mean']:+.3f}")
            body.append(line)
        out += [*_table(["method", *(m for m, _ in models)], body), ""]
    ks = sorted({int(k) for c in _cells(report) for sw in c["summary"]["sweep"].values() for k in sw})
    if ks:
        out += ["## Number of experts (normalised held-in of merges of k experts)", ""]
        body = []
        for m, _ in models:
            for base in bases:
                for meth in swept_methods(report):
                    body.append([m, base, meth, *(fmt(sweep_value(report, m, base, meth, k)) for k in ks)])
        out += [*_table(["model", "base", "method", *(f"k={k}" for k in ks)], body), ""]
    out += ['## Findings of "What Matters for Model Merging at Scale", checked on this run', ""]
    skipped = unlearnt_cells(report)
    if skipped:
        out += [
            "Left out: " + ", ".join(f"{m} / {b}" for m, b in skipped) + " -- the experts did not learn "
            f"(mean test accuracy within {LEARNT_MARGIN} of the base body's), so their normalised scores "
            "divide by chance-level accuracies.",
            "",
        ]
    for f in findings(report):
        verdict = "holds" if f["holds"] else "does not hold"
        out.append(f"- **{verdict}** ({f['wins']}/{f['of']}): {f['finding']}. {f['evidence']}")
    cmd = man.get("command")
    if cmd:
        out += ["", "Command: `" + " ".join(cmd) + "`"]
    return "\n".join(out) + "\n"


def console_table(report: Mapping[str, Any]) -> str:
    models = models_of(report)
    bases = bases_of(report)
    cols = [(m, b) for m, _ in models for b in bases]
    width = max(14, *(len(f"{m}/{b}") for m, b in cols))
    lines = [f"{'norm. held-in':<26}" + "".join(f" {m + '/' + b:>{width}}" for m, b in cols)]
    lines.append("-" * len(lines[0]))
    for meth in methods_of(report):
        cells = "".join(f" {fmt(value(report, m, b, meth, 'normalized_avg')):>{width}}" for m, b in cols)
        lines.append(f"{meth:<26}{cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _panels(n: int, title: str) -> tuple[Any, Any]:
    from weightmerge.eval.plots import _figure

    fig = _figure(4.2 * n + 0.8, 3.8)
    axes = fig.subplots(1, n, squeeze=False)[0]
    fig.suptitle(title, fontsize=11)
    return fig, axes


def _save_panels(fig: Any, axes: Any, path: Path, *, ylabel: str, legend_size: int) -> None:
    """The closing step every study figure shares: the y label, the legend, the file."""
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=legend_size, loc="best")
    fig.savefig(path)


def plot_vs_size(report: Mapping[str, Any], key: str, path: Path, *, title: str) -> None:
    from weightmerge.eval.plots import COLORS

    models = models_of(report)
    bases = bases_of(report)
    fig, axes = _panels(len(bases), title)
    xs = [n / 1e6 for _, n in models]
    for ax, base in zip(axes, bases, strict=True):
        for i, meth in enumerate(m for m in methods_of(report) if m != "individual"):
            ys = [value(report, m, base, meth, key) for m, _ in models]
            pts = [(x, y["mean"], y["std"]) for x, y in zip(xs, ys, strict=True) if y is not None]
            if not pts:
                continue
            style = "--" if meth in ("base", "multitask") else "-"
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], label=meth,
                        color=COLORS[i % len(COLORS)], linestyle=style, marker="o", capsize=3)  # fmt: skip
        ax.set_title(f"{base} base", fontsize=10)
        ax.set_xlabel("body parameters (millions)")
        ax.grid(alpha=0.3)
    _save_panels(fig, axes, path, ylabel="normalised score", legend_size=7)


def plot_vs_experts(report: Mapping[str, Any], path: Path, *, title: str) -> None:
    from weightmerge.eval.plots import COLORS

    models = [m for m, _ in models_of(report)]
    bases = bases_of(report)
    fig, axes = _panels(len(bases), title)
    styles = ["-", "--", ":", "-."]
    for ax, base in zip(axes, bases, strict=True):
        c0 = cell(report, models[0], base)
        if c0 is None:
            continue
        for i, meth in enumerate(swept_methods(report)):
            for j, m in enumerate(models):
                c = cell(report, m, base)
                sw = {} if c is None else c["summary"]["sweep"].get(meth, {})
                ks = sorted(int(k) for k in sw)
                if not ks:
                    continue
                ax.plot(ks, [sw[str(k)]["mean"] for k in ks], marker="o", color=COLORS[i % len(COLORS)],
                        linestyle=styles[j % len(styles)], label=f"{meth} ({m})")  # fmt: skip
        ax.set_title(f"{base} base", fontsize=10)
        ax.set_xlabel("experts merged")
        ax.grid(alpha=0.3)
    _save_panels(fig, axes, path, ylabel="normalised held-in", legend_size=6)


def plot_merged_vs_multitask(report: Mapping[str, Any], path: Path, *, title: str) -> None:
    from weightmerge.eval.plots import COLORS

    models = [m for m, _ in models_of(report)]
    bases = bases_of(report)
    methods = [m for m in methods_of(report) if m not in ("individual",)]
    fig, axes = _panels(len(bases), title)
    width = 0.8 / max(1, len(methods))
    for ax, base in zip(axes, bases, strict=True):
        for i, meth in enumerate(methods):
            ys = [value(report, m, base, meth, "held_out_normalized_avg") for m in models]
            xs = [j + i * width for j in range(len(models))]
            ax.bar(xs, [0 if y is None else y["mean"] for y in ys], width=width, label=meth,
                   color=COLORS[i % len(COLORS)], hatch="//" if meth == "multitask" else None)  # fmt: skip
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, fontsize=7)
        ax.set_title(f"{base} base", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    _save_panels(fig, axes, path, ylabel="normalised held-out (1 = base)", legend_size=6)


def write_plots(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    name = report["manifest"]["config"]["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    p = out_dir / "scale_held_in.png"
    plot_vs_size(report, "normalized_avg", p, title=f"{name}: normalised held-in vs model size")
    written.append(p)
    if report["manifest"]["config"]["held_out"]:
        p = out_dir / "scale_held_out.png"
        plot_vs_size(report, "held_out_normalized_avg", p, title=f"{name}: normalised held-out vs model size")
        written.append(p)
        p = out_dir / "scale_multitask.png"
        plot_merged_vs_multitask(report, p, title=f"{name}: held-out, merges vs multitask model and base")
        written.append(p)
    if any(c["summary"]["sweep"] for c in _cells(report)):
        p = out_dir / "scale_experts.png"
        plot_vs_experts(report, p, title=f"{name}: normalised held-in vs number of experts")
        written.append(p)
    return written


def summary_stats(values: Sequence[float | None]) -> dict[str, Any] | None:
    return stat(values)
