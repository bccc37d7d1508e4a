"""High/medium: every name in an EMR artifact's manifest is hostile. Absolute, ``..`` and
symlink-escaping names, files used without a sha256, bad rescalers and a non-float compute dtype
are refused by load, ``verify`` and ``materialize``; no outside file is ever copied."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rel_fixtures import family, run_cli, write_cfg

from weightmerge.emr import ArtifactError, load_emr


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("emr")
    base, experts = family(root / "models", 2)
    cfg = write_cfg(root / "emr.yaml", "emr", base, experts)
    from weightmerge.cli import main

    assert main(["merge", str(cfg), str(root / "art"), "-q"]) == 0
    return root, base


def tampered(root: Path, tmp_path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    import shutil

    art = tmp_path / "art"
    shutil.copytree(root / "art", art, symlinks=True)
    m = json.loads((art / "emr_manifest.json").read_text())
    edit(m, art)
    (art / "emr_manifest.json").write_text(json.dumps(m))
    return art


def _config_to(target: str):  # type: ignore[no-untyped-def]
    def edit(m: dict, art: Path) -> None:
        m["per_task"][0]["config"] = target

    return edit


def _config_listed(target: str):  # type: ignore[no-untyped-def]
    """The hostile name also listed in 'files' with the right size and sha256 of the target."""

    def edit(m: dict, art: Path) -> None:
        import hashlib

        data = Path(target if os.path.isabs(target) else art / target).read_bytes()
        m["per_task"][0]["config"] = target
        m["files"][target] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    return edit


def _symlinked_config(m: dict, art: Path) -> None:
    os.symlink("/etc/passwd", art / "evil.json")
    import hashlib

    data = Path("/etc/passwd").read_bytes()
    m["per_task"][0]["config"] = "evil.json"
    m["files"]["evil.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _unlisted_config(m: dict, art: Path) -> None:
    (art / "own.json").write_text("{}")
    m["per_task"][0]["config"] = "own.json"


def _mask_abs(m: dict, art: Path) -> None:
    m["mask_files"][0] = str(art / m["mask_files"][0])


def _unified_dotdot(m: dict, art: Path) -> None:
    for t in m["tensors"].values():
        t["file"] = "../art/" + t["file"]


def _no_sha(m: dict, art: Path) -> None:
    del m["files"][m["mask_files"][0]]["sha256"]


def _rescaler(value: object):  # type: ignore[no-untyped-def]
    def edit(m: dict, art: Path) -> None:
        m["rescalers"][0] = value

    return edit


def _compute_bool(m: dict, art: Path) -> None:
    m["compute_dtype"] = "bool"


def _deep(m: dict, art: Path) -> None:
    pass  # replaced below by raw text


CASES = {
    "config_etc_passwd": (_config_to("/etc/passwd"), "outside the artifact"),
    "config_environ_listed": (_config_listed("/proc/self/environ"), "outside the artifact"),
    "config_dotdot": (_config_to("../secret"), "outside the artifact"),
    "config_symlink_escape": (_symlinked_config, "leads outside"),
    "config_without_sha256": (_unlisted_config, "not listed with a sha256"),
    "mask_absolute": (_mask_abs, "outside the artifact"),
    "unified_dotdot": (_unified_dotdot, "outside the artifact"),
    "file_record_without_sha256": (_no_sha, "no valid bytes/sha256"),
    "rescaler_nan": (_rescaler("NaN"), "not a finite non-negative"),
    "rescaler_inf": (_rescaler("Infinity"), "not a finite non-negative"),
    "rescaler_negative": (_rescaler(-0.5), "not a finite non-negative"),
    "compute_dtype_bool": (_compute_bool, "not a floating dtype"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_manifest_is_refused(artifact, tmp_path: Path, case: str, capsys) -> None:  # type: ignore[no-untyped-def]
    root, base = artifact
    (tmp_path / "secret").write_text("SECRET=1")
    edit, message = CASES[case]
    art = tampered(root, tmp_path, edit)
    with pytest.raises(ArtifactError, match=message):
        load_emr(art)
    for argv in (["emr", "verify", str(art)], ["emr", "info", str(art)]):
        rc, err = run_cli(argv, capsys)
        assert rc == 1 and message in err, (argv, err)
        assert len(err) < 600
    out = tmp_path / "out"
    rc, err = run_cli(
        ["emr", "materialize", str(art), "--task", "expert0", str(out), "--base", str(base)], capsys
    )
    assert rc == 1 and message in err, err
    assert not out.exists()


def test_deeply_nested_manifest_is_one_line(artifact, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    root, _base = artifact
    art = tampered(root, tmp_path, lambda m, a: None)
    (art / "emr_manifest.json").write_text("[" * 100000 + "]" * 100000)
    rc, err = run_cli(["emr", "verify", str(art)], capsys)
    assert rc == 1 and "weightmerge: error:" in err and "Traceback" not in err
    assert len(err) < 600


def test_untampered_artifact_materializes_with_its_own_files_only(artifact, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    root, base = artifact
    rc, err = run_cli(["emr", "verify", str(root / "art")], capsys)
    assert rc == 0, err
    out = tmp_path / "out"
    rc, err = run_cli(["emr", "materialize", str(root / "art"), "--task", "expert1", str(out)], capsys)
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())


def test_tampered_task_config_is_refused_by_sha256(artifact, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A per-task config listed with its sha256 whose bytes were changed afterwards."""
    import hashlib

    root, base = artifact

    def edit(m: dict, art: Path) -> None:
        data = b'{"model_type": "toy"}\n'
        (art / "task-000.config.json").write_bytes(data)
        m["per_task"][0]["config"] = "task-000.config.json"
        m["files"]["task-000.config.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    art = tampered(root, tmp_path, edit)
    (art / "task-000.config.json").write_bytes(b'{"model_type": "toz"}\n')  # same size, other bytes
    rc, err = run_cli(["emr", "verify", str(art)], capsys)
    assert rc == 1 and "corrupted" in err, err
    out = tmp_path / "out"
    rc, err = run_cli(
        ["emr", "materialize", str(art), "--task", "expert0", str(out), "--base", str(base)], capsys
    )
    assert rc == 1 and "corrupted" in err, err
    assert not out.exists()
