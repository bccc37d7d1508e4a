"""``weightmerge methods``: every method with its parameters and defaults."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from weightmerge.methods.base import MethodSpec


def describe(spec: MethodSpec) -> dict[str, object]:
    return {
        "name": spec.name,
        "summary": spec.summary,
        "paper": spec.paper,
        "needs_base": spec.needs_base,
        "parameters": [
            {
                "name": p.name,
                "type": p.kind,
                "default": p.default if p.kind != "stats" else None,
                "per_model": p.per_model,
                **({"choices": list(p.choices)} if p.choices else {}),
                "help": p.help,
            }
            for p in spec.params
        ],
    }


def _run(args: argparse.Namespace) -> int:
    from weightmerge.methods.registry import METHODS, get_method

    specs = [METHODS[k] for k in sorted(METHODS)] if not args.name else [get_method(n) for n in args.name]
    if args.json:
        print(json.dumps([describe(s) for s in specs], indent=2))
        return 0
    for spec in specs:
        print(f"{spec.name}: {spec.summary}")
        if spec.paper:
            print(f"  paper: {spec.paper}")
        for p in spec.params:
            default = "(required)" if p.required else ("-" if p.kind == "stats" else repr(p.default))
            extra = " per-model" if p.per_model else ""
            choices = f" one of {list(p.choices)}" if p.choices else ""
            print(f"  {p.name:<26} {p.kind}{extra}{choices}, default {default}: {p.help}")
        print()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list merge methods, their parameters and defaults")
    p.add_argument("name", nargs="*", metavar="METHOD", help="only these methods (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run)
