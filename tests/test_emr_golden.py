"""The EMR artifact format (version 1, docs/emr-artifact.md) frozen: the bytes written for a fixed
tiny input are compared with checked-in sha256 digests, and the same files are checked
independently of weightmerge's code: read back with the ``safetensors`` library, headers parsed by
hand (length prefix, compact JSON padded with spaces to 8 bytes, contiguous sorted data), mask
bits unpacked by hand (element k = bit k % 8 of byte k // 8)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from weightmerge import merge_state_dicts
from weightmerge.emr import write_emr_artifact

TASKS = ["alpha", "beta"]

# sha256 of each file; a change here is a change of the artifact format (bump FORMAT_VERSION).
GOLDEN = {  # written by weightmerge at 230febd (before the format module was shared with io/)
    "emr_manifest.json": "4a23c2aef917f14e1bc777aa6881eee026eb7218e9dfe3a7d120c513451d0425",
    "masks-000.safetensors": "491a8e0665cfbd2cea9be67b9df38208e5f211ea868fc5ae8c1f6327c80ea64a",
    "masks-001.safetensors": "f92ac13db13e0bba3d01829b100585d51362551d6501e3313149226b08be7874",
    "task-000.safetensors": "2a06dd1cd61822f04ffa105f280a6a77bf9b450e547fdc2bcdf952485351431c",
    "task-001.safetensors": "4e26b12c415b1b03f45d44213611aeb184734731b520afe9aea4572dc5e4aee8",
    "unified.safetensors": "9b2925ac5ab6c053ba2f8e7a3d167d624ac7b8d8b8278d33a299bd266cccc165",
}


def _inputs() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Exact binary fractions (no random generator), with ties and zeros among the task vectors."""
    base = {
        "a.weight": (torch.arange(15, dtype=torch.float32).reshape(3, 5) - 7) / 8,
        "b.bias": torch.tensor([0.5, -0.25, 0.0, 1.0, 2.0, -1.5, 0.125, 3.0, -2.0, 0.75, 0.0]),
        "c.scale": torch.tensor(1.5),
        "ids": torch.arange(4),
    }
    steps = [
        {"a.weight": 0.25, "b.bias": -0.125, "c.scale": 0.5},
        {"a.weight": -0.5, "b.bias": 0.375, "c.scale": 0.5},
    ]
    experts = []
    for i, step in enumerate(steps):
        e = {}
        for k, v in base.items():
            if not v.is_floating_point():
                e[k] = v.clone()
                continue
            pattern = torch.remainder(torch.arange(v.numel()) + i, 3).to(torch.float32).reshape(v.shape) - 1
            e[k] = v + step[k] * pattern
        experts.append(e)
    return base, experts


def _write(out: Path) -> tuple[Path, object]:
    base, experts = _inputs()
    res = merge_state_dicts(base, experts, "emr")
    heads = {
        t: {"head.weight": torch.full((2, 3), float(i + 1), dtype=torch.float16)} for i, t in enumerate(TASKS)
    }
    write_emr_artifact(res, out, TASKS, per_task=heads, fsync=False)
    return out, res


def _header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n]
    assert n % 8 == 0 and text.rstrip(b" ") == text.rstrip(b" ").strip(), path.name
    body = text.rstrip(b" ")
    assert len(text) - len(body) < 8 and body.startswith(b"{")
    header = json.loads(body)
    assert json.dumps(header, separators=(",", ":")).encode() == body, "not compact JSON"
    return header, 8 + n


def _check_layout(path: Path, header: dict, data_start: int) -> None:
    """Data offsets contiguous, in sorted name order, covering the rest of the file exactly."""
    names = [k for k in header if k != "__metadata__"]
    assert names == sorted(names), path.name
    end = 0
    for k in names:
        b, e = header[k]["data_offsets"]
        assert b == end, (path.name, k)
        end = e
    assert data_start + end == path.stat().st_size, path.name


def test_emr_artifact_bytes_are_frozen(tmp_path: Path) -> None:
    out, _ = _write(tmp_path / "art")
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
    assert got == GOLDEN


def test_emr_artifact_files_read_independently(tmp_path: Path) -> None:
    out, res = _write(tmp_path / "art")
    assert 0 < sum(int(m.sum()) for masks in res.masks for m in masks.values()) < 2 * 27  # not trivial
    manifest = json.loads((out / "emr_manifest.json").read_text())
    assert manifest["format"] == "weightmerge-emr" and manifest["format_version"] == 1
    assert manifest["tasks"] == TASKS and manifest["mask_bit_order"] == "little"
    assert manifest["rescalers"] == res.rescalers
    for f, meta in manifest["files"].items():
        assert hashlib.sha256((out / f).read_bytes()).hexdigest() == meta["sha256"]
        assert (out / f).stat().st_size == meta["bytes"]

    header, start = _header(out / "unified.safetensors")
    _check_layout(out / "unified.safetensors", header, start)
    assert header["__metadata__"] == {"format": "weightmerge-emr", "content": "unified task vector"}
    assert sorted(k for k in header if k != "__metadata__") == ["a.weight", "b.bias", "c.scale"]
    with safe_open(str(out / "unified.safetensors"), framework="pt") as f:
        for k in ("a.weight", "b.bias", "c.scale"):
            assert header[k]["dtype"] == "F32" and header[k]["shape"] == list(res.unified[k].shape)
            assert torch.equal(f.get_tensor(k), res.unified[k]), k

    for i, task in enumerate(TASKS):
        path = out / f"masks-{i:03d}.safetensors"
        header, start = _header(path)
        _check_layout(path, header, start)
        assert header["__metadata__"] == {
            "format": "weightmerge-emr",
            "content": "mask",
            "task": task,
            "bit_order": "little",
        }
        with safe_open(str(path), framework="pt") as f:
            for k, mask in res.masks[i].items():
                packed = f.get_tensor(k)
                assert header[k]["dtype"] == "U8" and packed.shape == ((mask.numel() + 7) // 8,)
                bits = [(int(packed[j // 8]) >> (j % 8)) & 1 for j in range(8 * packed.numel())]
                flat = mask.reshape(-1).tolist()
                assert bits[: len(flat)] == [int(b) for b in flat], (task, k)
                assert not any(bits[len(flat) :]), "padding bits must be 0"

        path = out / f"task-{i:03d}.safetensors"
        header, start = _header(path)
        _check_layout(path, header, start)
        with safe_open(str(path), framework="pt") as f:
            assert torch.equal(
                f.get_tensor("head.weight"), torch.full((2, 3), float(i + 1), dtype=torch.float16)
            )
