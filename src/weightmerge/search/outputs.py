"""What a search writes (atomically) into its output directory, next to ``history.jsonl``:

* ``history.json`` -- the summary: the chosen point with its validation and test scores, the
  default point's, every candidate, timings;
* ``best.yaml`` -- the chosen point as a ready-to-run config: a merge config (``weightmerge merge
  best.yaml OUT``) when the models are checkpoints, an eval config (``weightmerge eval best.yaml``)
  with the benchmark evaluator;
* ``score_vs_evaluations.png`` and ``score_vs_parameters.png`` (one panel per searched dimension).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from weightmerge.search.config import BenchmarkEvaluatorDoc, SearchConfig
from weightmerge.search.history import atomic_write_text
from weightmerge.search.problem import Template


def best_config(cfg: SearchConfig, template: Template, point: Mapping[str, Any]) -> dict[str, Any]:
    """The chosen point as a config that runs as it is (validated before it is returned)."""
    doc = cfg.search.evaluator
    params = template.params(point)
    params.pop("exclude", None)
    if isinstance(doc, BenchmarkEvaluatorDoc):
        from weightmerge.eval.config import parse_config
        from weightmerge.search.problem import _benchmark_eval_config

        ecfg = _benchmark_eval_config(doc, cfg.base_dir)
        data = ecfg.model_dump(mode="json")
        data.update(
            name=f"{ecfg.name}-search",
            tasks=list(template.model_names),
            seeds=[doc.seed],
            n_experts=[],
            output_dir=str(Path(cfg.search.output_dir) / "eval"),
            methods=[
                {
                    "method": template.method,
                    "label": f"{template.method} (default)",
                    "params": dict(cfg.merge.get("parameters") or {}),
                    "dtype": template.compute_dtype,
                },
                {
                    "method": template.method,
                    "label": f"{template.method} (search)",
                    "params": params,
                    "dtype": template.compute_dtype,
                },
            ],
        )
        if doc.cache_dir is not None:
            data["cache_dir"] = doc.cache_dir
        parse_config(data)  # it must load as it is
        return data
    from weightmerge.config import load_config

    resolved = load_config(cfg.merge, base_dir=cfg.base_dir).resolved()
    glob = dict(resolved.get("parameters") or {})
    for d in template.dims:
        if d.model is None:
            glob[d.param] = point[d.name]
    resolved["parameters"] = glob
    for d in template.dims:  # a model's own value wins over the global one
        if d.model is not None:
            resolved["models"][d.model].setdefault("parameters", {})[d.param] = point[d.name]
    return load_config(resolved).resolved()


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_progress(summary: Mapping[str, Any], path: Path) -> None:
    recs = summary["history"]
    obj = summary["objective"]
    xs = [i + 1 for i in range(len(recs))]
    ys = [r["objective"] for r in recs]
    run, best = [], -math.inf
    for y in ys:
        best = max(best, y) if math.isfinite(y) else best
        run.append(best)
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot()
    ax.scatter(xs, ys, s=14, color="#1f77b4", label="candidate (validation)")
    ax.plot(xs, run, color="#d62728", label="best so far")
    ax.axhline(summary["default"]["validation"][obj], color="#7f7f7f", ls="--", label="default point")
    ax.set_xlabel("evaluations")
    ax.set_ylabel(f"{obj} (validation)")
    ax.set_title(f"{summary['method']} search ({summary['optimizer']}, seed {summary['seed']})")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path)


def plot_parameters(summary: Mapping[str, Any], path: Path) -> None:
    recs = summary["history"]
    obj = summary["objective"]
    dims = summary["dimensions"]
    cols = min(4, len(dims))
    rows = math.ceil(len(dims) / cols)
    fig = _figure(3.2 * cols, 2.6 * rows)
    best = summary["best"]["point"]
    for k, name in enumerate(dims):
        ax = fig.add_subplot(rows, cols, k + 1)
        vals = [r["point"][name] for r in recs]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        labels = sorted({str(v) for v in vals})
        xs = vals if numeric else [labels.index(str(v)) for v in vals]
        ax.scatter(xs, [r["objective"] for r in recs], s=10, color="#1f77b4")
        bx = best[name] if numeric else labels.index(str(best[name])) if str(best[name]) in labels else 0
        ax.axvline(bx, color="#d62728", lw=1)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(name, fontsize=8)
        if k % cols == 0:
            ax.set_ylabel(obj, fontsize=8)
    fig.savefig(path)


def write_outputs(
    cfg: SearchConfig, template: Template, summary: Mapping[str, Any], out: Path
) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "history": out / "history.jsonl",
        "summary": out / "history.json",
        "best_config": out / "best.yaml",
        "progress_plot": out / "score_vs_evaluations.png",
        "parameters_plot": out / "score_vs_parameters.png",
    }
    atomic_write_text(paths["summary"], json.dumps(summary, indent=2, default=str) + "\n")
    best = best_config(cfg, template, summary["best"]["point"])
    head = "# the point chosen on validation by `weightmerge search`"
    obj = summary["objective"]
    val, test = summary["best"]["validation"][obj], summary["best"]["test"].get(obj, math.nan)
    head += f" ({obj}: validation {val:.4f}, test {test:.4f})\n"
    atomic_write_text(
        paths["best_config"], head + yaml.safe_dump(best, sort_keys=False, default_flow_style=None)
    )
    for key, fn in (("progress_plot", plot_progress), ("parameters_plot", plot_parameters)):
        tmp = paths[key].with_name(f".{paths[key].name}.tmp.png")
        fn(summary, tmp)
        tmp.replace(paths[key])
    return paths
