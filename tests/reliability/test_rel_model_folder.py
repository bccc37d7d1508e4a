"""Medium: untrusted model folders. Symlinked tokenizer / config files that lead out of the folder
are never copied (a warning names them), a link to a directory never crashes, links inside the
folder and Hugging Face cache snapshots still work; an expert without lm_head whose config says
tie_word_embeddings: false is refused, not silently tied."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rel_fixtures import CONFIG, family, run_cli, save_model, state_dict, write_cfg


def _merge(tmp_path: Path, base: Path, experts: list[Path], capsys):  # type: ignore[no-untyped-def]
    cfg = write_cfg(tmp_path / "c.yaml", "task_arithmetic", base, experts, {"weight": 0.5})
    return run_cli(["merge", str(cfg), str(tmp_path / "out"), "-q"], capsys)


def test_tokenizer_links_out_of_the_folder_are_not_copied(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base, experts = family(tmp_path / "m", 2)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN=abc")
    os.symlink(secret, base / "tokenizer.json")
    os.symlink("/etc", base / "additional_chat_templates")  # a link to a directory
    os.symlink("/proc/self/environ", base / "vocab.txt")
    (base / "tokenizer_config.json").write_text("{}")
    os.symlink("tokenizer_config.json", base / "special_tokens_map.json")  # inside: copied as a file
    rc, err = _merge(tmp_path, base, experts, capsys)
    assert rc == 0, err
    out = tmp_path / "out"
    assert not (out / "tokenizer.json").exists() and not (out / "vocab.txt").exists()
    assert not (out / "additional_chat_templates").exists()
    assert (out / "tokenizer_config.json").read_text() == "{}"
    sp = out / "special_tokens_map.json"
    assert sp.is_file() and not sp.is_symlink() and sp.read_text() == "{}"
    assert "tokenizer.json" in err and "outside the model folder" in err and "Traceback" not in err
    assert "TOKEN=abc" not in "".join(p.read_text(errors="replace") for p in out.iterdir() if p.is_file())


def test_links_inside_a_template_dir(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base, experts = family(tmp_path / "m", 2)
    d = base / "additional_chat_templates"
    d.mkdir()
    (d / "a.jinja").write_text("A")
    os.symlink("/etc/passwd", d / "b.jinja")
    os.symlink("/etc", d / "sub")
    rc, err = _merge(tmp_path, base, experts, capsys)
    assert rc == 0, err
    got = sorted(p.name for p in (tmp_path / "out" / "additional_chat_templates").iterdir())
    assert got == ["a.jinja"]


def test_hf_cache_snapshot_links_are_followed(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """models--org--name/snapshots/<rev>/tokenizer.json -> ../../blobs/<sha>: the cache's own layout."""
    repo = tmp_path / "models--org--base"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    save_model(snap, state_dict(0))
    (blobs / "f00d").write_text('{"version": "1.0"}')
    os.symlink("../../blobs/f00d", snap / "tokenizer.json")
    _b, experts = family(tmp_path / "m", 2)
    rc, err = _merge(tmp_path, snap, experts, capsys)
    assert rc == 0, err
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'


def test_config_link_out_of_the_folder_is_refused(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base, experts = family(tmp_path / "m", 2)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model_type": "x", "api_key": "s3cr3t"}))
    (experts[0] / "config.json").unlink()
    os.symlink(other, experts[0] / "config.json")
    rc, err = _merge(tmp_path, base, experts, capsys)
    assert rc == 1 and "outside the model folder" in err, err


def test_untied_expert_without_lm_head_is_refused(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base, experts = family(tmp_path / "m", 2)
    sd = state_dict(9)
    del sd["lm_head.weight"]
    save_model(tmp_path / "nohead", sd, config={**CONFIG, "tie_word_embeddings": False})
    rc, err = _merge(tmp_path, base, [experts[0], tmp_path / "nohead"], capsys)
    assert rc == 1, err
    assert "lacks tensor 'lm_head.weight'" in err and "tie_word_embeddings: false" in err
    assert not (tmp_path / "out").exists()


def test_tied_expert_without_lm_head_still_merges(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base, experts = family(tmp_path / "m", 2)
    sd = state_dict(9)
    del sd["lm_head.weight"]
    save_model(tmp_path / "tied", sd, config={**CONFIG, "tie_word_embeddings": True})
    rc, err = _merge(tmp_path, base, [experts[0], tmp_path / "tied"], capsys)
    assert rc == 0, err
