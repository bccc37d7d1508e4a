"""weightmerge search on tiny checkpoints with a Python evaluator (tests/search_helpers.py):
the optimizers, outputs, resume, no test leakage, config errors and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import search_helpers as h
from conftest import require
from weightmerge.cli import main
from weightmerge.search import SearchConfigError, parse_search_config
from weightmerge.search.runner import run_search

require("cma")  # the search extra: installed by scripts/setup.sh
require("optuna")


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h.make_checkpoints(tmp_path_factory.mktemp("search"))


def _run(root: Path, out: str, *, write: bool = False, **search: object) -> dict:
    cfg = parse_search_config(h.search_config(root, output_dir=str(root / out), **search))
    return run_search(cfg, log=quiet, force=True, write=write)


def _trace(summary: dict) -> list[tuple[str, float]]:
    return [(json.dumps(r["point"], sort_keys=True), r["objective"]) for r in summary["history"]]


def test_cma_search_beats_default_and_best_yaml_reproduces_it(root: Path, tmp_path: Path) -> None:
    s = _run(root, "cma", budget=16, population=4, write=True)
    assert s["evaluations"] == 16
    best, default = s["best"], s["default"]
    assert best["validation"]["neg_sq_error"] > default["validation"]["neg_sq_error"]
    # the chosen point is the best validation score seen, and was scored on test
    assert best["validation"]["neg_sq_error"] == max(r["objective"] for r in s["history"])
    assert set(best["test"]) == {"neg_sq_error", "error"}
    out = root / "cma"
    for name in (
        "history.jsonl",
        "history.json",
        "best.yaml",
        "score_vs_evaluations.png",
        "score_vs_parameters.png",
    ):
        assert (out / name).stat().st_size > 0, name
    lines = (out / "history.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "header" and len(lines) == 1 + 1 + 16
    # best.yaml is a merge config: merging it to disk gives the chosen point's validation score
    assert main(["merge", str(out / "best.yaml"), str(tmp_path / "merged")]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    again = h.distance_score(merged, split="validation", targets=str(root / "targets.safetensors"))
    assert again["neg_sq_error"] == pytest.approx(best["validation"]["neg_sq_error"], rel=1e-6)
    per_model = [m["parameters"]["weight"] for m in yaml.safe_load((out / "best.yaml").read_text())["models"]]
    assert per_model == [best["point"][f"weight[expert_{i}]"] for i in range(3)]


def test_search_moves_towards_the_target_weights(root: Path) -> None:
    s = _run(root, "cma-long", budget=60, population=6)
    w = [s["best"]["point"][f"weight[expert_{i}]"] for i in range(3)]
    # the score is minimal at TARGET_WEIGHTS; the default point (1, 1, 1) is farther from it
    dist = math.dist(w, h.TARGET_WEIGHTS)
    assert dist < math.dist((1.0, 1.0, 1.0), h.TARGET_WEIGHTS) / 2, w


def test_grid_enumerates_the_cartesian_product(root: Path) -> None:
    space = [
        {"param": "weight", "per_model": True, "values": [0.5, 1.0]},
        {"param": "lambda", "low": 0.5, "high": 1.5, "steps": 3},
    ]
    s = _run(root, "grid", optimizer="grid", budget=1000, space=space)
    assert s["evaluations"] == 2 * 2 * 2 * 3
    points = {json.dumps(r["point"], sort_keys=True) for r in s["history"]}
    assert len(points) == 24
    assert {r["point"]["lambda"] for r in s["history"]} == {0.5, 1.0, 1.5}


@pytest.mark.parametrize("optimizer", ["random", "tpe", "cma"])
def test_optimizers_are_deterministic_per_seed(root: Path, optimizer: str) -> None:
    a = _run(root, f"{optimizer}-a", optimizer=optimizer, budget=8, population=4, seed=3)
    b = _run(root, f"{optimizer}-b", optimizer=optimizer, budget=8, population=4, seed=3)
    c = _run(root, f"{optimizer}-c", optimizer=optimizer, budget=8, population=4, seed=4)
    assert _trace(a) == _trace(b)
    assert _trace(a) != _trace(c)
    for r in a["history"]:
        assert all(0.0 <= v <= 2.0 for v in r["point"].values())


def test_resume_after_a_kill_reaches_the_uninterrupted_result(root: Path) -> None:
    full = _run(root, "full", budget=14, population=4)
    cfg = parse_search_config(h.search_config(root, output_dir=str(root / "killed"), budget=14, population=4))
    # killed mid-way through generation 2: the default point + 4 + 2 candidates are stored
    stopped = run_search(cfg, log=quiet, force=True, stop_after=7)
    assert stopped["stopped"] and stopped["evaluations"] == 6
    assert not (root / "killed" / "history.json").exists()  # no final test yet
    with pytest.raises(FileExistsError, match="--resume"):
        run_search(cfg, log=quiet)
    resumed = run_search(cfg, log=quiet, resume=True)
    assert resumed["seconds"]["new_evaluations"] == 14 - 6
    assert _trace(resumed) == _trace(full)
    assert resumed["best"]["point"] == full["best"]["point"]
    assert resumed["best"]["test"] == full["best"]["test"]
    # a history made by another search is refused
    other = parse_search_config(h.search_config(root, output_dir=str(root / "killed"), budget=14, seed=9))
    with pytest.raises(ValueError, match="different search"):
        run_search(other, log=quiet, resume=True)


def test_no_test_data_during_the_search(root: Path, tmp_path: Path) -> None:
    log = tmp_path / "calls.txt"
    budget = 10
    options = {"targets": str(root / "targets.safetensors"), "log": str(log), "validation_calls": budget + 1}
    # the guard works: asking for test data before the search ended fails
    with pytest.raises(AssertionError, match="during the search"):
        h.guarded_score({}, split="test", targets="", log=str(tmp_path / "empty.txt"), validation_calls=1)
    s = _run(
        root,
        "guarded",
        budget=budget,
        population=4,
        evaluator={"python": "search_helpers:guarded_score", "options": options},
    )
    calls = log.read_text().splitlines()
    assert calls[: budget + 1] == ["validation"] * (budget + 1)  # the default point + the candidates
    assert calls[budget + 1 :] == ["test", "test"]  # the chosen point and the default point, once each
    assert s["best"]["test"]["neg_sq_error"] < 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"space": [{"param": "wieght", "low": 0, "high": 1}]},
            "no parameter 'wieght'.*did you mean 'weight'",
        ),
        (
            {"space": [{"param": "lambda", "per_model": True, "low": 0, "high": 1}]},
            "one value for all models",
        ),
        ({"space": [{"param": "weight", "low": 1, "high": 0}]}, "low .* must be below high"),
        ({"space": [{"param": "weight", "values": [0.5, 1.0]}]}, "cma searches numeric ranges only"),
        ({"optimizer": "bayes"}, "search.optimizer"),
        ({"evaluator": {"python": "x:y", "benchmark": "demo"}}, "exactly one of"),
        ({"budget": 0}, "search.budget"),
        ({"colour": 1}, "search.colour: unknown key"),
    ],
)
def test_config_errors_name_the_key(root: Path, change: dict, message: str) -> None:
    data = h.search_config(root)
    data["search"].update(change)  # type: ignore[union-attr]
    with pytest.raises(SearchConfigError, match=message):
        parse_search_config(data)


def test_method_bounds_and_objective_are_checked(root: Path) -> None:
    data = h.search_config(root)
    data["merge_method"] = "ties"
    data["search"]["space"] = [{"param": "density", "low": 0.1, "high": 1.5}]  # type: ignore[index]
    with pytest.raises(SearchConfigError, match="density"):
        parse_search_config(data)
    data = h.search_config(root, objective="accuracy", output_dir=str(root / "obj"))
    with pytest.raises(ValueError, match=r"objective .accuracy. is not among the scores.*neg_sq_error"):
        run_search(parse_search_config(data), log=quiet, force=True)
    data = h.search_config(root, evaluator={"python": "search_helpers:no_such_function"})
    with pytest.raises(ValueError, match="has no attribute 'no_such_function'"):
        run_search(parse_search_config(data), log=quiet, force=True)


def test_cli_search_end_to_end(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = h.search_config(root, output_dir="out", budget=6, population=3)
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(data))
    assert main(["search", str(tmp_path / "search.yaml"), "-q", "--budget", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["evaluations"] == 4 and set(printed["best"]) == {f"weight[expert_{i}]" for i in range(3)}
    assert (tmp_path / "out" / "best.yaml").exists()  # output_dir is relative to the config file
    assert main(["search", str(tmp_path / "search.yaml"), "-q"]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "search.yaml"), "-q", "--resume"]) == 0  # budget 6 now: 2 more
    assert json.loads(capsys.readouterr().out)["evaluations"] == 6
