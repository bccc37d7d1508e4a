"""``weightmerge merge CONFIG OUT``: merge the checkpoints a (mergekit-compatible) YAML describes."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any


def _run(args: argparse.Namespace) -> int:
    from weightmerge.cli.mergekit_flags import mapped
    from weightmerge.config import load_config
    from weightmerge.config.multi import read_stages

    mk = mapped(args)
    stages = read_stages(args.config)
    if stages is None:
        return _merge_one(args, mk, load_config(args.config), args.out)
    return _run_stages(args, mk, stages)


def _run_stages(args: argparse.Namespace, mk: Any, stages: list[Any]) -> int:
    """A multi-stage config: named stages into --intermediate-dir, the unnamed one into OUT."""
    from weightmerge.config import ConfigError, load_config
    from weightmerge.config.multi import stage_document

    folder = args.intermediate_dir or f"{os.path.abspath(args.out).rstrip(os.sep)}-stages"
    done: dict[str, str] = {}
    for stage in stages:
        out = args.out if stage.name is None else os.path.join(folder, stage.name)
        where = f"{args.config} (stage {stage.name or 'final'})"
        if stage.name is not None and os.path.isfile(os.path.join(out, "weightmerge_config.yaml")):
            print(
                f"weightmerge: stage {stage.name}: {out} already holds it; not merged again", file=sys.stderr
            )
            done[stage.name] = out
            continue
        try:
            cfg = load_config(stage_document(stage, done), base_dir=os.getcwd())
        except ConfigError as err:
            raise err.with_source(where) from None
        if not args.quiet:
            print(f"weightmerge: stage {stage.name or 'final'} -> {out}", file=sys.stderr)
        _merge_one(args, mk, cfg, out)
        if stage.name is not None:
            done[stage.name] = out
    return 0


def _merge_one(args: argparse.Namespace, mk: Any, cfg: Any, out: str) -> int:
    from weightmerge.cli.validate import require_paths
    from weightmerge.config import FLOAT_DTYPES

    if mk.seed is not None:
        cfg = dataclasses.replace(cfg, seed=mk.seed)
    cfg = require_paths(cfg)  # before the tensor libraries load: a typo costs no import time

    from weightmerge.engine.merge import MergeOptions, merge_config
    from weightmerge.engine.plan import parse_size

    shard_size = parse_size(args.shard_size) or 0
    if mk.shard_params is not None:  # mergekit counts parameters; 2 bytes each unless a dtype says
        name = cfg.out_dtype or cfg.dtype
        itemsize = {"float32": 4, "float64": 8}.get(name or "", 2)
        assert name is None or name in FLOAT_DTYPES
        shard_size = mk.shard_params * itemsize
    for note in mk.notes:
        print(f"weightmerge: note: {note}", file=sys.stderr)
    opts = MergeOptions(
        shard_size=shard_size,
        max_memory=parse_size(args.max_memory),
        force=args.force,
        quiet=args.quiet or not sys.stderr.isatty(),  # the progress bar: on a terminal only
        threads=mk.threads or args.threads,
        prefetch=not args.no_prefetch,
        copy_tokenizer=not args.no_copy_tokenizer if mk.copy_tokenizer is None else mk.copy_tokenizer,
        device=mk.device or args.device,
        allow_nonfinite=args.allow_nonfinite,
        resume=args.resume,
        write_card=mk.write_card is not False,
    )
    report = merge_config(cfg, out, opts)
    if not args.quiet:
        t, plan = report.timings, report.plan
        print(
            f"merged {len(plan.merged)} tensors ({plan.method.name}, {plan.n_models} models, "
            f"on {report.extras.get('device', 'cpu')}) into {report.out} in {t.get('total_s', 0.0):.1f} s",
            file=sys.stderr,
        )
        if report.extras.get("resumed_tensors"):
            print(
                f"resumed: {report.extras['resumed_tensors']} tensors were kept from the interrupted run",
                file=sys.stderr,
            )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge checkpoints described by a YAML config into OUT")
    p.add_argument("config", help="merge config (mergekit-compatible YAML)")
    p.add_argument("out", help="output directory (created atomically; must not exist unless --force)")
    p.add_argument(
        "--force", action="store_true", help="replace an existing OUT (only once the merge succeeded)"
    )
    p.add_argument(
        "--shard-size", default="2GB", help="max bytes per output shard (e.g. 500M, 2GB; default 2GB)"
    )
    p.add_argument(
        "--max-memory",
        default=None,
        help="memory budget (e.g. 4GB); large tensors are merged in row chunks to stay under it",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="where the arithmetic runs: auto (a CUDA GPU when present, else the CPU), cpu, cuda, cuda:N",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-prefetch", action="store_true", help="do not read the next tensor while computing")
    p.add_argument("--no-copy-tokenizer", action="store_true", help="do not copy tokenizer files")
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="merge NaN/infinite values instead of refusing them (they usually mean a broken checkpoint)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed merge to OUT from its scratch directory (same config and inputs; "
        "refused otherwise); without an interrupted run, starts afresh",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar and no summary line (the bar is shown on a terminal only)",
    )
    p.add_argument(
        "--intermediate-dir",
        "-I",
        default=None,
        help="multi-stage configs (several YAML documents with 'name'): where the named stages go "
        "(default OUT-stages/)",
    )
    from weightmerge.cli import mergekit_flags

    mergekit_flags.register(p)
    p.set_defaults(func=_run)
