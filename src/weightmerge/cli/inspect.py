"""``weightmerge inspect PATH``: what a checkpoint holds, from its headers only."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightmerge.io.base import TensorSource
    from weightmerge.io.sources import Layout

DEFAULT_ROWS = 25
EMR_MANIFEST = "emr_manifest.json"  # weightmerge.emr.writer.MANIFEST (not imported: it loads torch)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def _open_for_inspect(path: str, base_path: str | None) -> tuple[Layout, TensorSource, dict[str, Any]]:
    """The source to describe. An adapter without --base is described as its own tensors."""
    from weightmerge.io._common import load_json
    from weightmerge.io.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from weightmerge.io.sources import detect_layout, open_source

    layout = detect_layout(path)
    extra: dict[str, Any] = {}
    if layout.kind != "peft-adapter":
        if base_path is not None:
            raise ValueError(f"--base is only for PEFT adapter directories; {path} is {layout.kind}")
        return layout, open_source(path), extra
    acfg = load_json(os.path.join(path, ADAPTER_CONFIG), what="adapter config")
    extra["adapter"] = {
        k: acfg.get(k)
        for k in (
            "peft_type",
            "r",
            "lora_alpha",
            "use_rslora",
            "use_dora",
            "target_modules",
            "base_model_name_or_path",
        )
        if k in acfg
    }
    if base_path is not None:
        return layout, open_source(path, base=open_source(base_path)), extra
    for fname in ADAPTER_WEIGHTS:
        if os.path.isfile(os.path.join(path, fname)):
            return layout, open_source(os.path.join(path, fname)), extra
    raise FileNotFoundError(f"adapter directory {path} has no {' or '.join(ADAPTER_WEIGHTS)}")


def summarize(path: str, *, base_path: str | None = None) -> dict[str, Any]:
    """Everything ``inspect`` reports, as a JSON-ready dict (every tensor listed)."""
    from weightmerge.io.sources import tied_weights

    layout, src, extra = _open_for_inspect(path, base_path)
    try:
        infos = [src.info(k) for k in src.keys()]  # noqa: SIM118  (a TensorSource is not iterable)
        config = src.config or {}
        per_dtype: Counter[str] = Counter()
        count: Counter[str] = Counter()
        for i in infos:
            per_dtype[_dtype_name(i.dtype)] += i.nbytes
            count[_dtype_name(i.dtype)] += 1
        largest = max(infos, key=lambda i: i.nbytes, default=None)
        files = getattr(src, "files", None)
        return {
            "path": path,
            "layout": layout.kind,
            "files": files if files is not None else [os.path.basename(layout.file)],
            "architecture": (config.get("architectures") or [None])[0],
            "model_type": config.get("model_type"),
            **extra,
            "base": base_path,
            "num_tensors": len(infos),
            "parameters": sum(i.numel for i in infos),
            "bytes": sum(i.nbytes for i in infos),
            "bytes_per_dtype": dict(sorted(per_dtype.items())),
            "tensors_per_dtype": dict(sorted(count.items())),
            "largest_tensor": None
            if largest is None
            else {"name": largest.name, "shape": list(largest.shape), "bytes": largest.nbytes},
            "tied": tied_weights(src.config, [i.name for i in infos]),
            "tensors": [
                {"name": i.name, "dtype": _dtype_name(i.dtype), "shape": list(i.shape), "bytes": i.nbytes}
                for i in infos
            ],
        }
    finally:
        src.close()


def format_text(s: dict[str, Any], *, limit: int | None) -> str:
    lines = [f"{s['path']}: {s['layout']} ({len(s['files'])} file{'s' if len(s['files']) != 1 else ''})"]
    if s.get("architecture") or s.get("model_type"):
        lines.append(
            f"architecture: {s.get('architecture') or '?'} (model_type {s.get('model_type') or '?'})"
        )
    if "adapter" in s:
        a = s["adapter"]
        desc = ", ".join(f"{k}={v}" for k, v in a.items())
        lines.append(
            f"adapter: {desc}" + (f"; folded into {s['base']}" if s["base"] else " (its own tensors shown)")
        )
    lines.append(
        f"tensors: {s['num_tensors']}, parameters: {s['parameters']:,}, size: {human_bytes(s['bytes'])}"
    )
    for dt, nbytes in s["bytes_per_dtype"].items():
        lines.append(f"  {dt:<14} {s['tensors_per_dtype'][dt]:>6} tensors  {human_bytes(nbytes):>12}")
    if s["largest_tensor"]:
        lt = s["largest_tensor"]
        lines.append(f"largest: {lt['name']} {tuple(lt['shape'])} {human_bytes(lt['bytes'])}")
    for target, source in s["tied"].items():
        lines.append(f"tied: {target} is not stored; it is {source}")
    rows = s["tensors"] if limit is None else s["tensors"][:limit]
    if rows:
        width = max(len(r["name"]) for r in rows)
        lines.append("")
        lines.append(f"{'name':<{width}}  {'dtype':<9} {'shape':<22} size")
        for r in rows:
            shape = str(tuple(r["shape"]))
            lines.append(f"{r['name']:<{width}}  {r['dtype']:<9} {shape:<22} {human_bytes(r['bytes'])}")
        if len(rows) < len(s["tensors"]):
            lines.append(f"... {len(s['tensors']) - len(rows)} more (--all shows every tensor)")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if os.path.isfile(os.path.join(args.path, EMR_MANIFEST)):  # an EMR artifact, not a checkpoint
        from weightmerge.cli.emr import _info

        if not args.json:
            print(f"{args.path}: EMR artifact (one shared model, a 1-bit mask and a rescaler per task)")
        return _info(argparse.Namespace(artifact=args.path, json=args.json, tensors=args.all))
    s = summarize(args.path, base_path=args.base)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(format_text(s, limit=None if args.all else args.limit))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a checkpoint's layout, architecture, sizes and tensors (headers only)",
        description="Describe a checkpoint: a model directory, a .safetensors/.bin file, an index JSON, "
        "a PEFT adapter directory (with --base: folded into that base model), or an EMR artifact "
        "(as `weightmerge emr info`; --all lists its tensors).",
    )
    p.add_argument("path", help="checkpoint directory or file")
    p.add_argument("--base", default=None, help="for a PEFT adapter: the base model it applies to")
    p.add_argument("--json", action="store_true", help="machine-readable output (lists every tensor)")
    p.add_argument("--all", action="store_true", help="list every tensor (default: the first --limit)")
    p.add_argument(
        "--limit", type=int, default=DEFAULT_ROWS, help=f"tensor rows shown (default {DEFAULT_ROWS})"
    )
    p.set_defaults(func=_run)
