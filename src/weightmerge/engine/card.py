"""The model card (README.md) written next to a merged model."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from weightmerge.methods.base import MethodSpec
from weightmerge.version import __version__


def model_card(
    *,
    method: MethodSpec,
    base_model: str | None,
    models: Sequence[str],
    resolved_config: Mapping[str, Any],
    extra: Sequence[str] = (),
) -> str:
    front: dict[str, Any] = {"library_name": "transformers", "tags": ["merge", "weightmerge", method.name]}
    hub_ids = [m for m in ([base_model] if base_model else []) + list(models) if _hub_id(m)]
    if hub_ids:  # the Hub's metadata field: model ids only, never a local path
        front["base_model"] = list(dict.fromkeys(hub_ids))
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", "# Merged model", ""]
    lines.append(
        f"Made with [weightmerge](https://pypi.org/project/weightmerge/) {__version__} using the "
        f"**{method.name}** method ({method.summary.rstrip('.')})"
        + (f"; paper: {method.paper}." if method.paper else ".")
    )
    lines += ["", "## Models", ""]
    if base_model:
        lines.append(f"- base model: `{base_model}`")
    for m in models:
        lines.append(f"- `{m}`")
    if extra:
        lines += ["", "## Notes", "", *[f"- {e}" for e in extra]]
    lines += [
        "",
        "## Configuration",
        "",
        "The resolved configuration (also in `weightmerge_config.yaml`):",
        "",
        "```yaml",
        yaml.safe_dump(dict(resolved_config), sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(name: str) -> bool:
    """``org/name`` as the Hugging Face Hub spells model ids, and not a folder on this machine."""
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)
