"""``weightmerge plan CONFIG``: what a merge would do, from headers only, and its memory estimate."""

from __future__ import annotations

import argparse
import json


def _run(args: argparse.Namespace) -> int:
    from weightmerge.cli.validate import require_paths
    from weightmerge.config import load_config

    cfg = load_config(args.config)
    cfg = require_paths(cfg)  # before the tensor libraries load: a typo costs no import time

    from weightmerge.engine.merge import open_and_plan
    from weightmerge.engine.plan import parse_size

    inputs = open_and_plan(cfg, max_memory=parse_size(args.max_memory))
    try:
        plan = inputs.plan
        if args.json:
            print(
                json.dumps(
                    {
                        "method": plan.method.name,
                        "models": plan.n_models,
                        "tensors": [
                            {
                                "name": t.name,
                                "shape": list(t.shape),
                                "out_dtype": str(t.out_dtype).replace("torch.", ""),
                                "action": t.action,
                                "reason": t.reason,
                                "chunk_rows": t.chunk_rows,
                            }
                            for t in plan.tensors
                        ],
                        "statistics_passes": plan.stat_passes,
                        "estimated_peak_bytes": plan.est_peak_bytes,
                        "output_bytes": plan.output_bytes(),
                        "notes": list(cfg.notes) + plan.notes,
                    },
                    indent=2,
                )
            )
            return 0
        for line in cfg.describe():
            print(line)
        print(plan.describe())
        for note in cfg.notes:
            print(f"note: {note}")
    finally:
        inputs.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="explain a merge before running it (headers only; memory estimate)")
    p.add_argument("config", help="merge config (YAML)")
    p.add_argument("--max-memory", default=None, help="memory budget to plan row-chunking for (e.g. 4GB)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run)
