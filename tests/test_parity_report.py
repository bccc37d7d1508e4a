"""scripts/parity_report.py: the quick report passes, covers every registered method, and fails on a
difference beyond tolerance, a reference that errors or a method left out."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import require
from weightmerge.methods.registry import METHODS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "parity_report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("parity_report", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.mark.slow  # every method against its reference
def test_quick_report_passes_and_covers_every_method(report, tmp_path, capsys):
    require("mergekit.merge_methods.api")
    path = tmp_path / "parity.json"
    assert report.main(["--quick", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["ok"] and not data["errors"]
    assert all(not r["failures"] and r["cases"] > 0 for r in data["rows"])
    assert set(report.NO_REFERENCE) <= set(METHODS)
    reported = {r["method"] for r in data["rows"]}
    missing = set(METHODS) - reported - set(report.NO_REFERENCE)
    assert not missing, f"methods neither in the report nor in NO_REFERENCE: {sorted(missing)}"
    for m in reported:
        assert f"| {m} |" in out


def _one_ulp_off(report):
    def group(rep, quick):
        one = torch.tensor([1.0, 2.0])
        rep.tensors("linear", "fake", torch.float32, one, torch.nextafter(one, one + 1), report.EXACT, "c")

    return group


def _raises(report):
    def group(rep, quick):
        raise RuntimeError("reference broke")

    return group


def _nothing(report):
    return lambda rep, quick: None


@pytest.mark.parametrize(
    ("make_group", "expected"),
    [(_one_ulp_off, "1 case(s) beyond tolerance"), (_raises, "reference broke"), (_nothing, "'linear'")],
)
def test_failures_exit_1(report, monkeypatch, capsys, make_group, expected):
    monkeypatch.setattr(report, "GROUPS", [make_group(report)])
    monkeypatch.setattr(report, "NO_REFERENCE", {m: "-" for m in METHODS if m != "linear"})
    assert report.main([]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and expected in out


def test_tolerances(report):
    x = torch.tensor([1.0, -3.0])
    up = torch.nextafter(x, x * 2)
    assert report.compare(x, x.clone(), report.EXACT)[2]
    assert not report.compare(x, up, report.EXACT)[2]
    assert not report.compare(x, x.double(), report.EXACT)[2]  # exact also means the same dtype
    diff, ulps, ok, _ = report.compare(up, x, report.ulp(1))
    assert ok and diff == pytest.approx(2.0**-22) and ulps == pytest.approx(1.0)
    assert not report.compare(x + 1e-5, x, report.close(1e-6))[2]
    assert report.compare(x + 1e-5, x, report.close(0.0, 1e-4))[2]
