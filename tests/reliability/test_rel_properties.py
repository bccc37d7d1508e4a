"""Property-based tests (hypothesis) of the three readers of untrusted or hand-written input: the
safetensors header reader, the merge-config loader and the EMR manifest loader, plus a bounded
fuzz run of the header reader. Each reader either returns a checked result or raises its one
documented error type (a ValueError) -- never another exception, never an unbounded message."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from weightmerge.io.safetensors_io import SafetensorsFile, read_header

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8, torch.bool]
SETTINGS = settings(  # derandomized: the same examples in every CI run
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# -- safetensors header reader ------------------------------------------------------------------

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)


@st.composite
def state_dicts(draw):  # type: ignore[no-untyped-def]
    keys = draw(st.lists(names.filter(lambda n: n != "__metadata__"), min_size=1, max_size=5, unique=True))
    out = {}
    for k in keys:
        shape, dtype = draw(shapes), draw(st.sampled_from(DTYPES))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        out[k] = (torch.rand(shape, generator=g) * 100).to(dtype)
    return out


@SETTINGS
@given(sd=state_dicts())
def test_header_reader_round_trips_what_safetensors_writes(tmp_path: Path, sd: dict) -> None:
    p = tmp_path / "x.safetensors"
    save_file(sd, str(p))
    entries, _meta = read_header(str(p))
    assert set(entries) == set(sd)
    f = SafetensorsFile(str(p))
    try:
        for k, t in sd.items():
            assert entries[k].info.shape == tuple(t.shape) and entries[k].info.dtype == t.dtype
            assert torch.equal(f.read(k), t)
            if t.dim() >= 1 and t.shape[0] >= 2:
                assert torch.equal(f.read(k, (1, t.shape[0])), t[1:])
    finally:
        f.close()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F4", "x"]) | json_values,
        "shape": st.lists(st.integers(-2, 5) | st.booleans() | st.just(2**62), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 300) | st.booleans(), min_size=0, max_size=3) | json_values,
    },
)


def _check_accepted(entries: dict, size: int) -> None:
    """What the reader accepts is consistent: spans inside the file, sized by shape x dtype, disjoint."""
    spans = []
    for e in entries.values():
        n = 1
        for s in e.info.shape:
            assert isinstance(s, int) and s >= 0  # JSON `true` is an int here (see docs/security.md, gaps)
            n *= s
        assert e.end - e.begin == n * torch.empty((), dtype=e.info.dtype).element_size()
        assert 8 <= e.begin <= e.end <= size
        if e.end > e.begin:
            spans.append((e.begin, e.end))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


@SETTINGS
@given(
    header=st.dictionaries(names, entry | json_values, max_size=4),
    meta=st.none() | json_values,
    data=st.binary(max_size=300),
    declared=st.none() | st.integers(0, 2**64 - 1),
)
def test_header_reader_accepts_only_consistent_headers(
    tmp_path: Path, header: dict, meta: object, data: bytes, declared: int | None
) -> None:
    if meta is not None:
        header = {**header, "__metadata__": meta}
    raw = json.dumps(header).encode()
    n = len(raw) if declared is None else declared
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", n) + raw + data)
    try:
        entries, metadata = read_header(str(p))
    except ValueError as err:
        assert str(p) in str(err) and len(str(err)) < 2000
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    _check_accepted(entries, p.stat().st_size)


def _mutate(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    kind = rng.randrange(5)
    if kind == 0 and b:  # flip bits
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        b = b[: rng.randrange(len(b) + 1)]
    elif kind == 2 and len(b) > 8:  # overwrite a byte of the JSON header with a JSON-significant character
        b[rng.randrange(8, max(9, min(len(b), 200)))] = rng.choice(b'{}[]",:0123456789-eE.tfn ')
    elif kind == 3:  # rewrite the length prefix
        b[:8] = struct.pack(
            "<Q", rng.choice([0, 1, 7, len(b), max(0, len(b) - 8), 2**63, rng.randrange(2**16)])
        )
    else:  # duplicate or drop a slice
        i, j = sorted(rng.randrange(len(b) + 1) for _ in range(2))
        b = b[:i] + (b[i:j] * 2 if rng.random() < 0.5 else b"") + b[j:]
    return bytes(b)


def test_bounded_fuzz_of_the_header_reader(tmp_path: Path) -> None:
    """A fixed number of mutations of real files (fixed seed, about a second on 2 idle cores): only
    ValueError, and every accepted file is consistent. A count, not a time bound, so a loaded
    machine runs the same cases (a time bound made the test flaky under load)."""
    seeds = []
    for i, sd in enumerate(
        [
            {
                "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                "b": torch.ones(3, dtype=torch.bfloat16),
            },
            {"w": torch.zeros(0, 4), "s": torch.tensor(2.5), "i": torch.arange(5)},
        ]
    ):
        p = tmp_path / f"seed{i}.safetensors"
        save_file(sd, str(p), metadata={"format": "pt"})
        seeds.append(p.read_bytes())
    rng = random.Random(1234)
    p = tmp_path / "fuzz.safetensors"
    cases = accepted = 0
    while cases < 800:
        blob = _mutate(rng, rng.choice(seeds))
        if rng.random() < 0.3:
            blob = _mutate(rng, blob)
        p.write_bytes(blob)
        cases += 1
        try:
            entries, _meta = read_header(str(p))
        except ValueError:
            continue
        accepted += 1
        _check_accepted(entries, len(blob))
        f = SafetensorsFile(str(p))
        try:
            for k in entries:
                f.read(k)
        finally:
            f.close()
    print(f"header fuzz: {cases} cases, {accepted} accepted")
    assert accepted > 0  # some mutations keep a valid file: the accepted branch is exercised


# -- merge-config loader --------------------------------------------------------------------------

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=25,
)
config_keys = st.sampled_from(
    [
        "merge_method",
        "base_model",
        "models",
        "parameters",
        "dtype",
        "out_dtype",
        "tokenizer_source",
        "seed",
        "exclude",
        "chat_template",
        "slices",
    ]
)


@SETTINGS
@given(
    doc=st.dictionaries(config_keys, yaml_values, max_size=6),
    method=st.sampled_from(["linear", "ties", "task_arithmetic", "slerp", "emr", "nope"]),
)
def test_config_loader_returns_or_raises_config_error(tmp_path: Path, doc: dict, method: str) -> None:
    from weightmerge.config import ConfigError, load_config

    doc = {"merge_method": method, **doc} if "merge_method" not in doc else doc
    try:
        load_config(doc, base_dir=str(tmp_path))
    except ConfigError as err:
        assert "\n" not in str(err) and len(str(err)) <= 2500


@SETTINGS
@given(text=st.text(max_size=300))
def test_config_loader_on_arbitrary_text(tmp_path: Path, text: str) -> None:
    from weightmerge.config import ConfigError, load_config

    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    try:
        load_config(p)
    except ConfigError as err:
        assert "\n" not in str(err) and len(str(err)) <= 2500


# -- EMR manifest loader ---------------------------------------------------------------------------

_ART: dict[str, Path] = {}
_COUNTER = itertools.count()


def _artifact(root: Path) -> Path:
    """One small EMR artifact, built once per test session."""
    if "path" not in _ART:
        from rel_fixtures import family, write_cfg

        from weightmerge.cli import main

        base, experts = family(root / "models", 2)
        cfg = write_cfg(root / "emr.yaml", "emr", base, experts)
        assert main(["merge", str(cfg), str(root / "art"), "-q"]) == 0
        _ART["path"] = root / "art"
    return _ART["path"]


def _paths(obj: object, prefix: tuple = ()):  # type: ignore[no-untyped-def]
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


hostile = yaml_values | st.sampled_from(
    ["/etc/passwd", "../secret", "/proc/self/environ", "evil", "", "a/../../b", "NaN", -1.0, "bool", 1e309]
)


@pytest.fixture(scope="module")
def emr_root(tmp_path_factory):  # type: ignore[no-untyped-def]
    return tmp_path_factory.mktemp("emrprop")


@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), hostile), min_size=1, max_size=3))
def test_manifest_loader_refuses_or_stays_inside(emr_root: Path, tmp_path: Path, edits: list) -> None:
    """Random values (hostile names, NaN, negatives, wrong types) put anywhere in a real manifest:
    loading refuses with ArtifactError, or every name it will use resolves inside the artifact and
    is listed with a sha256, and the rescalers are finite and non-negative."""
    from weightmerge.emr import ArtifactError, load_emr

    src = _artifact(emr_root)
    art = tmp_path / f"a{next(_COUNTER)}"
    shutil.copytree(src, art)
    m = json.loads((art / "emr_manifest.json").read_text())
    for where, value in edits:
        paths = [p for p in _paths(m) if p]
        path = paths[where % len(paths)]
        target = m
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value
    (art / "emr_manifest.json").write_text(json.dumps(m))
    try:
        a = load_emr(art)
    except (ArtifactError, FileNotFoundError) as err:
        assert len(str(err)) < 3000
        return
    root = art.resolve()
    used = [*a.files, *a.mask_files, *(t.file for t in a.tensors.values())]
    used += [pt[k] for pt in a.per_task for k in ("file", "config") if pt.get(k)]
    assert all((root / f).resolve().is_relative_to(root) and f in a.files for f in used)
    assert all(math.isfinite(r) and r >= 0 for r in a.rescalers)
    assert a.compute_dtype.is_floating_point
    with contextlib.suppress(ArtifactError):
        a.verify()
