"""``weightmerge validate CONFIG``: check a merge config and print what it resolves to."""

from __future__ import annotations

import argparse
import json
import os
import sys

from weightmerge.config import ConfigError, MergeConfig, load_config


def require_paths(cfg: MergeConfig, *, download: bool = True) -> MergeConfig:
    """Every model, adapter, statistics and tokenizer path the config names exists, else a
    ConfigError naming the first missing one. Hugging Face ids not in the cache yet are downloaded
    first (unless HF_HUB_OFFLINE is set); the config is then read again to point at them."""
    missing = [p for p in cfg.referenced_paths() if not os.path.exists(p)]
    hub = [p for p in missing if p in cfg.hub_ids]
    if hub and download and cfg.source is not None:
        from weightmerge.config.loader import hub_snapshot

        for p in hub:
            repo, _, revision = cfg.hub_ids[p].partition("@")
            print(f"weightmerge: downloading {cfg.hub_ids[p]} from the Hugging Face Hub", file=sys.stderr)
            if hub_snapshot(repo, revision or None, download=True) is None:
                raise ConfigError(
                    f"{cfg.hub_ids[p]}: not a local folder ({p}), not in the Hugging Face cache, and "
                    "the download failed (offline, or no such model)",
                    source=cfg.source,
                )
        cfg = load_config(cfg.source)
        missing = [p for p in cfg.referenced_paths() if not os.path.exists(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"not found: {missing[0]}{more}", source=cfg.source)
    return cfg


def _run(args: argparse.Namespace) -> int:
    from weightmerge.config.multi import read_stages, stage_document

    stages = read_stages(args.config)
    if stages is not None:  # multi-stage: each stage checked; earlier stages' folders do not exist yet
        folders = {s.name: os.path.join("<intermediate-dir>", s.name) for s in stages if s.name is not None}
        for stage in stages:
            try:
                cfg = load_config(stage_document(stage, folders), base_dir=os.getcwd())
            except ConfigError as err:
                raise err.with_source(f"{args.config} (stage {stage.name or 'final'})") from None
            print(
                f"stage {stage.name or 'final (written to OUT)'}"
                + (f", reads {list(stage.needs)}" if stage.needs else "")
            )
            for line in cfg.describe():
                print(f"  {line}")
        print("OK")
        return 0
    cfg = load_config(args.config)
    missing = [p for p in cfg.referenced_paths() if not os.path.exists(p)]
    if args.check_paths:
        require_paths(cfg, download=False)
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
        hub = f" (Hugging Face id {cfg.hub_ids[p]}: merge and plan download it)" if p in cfg.hub_ids else ""
        print(f"note: not found (yet): {p}{hub}")
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
