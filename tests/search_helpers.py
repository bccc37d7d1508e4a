"""Helpers for tests/test_search*.py: tiny checkpoints and evaluators importable by worker processes.

The toy problem: three experts are the base plus three random task vectors; the score of a merge is
minus the squared distance of its task vector to ``TARGET_WEIGHTS`` times the task vectors on
"validation", and to a slightly different target on "test" (so the two splits can be told apart).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TARGET_WEIGHTS = (0.9, 1.2, 0.6)
SHAPES = {"layers.0.w": (6, 5), "layers.1.w": (6, 5), "norm.w": (5,)}


def make_checkpoints(root: Path, *, seed: int = 0) -> Path:
    """base/, expert_0..2/ (model.safetensors each) and targets.safetensors under ``root``."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    tvs = [{k: torch.randn(s, generator=g) * 0.1 for k, s in SHAPES.items()} for _ in TARGET_WEIGHTS]
    for name, sd in [("base", base)] + [
        (f"expert_{i}", {k: base[k] + tv[k] for k in base}) for i, tv in enumerate(tvs)
    ]:
        (root / name).mkdir(parents=True, exist_ok=True)
        save_file(sd, str(root / name / "model.safetensors"))
    val = {k: sum(w * tv[k] for w, tv in zip(TARGET_WEIGHTS, tvs, strict=True)) + base[k] for k in base}
    test = {k: val[k] + 0.01 for k in base}
    save_file(
        {**{f"validation.{k}": v for k, v in val.items()}, **{f"test.{k}": v for k, v in test.items()}},
        str(root / "targets.safetensors"),
    )
    return root


def distance_score(state: Mapping[str, torch.Tensor], *, split: str, targets: str) -> dict[str, float]:
    t = load_file(targets)
    err = sum(float(((state[k].double() - t[f"{split}.{k}"].double()) ** 2).sum()) for k in SHAPES)
    return {"neg_sq_error": -err, "error": err}


def guarded_score(
    state: Mapping[str, torch.Tensor], *, split: str, targets: str, log: str, validation_calls: int
) -> dict[str, float]:
    """Fails when asked for test data before ``validation_calls`` validation evaluations were made
    (that is, during the search); every call is appended to the ``log`` file."""
    calls = Path(log).read_text().splitlines() if os.path.exists(log) else []
    if split == "test" and calls.count("validation") < validation_calls:
        raise AssertionError(
            f"test data requested during the search (after {calls.count('validation')} validation calls)"
        )
    with open(log, "a") as f:
        f.write(split + "\n")
    return distance_score(state, split=split, targets=targets)


def search_config(root: Path, **search: object) -> dict[str, object]:
    block: dict[str, object] = {
        "evaluator": {
            "python": "search_helpers:distance_score",
            "options": {"targets": str(root / "targets.safetensors")},
        },
        "objective": "neg_sq_error",
        "optimizer": "cma",
        "budget": 12,
        "population": 4,
        "seed": 0,
        "space": [{"param": "weight", "per_model": True, "low": 0.0, "high": 2.0}],
        "output_dir": str(root / "out"),
    }
    block.update(search)
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / f"expert_{i}")} for i in range(len(TARGET_WEIGHTS))],
        "parameters": {"weight": 1.0, "lambda": 1.0},
        "search": block,
    }


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data))
