"""``weightmerge emr``: work with EMR artifacts (written by ``weightmerge merge`` with ``merge_method: emr``).

weightmerge emr info ARTIFACT [--json] [--tensors]
weightmerge emr materialize ARTIFACT --task NAME OUT [--base PATH] [--max-shard-size 5GB]
weightmerge emr verify ARTIFACT
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _info(args: argparse.Namespace) -> int:
    from weightmerge.emr import load_emr

    with load_emr(args.artifact) as art:
        info = art.info(per_tensor=args.tensors)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    version = info["weightmerge_version"]
    print(f"artifact: {info['path']} (format {info['format_version']}, weightmerge {version})")
    print(f"base: {info['base']['path']} (content sha256 {info['base']['content_sha256'][:16]}...)")
    print(f"rescale: {info['rescale']}; compute dtype: {info['compute_dtype']}")
    print(f"merged: {info['merged_tensors']} tensors, {info['merged_params']:,} parameters")
    print(
        f"unified task vector: {_fmt_bytes(info['unified_bytes'])} "
        f"({info['unified_bits_per_param']:.2f} bits/parameter)"
    )
    print(
        f"total on disk: {_fmt_bytes(info['total_bytes'])}; {len(info['tasks'])} full checkpoints: "
        f"{_fmt_bytes(info['full_checkpoints_bytes'])} (ratio {info['size_ratio']:.3f})"
    )
    print(f"{'task':<24} {'rescaler':>10} {'mask':>11} {'bits/param':>10} {'ones':>7} {'own tensors':>18}")
    for t in info["tasks"]:
        own = f"{t['own_tensors']} ({_fmt_bytes(t['own_bytes'])})"
        print(
            f"{t['name']:<24} {t['rescaler']:>10.6f} {_fmt_bytes(t['mask_bytes']):>11} "
            f"{t['task_bits_per_param']:>10.4f} {t['mask_ones_fraction']:>7.2%} {own:>18}"
        )
    for row in info.get("tensors", []):
        fractions = " ".join(f"{f:.3f}" for f in row["mask_ones_fraction"])
        print(f"  {row['name']} {row['shape']} {row['dtype']}: ones {fractions}")
    return 0


def _materialize(args: argparse.Namespace) -> int:
    from weightmerge.emr import load_emr, materialize
    from weightmerge.engine.plan import parse_size

    with load_emr(args.artifact) as art:
        base = args.base or art.base["path"]
        if not os.path.exists(base):
            raise FileNotFoundError(
                f"base model {base} (recorded in the artifact) not found; pass --base PATH"
            )
        t0 = time.perf_counter()
        out = materialize(
            art,
            args.task,
            base,
            args.out,
            max_shard_bytes=parse_size(args.max_shard_size) or 0,
            verify_base=not args.no_verify_base,
        )
        print(f"wrote task {args.task!r} to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from weightmerge.emr import load_emr

    with load_emr(args.artifact) as art:
        art.verify()
        print(f"OK: {art.path} ({len(art.tasks)} tasks, {len(art.files)} files checked)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "emr",
        help="EMR artifacts: info, materialize one task as a checkpoint, verify",
        description="Work with the artifact written by an EMR merge (one unified task vector, a 1-bit "
        "mask and a rescaler per task). See docs/emr-artifact.md.",
    )
    esub = p.add_subparsers(dest="emr_command", metavar="ACTION", required=True)

    pi = esub.add_parser("info", help="tasks, sizes on disk, bits per parameter, mask densities")
    pi.add_argument("artifact", help="the EMR artifact directory")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.add_argument("--tensors", action="store_true", help="also list every merged tensor")
    pi.set_defaults(func=_info)

    pm = esub.add_parser(
        "materialize",
        help="write one task as a normal Hugging Face checkpoint (streamed, bounded memory)",
    )
    pm.add_argument("artifact", help="the EMR artifact directory")
    pm.add_argument("--task", required=True, help="task name (see `weightmerge emr info`)")
    pm.add_argument("out", help="output directory (must not exist)")
    pm.add_argument("--base", help="base model (default: the path recorded in the artifact)")
    pm.add_argument("--max-shard-size", default="5GB", help="shard size of the output (default 5GB)")
    pm.add_argument(
        "--no-verify-base",
        action="store_true",
        help="skip the sha256 check of the base tensors (names, shapes, dtypes are still checked)",
    )
    pm.set_defaults(func=_materialize)

    pv = esub.add_parser("verify", help="check every file of an artifact (sizes, headers, sha256)")
    pv.add_argument("artifact", help="the EMR artifact directory")
    pv.set_defaults(func=_verify)
