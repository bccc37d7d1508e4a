"""The model card (README.md) written next to a merged model."""

from __future__ import annotations

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
    if base_model:
        front["base_model"] = [base_model, *models]
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
