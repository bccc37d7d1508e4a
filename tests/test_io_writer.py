"""The header-first sharded safetensors writer: byte layout, shard plan, index JSON, positioned
writes in any order / from threads, completeness checks, and loading by safetensors and
transformers."""

from __future__ import annotations

import itertools
import json
import random
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from io_fixtures import mixed_state_dict
from weightmerge.io import ShardedSafetensorsWriter
from weightmerge.io.writer import plan_shards


def _layout(sd: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]


def _write_all(w: ShardedSafetensorsWriter, sd: dict[str, torch.Tensor]) -> None:
    for k, v in sd.items():
        w.write(k, v)


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        part = load_file(str(f))
        assert not set(part) & set(out)
        out.update(part)
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].numel():
            assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_single_shard_equals_save_file(tmp_path: Path) -> None:
    sd = mixed_state_dict()
    with ShardedSafetensorsWriter(tmp_path, _layout(sd), shard_size=10**9) as w:
        _write_all(w, sd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    save_file(sd, str(tmp_path / "ref.st"))
    _same(load_file(str(tmp_path / "model.safetensors")), load_file(str(tmp_path / "ref.st")))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_header_is_padded_and_every_tensor_aligned(tmp_path: Path) -> None:
    sd = mixed_state_dict()
    with ShardedSafetensorsWriter(tmp_path, _layout(sd), shard_size=10**9) as w:
        _write_all(w, sd)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header.pop("__metadata__") == {"format": "pt"}
    sizes = {
        "F64": 8,
        "I64": 8,
        "F32": 4,
        "I32": 4,
        "BF16": 2,
        "F16": 2,
        "I16": 2,
        "U8": 1,
        "I8": 1,
        "BOOL": 1,
    }
    ends = []
    for name, e in header.items():
        begin, end = e["data_offsets"]
        assert (8 + n + begin) % sizes[e["dtype"]] == 0, name
        ends.append((begin, end))
    ends.sort()
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(ends))
    assert len(raw) == 8 + n + ends[-1][1]


def test_shard_plan_by_hand() -> None:
    f32 = torch.float32
    # sizes in bytes: 40, 40, 200, 8, 8, 0
    layout = [
        ("a", (10,), f32),
        ("b", (10,), f32),
        ("big", (50,), f32),
        ("c", (2,), f32),
        ("d", (2,), f32),
        ("e", (0,), f32),
    ]
    assert plan_shards(layout, 100) == [[0, 1], [2], [3, 4, 5]]
    assert plan_shards(layout, 80) == [[0, 1], [2], [3, 4, 5]]
    assert plan_shards(layout, 79) == [[0], [1], [2], [3, 4, 5]]
    assert plan_shards(layout, 10**6) == [[0, 1, 2, 3, 4, 5]]
    assert plan_shards(layout[2:3], 1) == [[0]]
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards(layout, 0)


def test_sharded_output_index_and_loads(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {f"t{i}": torch.randn(4, 5, generator=g) for i in range(5)}  # 80 bytes each
    sd["huge"] = torch.randn(30, 5, generator=g)  # 600 bytes: alone
    sd["z"] = torch.randn(2, generator=g)
    with ShardedSafetensorsWriter(tmp_path, _layout(sd), shard_size=200) as w:
        _write_all(w, sd)
    # by hand: t0+t1 = 160; +t2 would be 240 > 200 -> t2+t3; t4 (+huge would exceed); huge alone
    # (600 > 200); z cannot join huge's shard either
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)] + [
        "model.safetensors.index.json"
    ]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 80 + 600 + 8
    assert index["weight_map"] == {
        "t0": "model-00001-of-00005.safetensors",
        "t1": "model-00001-of-00005.safetensors",
        "t2": "model-00002-of-00005.safetensors",
        "t3": "model-00002-of-00005.safetensors",
        "t4": "model-00003-of-00005.safetensors",
        "huge": "model-00004-of-00005.safetensors",
        "z": "model-00005-of-00005.safetensors",
    }
    _same(_load_dir(tmp_path), sd)


def test_shard_assignment_follows_plan(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {
        "t0": torch.randn(20, generator=g),
        "huge": torch.randn(100, generator=g),
        "t1": torch.randn(20, generator=g),
    }
    with ShardedSafetensorsWriter(tmp_path, _layout(sd), shard_size=100) as w:
        _write_all(w, sd)
    wmap = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert wmap == {
        "t0": "model-00001-of-00003.safetensors",
        "huge": "model-00002-of-00003.safetensors",
        "t1": "model-00003-of-00003.safetensors",
    }


def test_row_writes_in_any_order_from_threads(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    sd = {f"w{i}": torch.randn(37, 6, generator=g).to(torch.bfloat16) for i in range(6)}
    sd["scalar"] = torch.tensor(2.0, dtype=torch.bfloat16)
    jobs = [("scalar", None)]
    for k in sd:
        if k != "scalar":
            cuts = [0, 5, 6, 19, 37]
            jobs += [(k, (a, b)) for a, b in itertools.pairwise(cuts)]
    random.Random(0).shuffle(jobs)
    w = ShardedSafetensorsWriter(tmp_path, _layout(sd), shard_size=1000)

    def work(part: list) -> None:
        for k, rows in part:
            w.write(k, sd[k] if rows is None else sd[k][rows[0] : rows[1]].clone(), rows)

    threads = [threading.Thread(target=work, args=(jobs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = w.finalize()
    assert len(files) > 2
    _same(_load_dir(tmp_path), sd)


def test_missing_and_partial_writes_are_named(tmp_path: Path) -> None:
    sd = {"a": torch.ones(6, 2), "b": torch.zeros(3), "s": torch.tensor(1.0), "e": torch.empty(0, 2)}
    w = ShardedSafetensorsWriter(tmp_path, _layout(sd), shard_size=10**6)
    w.write("a", sd["a"][0:2], (0, 2))
    w.write("a", sd["a"][4:6], (4, 6))
    with pytest.raises(
        ValueError, match=r"not written: a \(rows \[2, 4\)\), b \(rows \[0, 3\)\), s .*e \(rows \[0, 0\)\)"
    ):
        w.finalize()
    w.write("a", sd["a"][2:4], (2, 4))
    w.write("b", sd["b"])
    w.write("s", sd["s"])
    w.write("e", sd["e"])
    w.finalize()
    _same(load_file(str(tmp_path / "model.safetensors")), sd)


def test_double_writes_and_mismatches_are_refused(tmp_path: Path) -> None:
    sd = {"a": torch.ones(6, 2), "e": torch.empty(0, 3)}
    w = ShardedSafetensorsWriter(tmp_path, _layout(sd), shard_size=10**6)
    w.write("a", sd["a"][1:4], (1, 4))
    with pytest.raises(ValueError, match=r"'a': rows \[3, 5\) overlap rows \[1, 4\)"):
        w.write("a", sd["a"][3:5], (3, 5))
    with pytest.raises(ValueError, match=r"'a': rows \[0, 6\) overlap"):
        w.write("a", sd["a"])
    w.write("e", sd["e"])
    with pytest.raises(ValueError, match="overlap"):
        w.write("e", sd["e"])
    with pytest.raises(TypeError, match=r"'a': layout says dtype torch.float32, got torch.float16"):
        w.write("a", sd["a"][0:1].half(), (0, 1))
    with pytest.raises(ValueError, match=r"'a': expected shape \(1, 2\)"):
        w.write("a", sd["a"][0:2], (0, 1))
    with pytest.raises(KeyError, match="'zz' is not in the output layout"):
        w.write("zz", sd["a"])
    w.close()
    with pytest.raises(ValueError, match="finalized or closed"):
        w.write("a", sd["a"][0:1], (0, 1))


def test_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'x' appears twice"):
        ShardedSafetensorsWriter(
            tmp_path, [("x", (1,), torch.float32), ("x", (1,), torch.float32)], shard_size=9
        )
    with pytest.raises(TypeError, match=r"'c': dtype torch\.complex64 cannot be stored"):
        ShardedSafetensorsWriter(tmp_path, [("c", (1,), torch.complex64)], shard_size=9)


def test_transformers_loads_writer_output(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = tmp_path / "m"
    out.mkdir()
    cfg.save_pretrained(out)
    with ShardedSafetensorsWriter(out, _layout(sd), shard_size=8 * 1024) as w:
        for k, v in reversed(list(sd.items())):
            if v.dim() == 2 and v.shape[0] > 8:
                w.write(k, v[8:], (8, v.shape[0]))
                w.write(k, v[:8], (0, 8))
            else:
                w.write(k, v)
    assert (out / "model.safetensors.index.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_fp8_and_unsigned_dtypes_round_trip(tmp_path: Path) -> None:
    from weightmerge.io import open_source

    sd = {
        "f8": torch.randn(5, 3).to(torch.float8_e4m3fn),
        "f8e5": torch.randn(4).to(torch.float8_e5m2),
        "e8m0": torch.ones(3).to(torch.float8_e8m0fnu),
        "u16": torch.tensor([1, 2, 60000], dtype=torch.int32).to(torch.uint16),
        "u32": torch.tensor([1, 2, 3]).to(torch.uint32),
        "u64": torch.tensor([5, 6]).to(torch.uint64),
        "b0": torch.tensor(True),
    }
    with ShardedSafetensorsWriter(tmp_path, _layout(sd), shard_size=10**6) as w:
        _write_all(w, sd)
    _same(load_file(str(tmp_path / "model.safetensors")), sd)
    src = open_source(tmp_path)
    _same({k: src.read(k) for k in sd}, sd)
