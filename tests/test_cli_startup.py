"""The command line answers ``--help``, ``--version`` and config errors found before a method is
looked up without importing torch, numba or transformers; every command answers correctly; a real
merge through the same entry point still works once they are imported on first use."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from ckpt_fixtures import fast_family
from weightmerge.api import merge_state_dicts

REPO = Path(__file__).resolve().parents[1]

# Runs each command in one fresh interpreter, in order, and reports after each which heavy
# packages are really imported (their C core / internals in sys.modules: not a stand-in).
RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from weightmerge.cli import main
    HEAVY = ("torch._C", "numba.core", "transformers.utils", "transformers.models")
    out = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()) as o, contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code
        out.append({"argv": argv, "rc": rc, "stdout": o.getvalue(), "stderr": err.getvalue(),
                     "heavy": [m for m in HEAVY if m in sys.modules]})
    print(json.dumps(out))
    """
)


def _run_all(cases: list[list[str]], cwd: Path) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(cases)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_commands_without_data_do_not_import_torch(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "out").mkdir()
    good = tmp_path / "good.yaml"
    good.write_text(
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n"
        "parameters:\n  density: [0.2, 0.8]\n  weight: 1.0\n"
    )
    (tmp_path / "typo.yaml").write_text("merge_method: ties\nbase_model: base\nmodel:\n  - model: a\n")
    (tmp_path / "param.yaml").write_text(good.read_text().replace("density:", "densty:"))
    (tmp_path / "missing.yaml").write_text(good.read_text().replace("model: a", "model: nowhere"))
    cases = [  # the ones that need no method spec first: the runner shares one interpreter
        ["--help"],
        ["--version"],
        ["methods", "--help"],
        ["validate", "no-such.yaml"],
        ["validate", "typo.yaml"],
        ["methods"],
        ["methods", "slerp", "--json"],
        ["validate", "good.yaml"],
        ["validate", "param.yaml"],
        ["plan", "missing.yaml"],
        ["merge", "missing.yaml", "out2"],
        ["methods", "no_such_method"],
    ]
    results = _run_all(cases, tmp_path)
    by = {" ".join(r["argv"]): r for r in results}
    # Commands that need no method spec never import torch. Those that read a method's spec
    # (methods, validate of a whole config, path checks after it) import it today: methods/base.py
    # imports weightmerge.io.output, whose safetensors dtype table is built from torch at import.
    no_spec = {"--help", "--version", "methods --help", "validate no-such.yaml", "validate typo.yaml"}
    for r in results:
        if " ".join(r["argv"]) in no_spec:
            assert r["heavy"] == [], f"{r['argv']} imported {r['heavy']}"
    assert by["--version"]["rc"] == 0 and "weightmerge" in by["--version"]["stdout"]
    assert by["--help"]["rc"] == 0 and "merge" in by["--help"]["stdout"]
    assert by["methods"]["rc"] == 0 and "slerp:" in by["methods"]["stdout"]
    helptext = by["methods --help"]["stdout"]
    assert by["methods --help"]["rc"] == 0 and "METHOD" in helptext and ", }" not in helptext
    assert json.loads(by["methods slerp --json"]["stdout"])[0]["name"] == "slerp"
    assert by["validate good.yaml"]["rc"] == 0 and "OK" in by["validate good.yaml"]["stdout"]
    assert "config file not found" in by["validate no-such.yaml"]["stderr"]
    assert "unknown key 'model'" in by["validate typo.yaml"]["stderr"]
    assert "did you mean 'density'" in by["validate param.yaml"]["stderr"]
    for cmd in ("plan missing.yaml", "merge missing.yaml out2"):
        assert by[cmd]["rc"] == 1 and "not found:" in by[cmd]["stderr"] and "nowhere" in by[cmd]["stderr"]
    assert (
        by["methods no_such_method"]["rc"] == 1
        and "unknown merge method" in by["methods no_such_method"]["stderr"]
    )


def test_merge_through_the_entry_point_imports_on_first_use(tmp_path: Path) -> None:
    base, dirs = fast_family(tmp_path, 2, num_hidden_layers=2, layout="single")
    cfg = tmp_path / "ties.yaml"
    cfg.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {dirs[0]}\n  - model: {dirs[1]}\n"
        "parameters:\n  density: 0.5\n  weight: 1.0\n"
    )
    [r] = _run_all([["merge", str(cfg), str(tmp_path / "out")]], tmp_path)
    assert r["rc"] == 0, r["stderr"]
    assert "torch._C" in r["heavy"]  # the merge did import torch, at first use
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    sds = [load_file(str(d / "model.safetensors")) for d in (base, *dirs)]
    expected = merge_state_dicts(sds[0], sds[1:], "ties", {"density": 0.5, "weight": 1.0})
    assert sorted(ours) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(ours[name], t), name
    card = (tmp_path / "out" / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model" not in front and str(tmp_path) not in front  # local folders are not Hub ids


def test_model_card_lists_hub_ids_only() -> None:
    from weightmerge.engine.card import model_card
    from weightmerge.methods.registry import get_method

    card = model_card(
        method=get_method("linear"),
        base_model="/abs/local/base",
        models=["org/model-a", "/abs/local/b", "relative/but-not-a-folder-here"],
        resolved_config={},
    )
    front = card.split("---")[1]
    assert "org/model-a" in front and "relative/but-not-a-folder-here" in front
    assert "/abs/local" not in front


def test_inspect_recognises_an_emr_artifact(tmp_path: Path, capsys) -> None:
    from weightmerge.cli import main

    base, dirs = fast_family(tmp_path, 2, num_hidden_layers=1, layout="single")
    cfg = tmp_path / "emr.yaml"
    cfg.write_text(
        f"merge_method: emr\nbase_model: {base}\nmodels:\n  - model: {dirs[0]}\n  - model: {dirs[1]}\n"
    )
    assert main(["merge", "-q", str(cfg), str(tmp_path / "art")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "art")]) == 0
    out = capsys.readouterr().out
    assert "EMR artifact" in out and "rescaler" in out


def test_numba_notice_only_without_a_cache(tmp_path: Path, monkeypatch) -> None:
    from weightmerge.kernels import _compiled_before

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    mod = tmp_path / "_numba_kernels.py"
    mod.write_text("")
    assert not _compiled_before(str(mod))
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "_numba_kernels.ties_merge-67.py311.nbi").write_bytes(b"")
    assert _compiled_before(str(mod))


def test_demo_threads_follow_the_load() -> None:
    from weightmerge.cli.demo import choose_threads

    assert choose_threads(2, load=0.1, cores=2) == 2
    assert choose_threads(2, load=1.2, cores=2) == 1
    assert choose_threads(2, load=16.0, cores=2) == 1
    assert choose_threads(4, load=2.0, cores=16) == 4
