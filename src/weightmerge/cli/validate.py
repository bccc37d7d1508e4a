"""``weightmerge validate CONFIG``: check a merge config and print what it resolves to."""

from __future__ import annotations

import argparse
import json
import os

from weightmerge.config import ConfigError, MergeConfig, load_config


def require_paths(cfg: MergeConfig) -> None:
    """Every model, adapter, statistics and tokenizer path the config names exists, else a
    ConfigError naming the first missing one."""
    missing = [p for p in cfg.referenced_paths() if not os.path.exists(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(
            f"not found: {missing[0]}{more}; weightmerge reads local checkpoints only "
            "(download hub models first)",
            source=cfg.source,
        )


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    missing = [p for p in cfg.referenced_paths() if not os.path.exists(p)]
    if args.check_paths:
        require_paths(cfg)
    if args.json:
        print(
            json.dumps(
                {"config": cfg.resolved(), "notes": list(cfg.notes), "missing_paths": missing}, indent=2
            )
        )
        return 0
    print(f"config: {os.path.abspath(args.config)}")
    for line in cfg.describe():
        print(line)
    for p in missing:
        print(f"note: not found (yet): {p}")
    print("OK")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check a merge config (mergekit-compatible YAML) and print the resolved settings",
        description="Validate a merge config without reading any checkpoint; exit status 1 on an error.",
    )
    p.add_argument("config", help="the YAML merge config")
    p.add_argument("--json", action="store_true", help="print the resolved config as JSON")
    p.add_argument(
        "--check-paths",
        action="store_true",
        help="also fail when a model, adapter or statistics path is missing",
    )
    p.set_defaults(func=_run)
