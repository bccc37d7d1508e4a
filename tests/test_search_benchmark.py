"""weightmerge search with the built-in benchmark evaluator (tiny random BERT, synthetic tasks):
the search's test scores of the chosen and the default point equal what `weightmerge eval` reports
for the eval config it writes (best.yaml), so the adapter scores exactly as the harness does."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from conftest import require
from weightmerge.cli import main
from weightmerge.eval.tasks import make_task, register_task
from weightmerge.search import load_search_config
from weightmerge.search.runner import run_search

pytest.importorskip("transformers")
require("cma")
pytestmark = (
    pytest.mark.slow
)  # ~20-40 s per case: three tiny experts fine-tuned, 6 merges scored (2 workers: + start-up)


def _builder(name: str, pools: dict[str, str]):
    def build(*, seed: int, n_train: int, n_val: int, n_test: int):
        rng = random.Random(f"{name}-pool")
        texts = {
            label: {
                " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 5))) for _ in range(4))
                for _ in range(150)
            }
            for label, letters in pools.items()
        }
        return make_task(
            name=name,
            label_names=list(pools),
            texts_by_label=texts,
            seed=seed,
            n_train=n_train,
            n_val=n_val,
            n_test=n_test,
            description=f"synthetic {name}",
            source="tests/test_search_benchmark.py",
        )

    return build


register_task("search_letters", _builder("search_letters", {"abc": "abc", "xyz": "xyz"}), replace=True)
register_task("search_digits", _builder("search_digits", {"low": "0123", "high": "6789"}), replace=True)
register_task(
    "search_vowels", _builder("search_vowels", {"vowel": "aeiou", "consonant": "bdfgk"}), replace=True
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("experts")  # shared: the experts are trained once


@pytest.mark.parametrize("workers", [1, 2])
def test_benchmark_search_scores_like_the_harness(tmp_path: Path, cache: Path, workers: int) -> None:
    bench = {
        "name": "search-smoke",
        "model": "tiny-random",
        "tasks": ["search_letters", "search_digits", "search_vowels"],
        "seeds": [0],
        "sizes": {"train": 48, "validation": 24, "test": 32},
        "training": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "head_lr": 1e-2, "max_length": 32},
        "methods": [{"method": "linear"}],
        "cache_dir": str(cache),
    }
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench))
    search = {
        "merge_method": "pcb",
        "parameters": {"keep_ratio": 0.2, "lambda": 1.0},
        "search": {
            "evaluator": {"benchmark": "bench.yaml", "seed": 0},
            "objective": "normalized_avg",
            "optimizer": "cma",
            "budget": 6,
            "population": 3,
            "space": [{"param": "lambda", "per_model": True, "low": 0.5, "high": 2.0}],
            "output_dir": "out",
        },
    }
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    s = run_search(load_search_config(tmp_path / "search.yaml"), log=lambda _m: None, workers=workers)
    assert s["dimensions"] == [f"lambda[{t}]" for t in bench["tasks"]]
    assert {"normalized_avg", "avg", "acc[search_letters]"} <= set(s["best"]["validation"])
    assert s["best"]["validation"]["normalized_avg"] >= s["default"]["validation"]["normalized_avg"]
    # best.yaml is an eval config: the harness's test scores of both rows equal the search's
    out = tmp_path / "out"
    assert main(["eval", str(out / "best.yaml"), "--no-progress", "-q"]) == 0
    rows = json.loads((out / "eval" / "report.json").read_text())["per_seed"][0]["rows"]
    for row, ours in (("pcb (search)", s["best"]["test"]), ("pcb (default)", s["default"]["test"])):
        assert rows[row]["normalized_avg"] == pytest.approx(ours["normalized_avg"], abs=1e-12), row
        for t in bench["tasks"]:
            assert rows[row]["held_in"][t] == pytest.approx(ours[f"acc[{t}]"], abs=1e-12), (row, t)


def test_eval_entry_with_a_search_gets_its_own_row(tmp_path: Path, cache: Path) -> None:
    doc = {
        "name": "search-row",
        "model": "tiny-random",
        "tasks": ["search_letters", "search_digits", "search_vowels"],
        "seeds": [0],
        "sizes": {"train": 48, "validation": 24, "test": 32},
        "training": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "head_lr": 1e-2, "max_length": 32},
        "methods": [
            {
                "method": "pcb",
                "params": {"keep_ratio": 0.2, "lambda": 1.0},
                "grid": {"keep_ratio": [0.1, 0.2]},
                "search": {
                    "space": [{"param": "lambda", "per_model": True, "low": 0.5, "high": 2.0}],
                    "budget": 4,
                    "population": 2,
                },
            }
        ],
        "cache_dir": str(cache),
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(doc))
    assert main(["eval", str(tmp_path / "eval.yaml"), "--no-progress", "-q"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = report["per_seed"][0]["rows"]
    assert {"pcb", "pcb (tuned)", "pcb (search)"} <= set(rows)
    row = rows["pcb (search)"]
    assert row["search"]["evaluations"] == 4
    # chosen on validation by the search; the harness's own validation score of that point agrees
    assert row["validation_normalized_avg"] == pytest.approx(row["search"]["validation_objective"], abs=1e-12)
    assert row["params"]["lambda"] == [row["search"]["point"][f"lambda[{t}]"] for t in doc["tasks"]]
    assert "| pcb (search) |" in (tmp_path / "out" / "report.md").read_text()
    # a bad search block is refused up front, naming the entry
    doc["methods"][0]["search"]["space"][0]["param"] = "lamda"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    assert main(["eval", str(tmp_path / "bad.yaml"), "--no-progress", "-q"]) == 1
