"""The one safetensors format module: the reader refuses what the safetensors library refuses (and a
name given twice), naming the file and the tensor; headers round-trip through the library."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open

from weightmerge.io import safetensors_format as stf


def _raw(path: Path, header: bytes, data: bytes, *, length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def _library_refuses(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 (not a dict)
                f.get_tensor(k)
    except SafetensorError:
        return True
    return False


W = b'"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}'

CASES = [
    # (what, header, data, message, refused by the library too)
    (
        "hole",
        b'{"w":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}',
        b"abc",
        r"hole of 1 bytes before tensor 'w'",
        True,
    ),
    (
        "overlap",
        b"{" + W + b',"v":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
        b"ab",
        r"tensors 'w' and 'v' overlap",
        True,
    ),
    ("trailing bytes", b"{" + W + b"}", b"abc", r"1 bytes after the last tensor's data", True),
    ("outside the file", b"{" + W + b"}", b"a", r"truncated: tensor 'w' ends at byte", True),
    (
        "bool dim",
        b'{"w":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}}',
        b"a",
        r"tensor 'w' has an invalid shape",
        True,
    ),
    (
        "float dim",
        b'{"w":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}',
        b"a",
        r"tensor 'w' has an invalid shape",
        True,
    ),
    (
        "bool offset",
        b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[false,1]}}',
        b"a",
        r"invalid data_offsets",
        True,
    ),
    (
        "metadata",
        b'{"__metadata__":{"x":1},' + W + b"}",
        b"ab",
        r"__metadata__ is not an object of strings",
        True,
    ),
    (
        "dtype",
        b'{"w":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}',
        b"a",
        r"unsupported dtype 'F4'",
        False,
    ),
    ("duplicate", b"{" + W + b"," + W + b"}", b"ab", r"the header lists 'w' twice", False),
]


@pytest.mark.parametrize(("what", "header", "data", "message", "library"), CASES, ids=[c[0] for c in CASES])
def test_reader_refuses(
    tmp_path: Path, what: str, header: bytes, data: bytes, message: str, library: bool
) -> None:
    path = _raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ValueError, match=message) as err:
        stf.read_header(path)
    assert "bad.safetensors" in str(err.value)
    if library:  # the library refuses the same file (the reader is no more lenient)
        assert _library_refuses(path), what


def test_header_size_limit_is_the_library_s(tmp_path: Path) -> None:
    assert stf.MAX_HEADER_BYTES == 100_000_000
    path = _raw(tmp_path / "big.safetensors", b"{}", b"", length=100_000_001)
    with pytest.raises(ValueError, match="over the format's limit of 100000000 bytes"):
        stf.read_header(path)


def test_written_headers_read_back_by_the_library(tmp_path: Path) -> None:
    tensors = {
        "b": torch.arange(6, dtype=torch.int16).reshape(2, 3),
        "a": torch.tensor(1.5),
        "e": torch.zeros(0, 4),
    }
    slots = stf.pack([(k, tuple(t.shape), t.dtype) for k, t in tensors.items()])
    head = stf.encode_header(slots, {"format": "pt", "note": "é"}, ensure_ascii=False)
    assert len(head) % 8 == 0
    path = tmp_path / "x.safetensors"
    f = stf.PositionedFile(path, head, len(head) + slots[-1].end, exclusive=True)
    for s in slots:
        f.pwrite(stf.tensor_bytes(tensors[s.name]), len(head) + s.begin)
    f.close()
    with pytest.raises(FileExistsError):
        stf.PositionedFile(path, head, len(head), exclusive=True)
    stored, meta = stf.read_header(path)
    assert meta == {"format": "pt", "note": "é"}
    with safe_open(str(path), framework="pt") as lib:
        assert lib.metadata() == meta
        for k, t in tensors.items():
            assert torch.equal(lib.get_tensor(k), t)
            assert stored[k].dtype == t.dtype and stored[k].shape == tuple(t.shape)


def test_plan_shards() -> None:
    assert stf.plan_shards([40, 40, 90, 10, 10, 10], 100) == [[0, 1], [2, 3], [4, 5]]
    assert stf.plan_shards([], 100) == [[]]
    with pytest.raises(ValueError, match="positive"):
        stf.plan_shards([1], 0)
