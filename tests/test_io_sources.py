"""Reading every checkpoint layout: round trips (bit-exact, whole tensors and row slices),
header-only info, and clear errors for corrupted or inconsistent checkpoints."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from io_fixtures import LAYOUTS, mixed_state_dict, raw_safetensors, save_layout
from weightmerge.io import TensorSource, detect_layout, open_source, tied_weights
from weightmerge.io.safetensors_io import SafetensorsFile
from weightmerge.io.torchbin import UnsafeCheckpointError


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_every_layout(tmp_path: Path, layout: str) -> None:
    sd = mixed_state_dict()
    path = save_layout(sd, tmp_path / "ckpt", layout, config={"architectures": ["X"], "model_type": "x"})
    src = open_source(path)
    try:
        assert isinstance(src, TensorSource)
        assert src.keys() == sorted(sd)
        assert src.config == {"architectures": ["X"], "model_type": "x"}
        for name, t in sd.items():
            info = src.info(name)
            assert (info.shape, info.dtype, info.name) == (tuple(t.shape), t.dtype, name)
            assert info.nbytes == t.numel() * t.element_size()
            assert _bits_equal(src.read(name), t), name
            if t.dim() >= 1:
                n = t.shape[0]
                for start, stop in [(0, n), (0, 0), (n, n), (min(1, n), max(min(1, n), n - 1)), (n // 2, n)]:
                    got = src.read(name, (start, stop))
                    assert _bits_equal(got, t[start:stop]), (name, start, stop)
    finally:
        src.close()


def test_detect_layout_names(tmp_path: Path) -> None:
    sd = {"w": torch.ones(2)}
    kinds = {}
    for layout in ("single", "sharded", "bin", "sharded_bin"):
        kinds[layout] = detect_layout(str(save_layout(sd, tmp_path / layout, layout))).kind
    assert kinds == {
        "single": "safetensors",
        "sharded": "sharded-safetensors",
        "bin": "torch-bin",
        "sharded_bin": "sharded-torch-bin",
    }
    # an index file named directly
    idx = tmp_path / "sharded" / "model.safetensors.index.json"
    src = open_source(idx)
    assert src.keys() == ["w"]
    src.close()


def test_directory_prefers_single_safetensors_like_transformers(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    src = open_source(tmp_path)
    assert torch.equal(src.read("w"), torch.zeros(2))


def test_no_checkpoint_in_directory_names_what_it_found(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "consolidated.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"consolidated\.safetensors"):
        open_source(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(tmp_path / "nope.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_source(tmp_path / "weights.npz")


def test_info_touches_no_tensor_data(tmp_path: Path) -> None:
    """Header-only: zeroing the whole data buffer changes nothing info() reports."""
    sd = mixed_state_dict()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    before = SafetensorsFile(str(path))
    names = before.keys()
    infos = {k: before.info(k) for k in names}
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    raw = bytearray(path.read_bytes())
    raw[8 + n :] = bytes(len(raw) - 8 - n)
    path.write_bytes(bytes(raw))
    after = SafetensorsFile(str(path))
    assert {k: after.info(k) for k in names} == infos
    assert after.keys() == names
    assert torch.equal(after.read("a.weight"), torch.zeros(7, 5))


def test_unaligned_offsets_read_correctly(tmp_path: Path) -> None:
    """A file whose float32 data starts at an odd offset (hand-made) still reads bit-exactly."""
    t = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 7
    u8 = torch.tensor([1, 2, 3], dtype=torch.uint8)
    header = {
        "u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "t": {"dtype": "F32", "shape": [4, 3], "data_offsets": [3, 51]},
    }
    data = u8.numpy().tobytes() + t.numpy().tobytes()
    src = SafetensorsFile(str(raw_safetensors(tmp_path / "odd.safetensors", header, data)))
    assert torch.equal(src.read("t"), t)
    assert torch.equal(src.read("t", (1, 3)), t[1:3])
    assert torch.equal(src.read("u"), u8)


def test_read_returns_independent_of_close(tmp_path: Path) -> None:
    save_file({"w": torch.arange(6.0)}, str(tmp_path / "m.safetensors"))
    src = SafetensorsFile(str(tmp_path / "m.safetensors"))
    t = src.read("w")
    src.close()  # tensors still alive keep the map open
    assert torch.equal(t, torch.arange(6.0))


def test_bad_rows_and_names(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(4, 2), "s": torch.tensor(1.0)}, str(tmp_path / "m.safetensors"))
    src = open_source(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"rows \(2, 5\) out of range for tensor 'w'"):
        src.read("w", (2, 5))
    with pytest.raises(ValueError, match=r"'s' is 0-d"):
        src.read("s", (0, 1))
    with pytest.raises(KeyError, match="nope"):
        src.info("nope")


# ---- corrupted safetensors ----------------------------------------------------------------------


def _good_header() -> tuple[dict, bytes]:
    t = torch.arange(6, dtype=torch.float32)
    return {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, t.numpy().tobytes()


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda h, d: (h, d[:10]), r"truncated: tensor 'w' ends at byte"),
        (lambda h, d: ({"w": {**h["w"], "dtype": "F4"}}, d), r"tensor 'w' has unsupported dtype 'F4'"),
        (lambda h, d: ({"w": {**h["w"], "shape": [2, 2]}}, d), r"tensor 'w' .* needs 16 bytes"),
        (lambda h, d: ({"w": {**h["w"], "shape": [2, -3]}}, d), r"tensor 'w' has an invalid shape"),
        (
            lambda h, d: ({"w": {**h["w"], "data_offsets": [24, 0]}}, d),
            r"tensor 'w' has invalid data_offsets",
        ),
        (
            lambda h, d: (
                {**h, "v": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}},
                d,
            ),
            r"tensors 'w' and 'v' overlap",
        ),
    ],
)
def test_corrupted_header_entries(tmp_path: Path, mutate, pattern: str) -> None:
    header, data = mutate(*_good_header())
    path = raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ValueError, match=pattern) as err:
        open_source(path)
    assert "bad.safetensors" in str(err.value)


def test_corrupted_header_framing(tmp_path: Path) -> None:
    header, data = _good_header()
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match=r"short\.safetensors: truncated: 2 bytes"):
        open_source(p)
    p = raw_safetensors(tmp_path / "len.safetensors", header, data, header_len=10**6)
    with pytest.raises(ValueError, match=r"len\.safetensors: header length 1000000 does not fit"):
        open_source(p)
    p = tmp_path / "json.safetensors"
    p.write_bytes((5).to_bytes(8, "little") + b"{oops" + data)
    with pytest.raises(ValueError, match=r"json\.safetensors: header is not valid JSON"):
        open_source(p)
    p = tmp_path / "cut.safetensors"
    good = raw_safetensors(tmp_path / "good.safetensors", header, data).read_bytes()
    p.write_bytes(good[:20])  # cut inside the header
    with pytest.raises(ValueError, match=r"cut\.safetensors: header length \d+ does not fit"):
        open_source(p)


# ---- sharded inconsistencies -------------------------------------------------------------------


def _sharded(tmp_path: Path, layout: str = "sharded") -> tuple[Path, dict]:
    sd = {
        "a": torch.ones(2),
        "b": torch.zeros(3),
        "c": torch.arange(4.0),
        "d": torch.ones(1),
    }  # a, d share a shard
    root = save_layout(sd, tmp_path / "ck", layout)
    name = "model.safetensors.index.json" if layout == "sharded" else "pytorch_model.bin.index.json"
    return root / name, json.loads((root / name).read_text())


@pytest.mark.parametrize("layout", ["sharded", "sharded_bin"])
def test_index_names_missing_shard(tmp_path: Path, layout: str) -> None:
    idx, index = _sharded(tmp_path, layout)
    index["weight_map"]["b"] = "gone.safetensors"
    idx.write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"names shard 'gone\.safetensors' \(e\.g\. for tensor 'b'\)"):
        open_source(idx.parent)


def test_index_lists_tensor_absent_from_its_shard(tmp_path: Path) -> None:
    idx, index = _sharded(tmp_path)
    index["weight_map"]["zz"] = index["weight_map"]["a"]
    idx.write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match=r"lists tensor 'zz' in shard 'model-00001-of-00003\.safetensors'.*lacks"
    ):
        open_source(idx.parent)


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    idx, _ = _sharded(tmp_path)
    save_file({"b": torch.zeros(3), "a": torch.ones(2)}, str(idx.parent / "model-00002-of-00003.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'a' is stored twice"):
        open_source(idx.parent)


def test_tensor_in_shard_not_in_index(tmp_path: Path) -> None:
    idx, index = _sharded(tmp_path)
    del index["weight_map"]["a"]
    idx.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"tensor 'a' in shard .* is not listed in index"):
        open_source(idx.parent)


def test_bad_index_json(tmp_path: Path) -> None:
    idx, _ = _sharded(tmp_path)
    idx.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        open_source(idx.parent)
    idx.write_text(json.dumps({"weight_map": {"a": "../evil.safetensors"}}))
    with pytest.raises(ValueError, match="outside the directory"):
        open_source(idx.parent)
    idx.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="no 'weight_map'"):
        open_source(idx.parent)


# ---- torch .bin ----------------------------------------------------------------------------------


class Payload:
    """A custom class: unpickling it needs arbitrary code, so loading must be refused."""

    def __init__(self) -> None:
        self.x = 1


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "extra": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(
        UnsafeCheckpointError, match=r"refusing to load .*Payload.*convert it once to safetensors"
    ):
        open_source(tmp_path)


def test_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"w": torch.ones(2), "e": Evil()}, tmp_path / "x.bin")
    with pytest.raises(UnsafeCheckpointError):
        open_source(tmp_path / "x.bin")
    assert not marker.exists()


def test_bin_nested_state_dict_legacy_format_and_non_tensors(tmp_path: Path) -> None:
    sd = {"w": torch.arange(6.0).reshape(3, 2)}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "nested.pt")
    src = open_source(tmp_path / "nested.pt")
    assert torch.equal(src.read("w", (1, 3)), sd["w"][1:3])
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    assert torch.equal(open_source(tmp_path / "legacy.bin").read("w"), sd["w"])
    torch.save({"w": torch.ones(1), "step": 5}, tmp_path / "mixed.bin")
    with pytest.raises(ValueError, match=r"entry 'step' is a int, not a tensor"):
        open_source(tmp_path / "mixed.bin")
    (tmp_path / "trunc.bin").write_bytes((tmp_path / "nested.pt").read_bytes()[:60])
    with pytest.raises(ValueError, match=r"cannot read torch checkpoint .*trunc\.bin"):
        open_source(tmp_path / "trunc.bin")


# ---- tied embeddings ----------------------------------------------------------------------------

LLAMA_KEYS = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.up_proj.weight"]


def test_tied_weights_rules() -> None:
    with_head = [*LLAMA_KEYS, "lm_head.weight"]
    # config says tied, head absent -> read from the embedding
    assert tied_weights({"tie_word_embeddings": True}, LLAMA_KEYS) == {
        "lm_head.weight": "model.embed_tokens.weight"
    }
    # config silent, head absent -> tied
    assert tied_weights(None, LLAMA_KEYS) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert tied_weights({"model_type": "llama"}, LLAMA_KEYS) == {
        "lm_head.weight": "model.embed_tokens.weight"
    }
    # nested text_config (multimodal configs)
    assert tied_weights({"text_config": {"tie_word_embeddings": False}}, LLAMA_KEYS) == {}
    # config says untied -> nothing tied (the missing head is for the caller to report)
    assert tied_weights({"tie_word_embeddings": False}, LLAMA_KEYS) == {}
    # both stored -> two tensors
    assert tied_weights({"tie_word_embeddings": True}, with_head) == {}
    # only the head stored and tied -> the embedding is read from it (transformers swaps)
    only_head = ["lm_head.weight", "model.norm.weight", "model.layers.0.mlp.up_proj.weight"]
    assert tied_weights({"tie_word_embeddings": True}, only_head) == {
        "model.embed_tokens.weight": "lm_head.weight"
    }
    # other families
    assert tied_weights({"tie_word_embeddings": True}, ["transformer.wte.weight", "transformer.h.0.x"]) == {
        "lm_head.weight": "transformer.wte.weight"
    }
    assert tied_weights(None, ["gpt_neox.embed_in.weight"]) == {
        "embed_out.weight": "gpt_neox.embed_in.weight"
    }
    # a headless backbone (no prefix before embed_tokens) gets no head
    assert tied_weights(None, ["embed_tokens.weight", "layers.0.x"]) == {}
