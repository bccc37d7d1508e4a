"""``weightmerge merge CONFIG OUT``: merge the checkpoints a (mergekit-compatible) YAML describes."""

from __future__ import annotations

import argparse
import sys

from weightmerge.engine.plan import parse_size


def _run(args: argparse.Namespace) -> int:
    from weightmerge.config import load_config
    from weightmerge.engine.merge import MergeOptions, merge_config

    cfg = load_config(args.config)
    opts = MergeOptions(
        shard_size=parse_size(args.shard_size) or 0,
        max_memory=parse_size(args.max_memory),
        force=args.force,
        quiet=args.quiet,
        threads=args.threads,
        prefetch=not args.no_prefetch,
        copy_tokenizer=not args.no_copy_tokenizer,
        device=args.device,
        allow_nonfinite=args.allow_nonfinite,
        resume=args.resume,
    )
    report = merge_config(cfg, args.out, opts)
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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
