"""Multi-stage configs (mergekit-multi's format): several YAML documents in one file, each a merge
config with a ``name``; a later stage names an earlier one where it would name a model. Named
stages are written to an intermediate folder (``DIR/NAME``); the one unnamed stage is the final
merge, written to OUT. Stages run in dependency order; one whose folder already holds a finished
merge is not merged again (as ``mergekit-multi --lazy``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from weightmerge.config.errors import ConfigError
from weightmerge.safe_yaml import MAX_VALUES, YAMLTooLarge, expanded_size


@dataclass(frozen=True)
class Stage:
    name: str | None  # None: the final merge
    index: int  # its document's position in the file
    doc: Mapping[str, Any]  # the config without ``name``
    needs: tuple[str, ...]  # earlier stages it reads


def _model_slots(doc: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    """(container, key) of every model reference of a config document."""
    slots: list[tuple[Any, Any]] = []
    if "base_model" in doc:
        slots.append((doc, "base_model"))
    for entry in doc.get("models") or []:
        if isinstance(entry, dict) and "model" in entry:
            slots.append((entry, "model"))
    for sl in doc.get("slices") or []:
        for src in (sl.get("sources") or []) if isinstance(sl, dict) else []:
            if isinstance(src, dict) and "model" in src:
                slots.append((src, "model"))
    return slots


def read_stages(path: str) -> list[Stage] | None:
    """The stages of a multi-document config in the order they run, or None for a plain config
    (one document without ``name``)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return None  # the single-document reader reports it
    if len(docs) <= 1 and not (docs and isinstance(docs[0], Mapping) and "name" in docs[0]):
        return None
    stages: dict[str | None, Stage] = {}
    for i, d in enumerate(docs):
        where = f"document {i + 1}"
        if not isinstance(d, dict):
            raise ConfigError(f"a stage is a mapping (a merge config with 'name'), got {type(d).__name__}",
                              location=where, source=path)  # fmt: skip
        if expanded_size(d, limit=MAX_VALUES) > MAX_VALUES:
            raise ConfigError(str(YAMLTooLarge("too many values")), location=where, source=path)
        name = d.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip() or "/" in name):
            raise ConfigError(
                f"a stage name is a plain word, got {name!r}", location=f"{where}.name", source=path
            )
        if name in stages:
            what = "two unnamed (final) stages" if name is None else f"two stages named {name!r}"
            raise ConfigError(what, location=f"{where}.name", source=path)
        body = {k: v for k, v in d.items() if k != "name"}
        stages[name] = Stage(name, i, body, ())
    names = {n for n in stages if n is not None}
    for key, st in list(stages.items()):
        needs = tuple(
            dict.fromkeys(v[k] for v, k in _model_slots(st.doc) if isinstance(v[k], str) and v[k] in names)
        )
        stages[key] = Stage(st.name, st.index, st.doc, needs)
    if None not in stages:
        raise ConfigError(
            "no final stage: one document without 'name' is the merge written to OUT", source=path
        )
    order: list[Stage] = []
    state: dict[str | None, str] = {}

    def visit(key: str | None, trail: tuple[str | None, ...]) -> None:
        if state.get(key) == "done":
            return
        if state.get(key) == "open":
            loop = " -> ".join(str(k) for k in (*trail, key))
            raise ConfigError(f"stages read each other in a loop: {loop}", source=path)
        state[key] = "open"
        for dep in stages[key].needs:
            visit(dep, (*trail, key))
        state[key] = "done"
        order.append(stages[key])

    for key in sorted(stages, key=lambda k: stages[k].index):
        visit(key, ())
    return order


def stage_document(stage: Stage, folders: Mapping[str, str]) -> dict[str, Any]:
    """The stage's config with every name of an earlier stage replaced by that stage's folder."""
    doc = yaml.safe_load(yaml.safe_dump(dict(stage.doc)))  # a deep copy of plain data
    for container, key in _model_slots(doc):
        if isinstance(container[key], str) and container[key] in folders:
            container[key] = os.path.abspath(folders[container[key]])
    return doc
