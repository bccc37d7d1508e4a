"""EMR artifacts: bit-packed masks, streaming == in-memory files, exact materialization, in-place
task switching, sizes, and errors that leave nothing written."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from ckpt_fixtures import make_family, tiny_llama_config
from ref_emr import emr_state_dicts
from weightmerge.api import merge_state_dicts
from weightmerge.cli import main
from weightmerge.emr import (
    ArtifactError,
    DictSource,
    EMRArtifactWriter,
    base_identity,
    bits,
    load_emr,
    materialize,
    write_emr_artifact,
)
from weightmerge.emr.result import EMRTensor
from weightmerge.engine.plan import FIXED_OVERHEAD_BYTES, build_plan
from weightmerge.engine.stream import stream_merge
from weightmerge.methods._params import resolve_params
from weightmerge.methods.registry import get_method

TASKS = ["sst2", "qnli", "mnli", "rte"]


# -- helpers -------------------------------------------------------------------------------------


def literal_pack(mask: torch.Tensor) -> bytes:
    """Slow reference of the documented bit order: element k -> bit k % 8 of byte k // 8."""
    flat = [bool(v) for v in mask.reshape(-1).tolist()]
    out = bytearray((len(flat) + 7) // 8)
    for k, v in enumerate(flat):
        if v:
            out[k // 8] |= 1 << (k % 8)
    return bytes(out)


def weights_pack(mask: torch.Tensor) -> bytes:
    """A second reference: pad to a multiple of 8, weight the bits by 1, 2, 4, ..., 128 and sum."""
    flat = mask.reshape(-1).to(torch.int64)
    flat = torch.cat([flat, torch.zeros(-flat.numel() % 8, dtype=torch.int64)])
    return bytes((flat.reshape(-1, 8) * (2 ** torch.arange(8))).sum(dim=1).tolist())


def odd_model(n: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Plain dicts with shapes whose rows are not multiples of 8 elements, a 0-d and an int buffer."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (37, 13), "b.weight": (5, 3, 7), "c.bias": (11,), "d.scale": (), "e.w": (9, 9)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["f.ids"] = torch.arange(6)
    experts = []
    for i in range(n):
        e = {
            k: v + 0.1 * torch.randn(v.shape, generator=g) * (1 + i) if v.is_floating_point() else v.clone()
            for k, v in base.items()
        }
        experts.append(e)
    return base, experts


def stream_emr(base, experts, out, tasks, *, rescale="per_tensor_mean", max_memory=None, per_task=None):
    """The streaming engine path: plan -> stream_merge(writer=EMR artifact writer) -> finalize."""
    spec = get_method("emr")
    params = resolve_params(spec, {"rescale": rescale}, len(experts))
    bsrc, msrcs = DictSource(base), [DictSource(e) for e in experts]
    plan = build_plan(spec, bsrc, msrcs, model_params=params, max_memory=max_memory)
    layout = [(t.name, t.shape, t.out_dtype) for t in plan.merged]
    with EMRArtifactWriter(
        out,
        tasks=tasks,
        layout=layout,
        base_identity=base_identity(bsrc),
        rescale=rescale,
        compute_dtype=plan.compute_dtype,
        fsync=False,
    ) as w:
        outcome, _ = stream_merge(plan, bsrc, msrcs, writer=w, quiet=True, prefetch=False)
        w.finalize(outcome.extras["rescalers"], per_task)
    return plan


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".wm-tmp-" in p.name)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("emr_family")
    base_dir, _dirs, base, experts = make_family(root, 4)
    return root, base_dir, base, experts


# -- bit packing ---------------------------------------------------------------------------------


def test_bit_order_hand_computed():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 1], dtype=torch.bool)
    # byte 0: element 0 -> 0x01; byte 1: elements 8, 9, 11 -> 1 + 2 + 8 = 0x0b (4 padding bits 0)
    assert bytes(bits.pack(mask)) == bytes([0x01, 0x0B])
    assert bytes(bits.pack(torch.ones(9, dtype=torch.bool))) == bytes([0xFF, 0x01])
    assert bits.packed_size(0) == 0 and bits.packed_size(8) == 1 and bits.packed_size(9) == 2
    assert bits.padding_ok(0x0B, 12) and not bits.padding_ok(0x1B, 12) and bits.padding_ok(0xFF, 16)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 70), st.integers(0, 2**31 - 1))
def test_pack_matches_references_and_roundtrips(numel, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=g) < 0.5
    packed = bits.pack(mask)
    assert bytes(packed) == literal_pack(mask) == weights_pack(mask)
    assert torch.equal(bits.unpack(packed, numel=numel), mask)
    lo = int(torch.randint(0, numel + 1, (1,), generator=g))
    hi = int(torch.randint(lo, numel + 1, (1,), generator=g))
    b0 = lo // 8
    assert torch.equal(bits.unpack(packed[b0:], numel=numel, first_byte=b0, start=lo, stop=hi), mask[lo:hi])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(1, 11), st.data())
def test_writer_chunks_in_any_order_equal_whole_writes(tmp_path_factory, rows, cols, data):
    """Row chunks whose starts are not multiples of 8 elements, written in a random order, give
    exactly the bytes of one whole-tensor write."""
    tmp = tmp_path_factory.mktemp("chunks")
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(rows, cols, generator=g), "v": torch.randn(cols, generator=g)}
    ident = base_identity(base)
    unified = torch.randn(rows, cols, generator=g)
    masks = torch.rand(3, rows, cols, generator=g) < 0.5
    cuts = sorted(set(data.draw(st.lists(st.integers(1, rows - 1), max_size=rows - 1)) if rows > 1 else []))
    bounds = list(zip([0, *cuts], [*cuts, rows], strict=True))
    random.Random(seed).shuffle(bounds)
    layout = [("w", (rows, cols), torch.float32)]
    outs = []
    for name, chunks in (("whole", [None]), ("chunked", bounds)):
        with EMRArtifactWriter(
            tmp / name, tasks=["a", "b", "c"], layout=layout, base_identity=ident, fsync=False
        ) as w:
            for r in chunks:
                sl = slice(None) if r is None else slice(r[0], r[1])
                w.write("w", r, EMRTensor(unified=unified[sl], masks=masks[:, sl]))
            w.finalize([1.0, 2.0, 0.5])
        outs.append(dir_bytes(tmp / name))
    assert outs[0] == outs[1]
    art = load_emr(tmp / "chunked")
    for t in range(3):
        with safe_open(str(tmp / "chunked" / f"masks-00{t}.safetensors"), "pt") as f:
            assert bytes(f.get_tensor("w").numpy()) == literal_pack(masks[t])
        assert torch.equal(art.mask(t, "w"), masks[t])
        assert torch.equal(art.mask(t, "w", (rows // 2, rows)), masks[t, rows // 2 :])


# -- streaming == in-memory; materialization == EMRResult --------------------------------------------


def test_streamed_chunked_artifact_is_byte_identical_to_in_memory(tmp_path):
    base, experts = odd_model(4)
    res = merge_state_dicts(base, experts, "emr")
    write_emr_artifact(res, tmp_path / "mem", TASKS, fsync=False)
    # A budget of ~2 rows per chunk: chunk starts at multiples of 26 / 21 / 18 elements (not of 8).
    plan = stream_emr(
        base, experts, tmp_path / "stream", TASKS, max_memory=FIXED_OVERHEAD_BYTES + 2 * 13 * 8 * 4
    )
    assert any(t.chunk_rows is not None and t.chunk_rows < t.shape[0] for t in plan.merged)
    assert dir_bytes(tmp_path / "mem") == dir_bytes(tmp_path / "stream")
    art = load_emr(tmp_path / "stream")
    assert art.rescalers == res.rescalers
    for t in range(4):
        for name, m in res.masks[t].items():
            with safe_open(str(tmp_path / "stream" / f"masks-00{t}.safetensors"), "pt") as f:
                assert bytes(f.get_tensor(name).numpy()) == literal_pack(m) == weights_pack(m)


@pytest.mark.parametrize("rescale", ["per_tensor_mean", "global"])
def test_materialized_tasks_equal_emr_result_exactly(llama, tmp_path, rescale):
    _root, base_dir, base, experts = llama
    res = merge_state_dicts(base, experts, "emr", {"rescale": rescale})
    out = write_emr_artifact(
        res, tmp_path / "art", TASKS, base_identity(base_dir), rescale=rescale, fsync=False
    )
    art = load_emr(out)
    assert art.rescale == rescale and art.rescalers == res.rescalers
    # the rescalers differ between the two modes (docs/methods/emr.md's worked example shows it; here too)
    other = merge_state_dicts(
        base, experts, "emr", {"rescale": "global" if rescale != "global" else "per_tensor_mean"}
    )
    assert other.rescalers != res.rescalers
    for i, task in enumerate(TASKS):
        m = materialize(art, task, base_dir, tmp_path / f"m_{task}")
        got = load_file(str(m / "model.safetensors"))
        want = res.task_state_dict(i)
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        assert json.loads((m / "config.json").read_text()) == json.loads(
            (base_dir / "config.json").read_text()
        )
    # the lazy state dict gives the same tensors
    lazy = art.task_state_dict("mnli", base_dir)
    want = res.task_state_dict(2)
    assert sorted(lazy) == sorted(want)
    assert all(torch.equal(lazy[k], want[k]) for k in want)


def test_masks_and_unified_match_the_independent_reference(llama, tmp_path):
    _, _, base, experts = llama
    res = merge_state_dicts(base, experts, "emr", compute_dtype=torch.float64)
    art = load_emr(write_emr_artifact(res, tmp_path / "art", TASKS, fsync=False))
    uni, masks, resc = emr_state_dicts(base, experts, rescale="per_tensor_mean")
    assert art.rescalers == pytest.approx(resc, rel=1e-12)
    for k in uni:
        assert torch.equal(art.unified(k), uni[k].to(torch.float32).to(torch.float64)), k
        for t in range(len(TASKS)):
            assert torch.equal(art.mask(t, k), masks[t][k]), (k, t)


def test_sharded_unified_and_sharded_materialization(llama, tmp_path):
    _, _base_dir, base, experts = llama
    res = merge_state_dicts(base, experts, "emr")
    art = load_emr(write_emr_artifact(res, tmp_path / "art", TASKS, max_shard_bytes=20_000, fsync=False))
    assert len(art.manifest["unified_files"]) > 1
    m = materialize(art, "rte", base, tmp_path / "m", max_shard_bytes=30_000, chunk_bytes=1000)
    index = json.loads((m / "model.safetensors.index.json").read_text())
    got = {}
    for f in sorted(set(index["weight_map"].values())):
        got.update(load_file(str(m / f)))
    want = res.task_state_dict(3)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_bf16_model_unified_dtype(tmp_path):
    base, experts = odd_model(3)
    base = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in base.items()}
    experts = [
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in e.items()} for e in experts
    ]
    res = merge_state_dicts(base, experts, "emr")
    exact = load_emr(
        write_emr_artifact(res, tmp_path / "f32", TASKS[:3], unified_dtype=torch.float32, fsync=False)
    )
    small = load_emr(write_emr_artifact(res, tmp_path / "bf16", TASKS[:3], fsync=False))
    assert small.info()["unified_bytes"] < exact.info()["unified_bytes"]
    for i in range(3):
        want = res.task_state_dict(i)
        for k in res.unified:
            assert torch.equal(exact.reconstruct(i, k, base[k]), want[k])
            # default: the unified vector rounded to bf16, then the documented formula
            u = res.unified[k].to(torch.bfloat16).to(torch.float32)
            r = torch.tensor(res.rescalers[i], dtype=torch.float32)
            literal = (base[k].float() + u * res.masks[i][k].float() * r).to(torch.bfloat16)
            assert torch.equal(small.reconstruct(i, k, base[k]), literal)


# -- per-task tensors ------------------------------------------------------------------------------------


def test_per_task_heads_materialize_and_switch(llama, tmp_path):
    from transformers import LlamaForCausalLM

    _root, base_dir, base, experts = llama
    res = merge_state_dicts(base, experts, "emr", {"exclude": ["lm_head"]})
    assert "lm_head.weight" not in res.unified
    heads = {t: {"lm_head.weight": experts[i]["lm_head.weight"]} for i, t in enumerate(TASKS)}
    configs = {"rte": {"model_type": "llama", "note": "rte's own config"}}
    art = load_emr(
        write_emr_artifact(
            res, tmp_path / "art", TASKS, base_identity(base_dir), heads, task_configs=configs, fsync=False
        )
    )
    for i, task in enumerate(TASKS):
        got = load_file(str(materialize(art, task, base_dir, tmp_path / task) / "model.safetensors"))
        want = res.task_state_dict(i)
        want["lm_head.weight"] = experts[i]["lm_head.weight"]
        assert all(torch.equal(got[k], want[k]) for k in want) and sorted(got) == sorted(want)
    assert json.loads((tmp_path / "rte" / "config.json").read_text())["note"] == "rte's own config"
    model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(base)
    for task in ["qnli", "sst2", "qnli"]:
        art.apply(model, task)
    want = load_file(str(tmp_path / "qnli" / "model.safetensors"))
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_heads_of_different_shapes_and_tasks_without_a_head(tmp_path):
    base, experts = odd_model(3)
    res = merge_state_dicts(base, experts, "emr")
    own = {"x": {"cls.weight": torch.ones(2, 4)}, "y": {"cls.weight": torch.full((3, 4), 2.0)}}
    base2 = {**base, "cls.weight": torch.zeros(2, 4)}  # the base has a head too: "z" restores it
    res2 = type(res)(base=base2, unified=res.unified, masks=res.masks, rescalers=res.rescalers)
    art = load_emr(write_emr_artifact(res2, tmp_path / "art", ["x", "y", "z"], per_task=own, fsync=False))

    class Named(torch.nn.Module):  # state_dict names with dots, like a real model
        def __init__(self, tensors):
            super().__init__()
            self.t = {k: torch.nn.Parameter(v.clone(), requires_grad=False) for k, v in tensors.items()}

        def state_dict(self, keep_vars=False):
            return dict(self.t)

    m = Named(base2)
    art.apply(m, "y")
    assert m.t["cls.weight"].shape == (3, 4) and bool((m.t["cls.weight"] == 2).all())
    art.apply(m, "z")
    assert torch.equal(m.t["cls.weight"], torch.zeros(2, 4))
    assert torch.equal(m.t["a.weight"], res2.task_state_dict(2)["a.weight"])
    assert art.current_task(m) == "z"


# -- in-place switching --------------------------------------------------------------------------------


@pytest.mark.parametrize("with_source", [False, True])
def test_switch_a_b_a_is_bit_identical_to_fresh_materialization(llama, tmp_path, with_source):
    from transformers import LlamaForCausalLM

    _root, base_dir, base, experts = llama
    res = merge_state_dicts(base, experts, "emr", {"exclude": ["model.norm"]})
    art = load_emr(write_emr_artifact(res, tmp_path / "art", TASKS, base_identity(base_dir), fsync=False))
    fresh = {
        t: load_file(str(materialize(art, t, base_dir, tmp_path / t) / "model.safetensors"))
        for t in ("sst2", "qnli")
    }
    model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(base)
    kw = {"base": base_dir} if with_source else {}
    art.apply(model, "sst2", **kw)
    assert all(torch.equal(v, fresh["sst2"][k]) for k, v in model.state_dict().items())
    # tensors outside the artifact are never touched by a switch
    with torch.no_grad():
        model.model.norm.weight.fill_(7.0)
    art.apply(model, "qnli", **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh["qnli"][k]) or k == "model.norm.weight", k
    art.apply(model, "sst2", **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh["sst2"][k]) or k == "model.norm.weight", k
    assert bool((model.model.norm.weight == 7.0).all())
    assert art.current_task(model) == "sst2"
    # The naive incremental switch (add delta_B - delta_A) is not exact: what this design avoids.
    i, j = 0, 1
    r = [torch.tensor(x) for x in res.rescalers]
    naive_diffs = 0
    for k in res.unified:
        u = res.unified[k]
        a = fresh["sst2"][k] + r[j] * res.masks[j][k] * u - r[i] * res.masks[i][k] * u
        a = a - r[j] * res.masks[j][k] * u + r[i] * res.masks[i][k] * u
        naive_diffs += int((a != fresh["sst2"][k]).sum())
    assert naive_diffs > 0


def test_switch_refuses_a_model_that_does_not_hold_the_base(llama, tmp_path):
    from transformers import LlamaForCausalLM

    _, _base_dir, base, experts = llama
    res = merge_state_dicts(base, experts, "emr")
    art = load_emr(write_emr_artifact(res, tmp_path / "art", TASKS, fsync=False))
    model = LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(experts[0])  # an expert, not the base
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not the artifact's base"):
        art.apply(model, "sst2")
    with pytest.raises(ValueError, match="did you mean 'sst2'"):
        art.apply(model, "sst")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.half()
    with pytest.raises(ValueError, match="base dtype"):
        art.apply(model, "sst2")


# -- sizes ---------------------------------------------------------------------------------------------


def test_artifact_size_within_one_percent_of_theory(tmp_path):
    g = torch.Generator().manual_seed(3)
    shapes = {"emb": (513, 300), "w1": (300, 301), "w2": (301, 300), "b": (301,), "s": ()}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(4)]
    res = merge_state_dicts(base, experts, "emr")
    out = write_emr_artifact(res, tmp_path / "art", TASKS, fsync=False)
    numels = [math.prod(s) for s in shapes.values()]
    theory = sum(4 * n for n in numels) + len(TASKS) * sum(math.ceil(n / 8) for n in numels)
    actual = sum(p.stat().st_size for p in out.iterdir())  # every file, manifest included
    assert theory <= actual <= 1.01 * theory, (actual, theory)
    for t in range(len(TASKS)):
        with safe_open(str(out / f"masks-00{t}.safetensors"), "pt") as f:
            for k, n in zip(shapes, numels, strict=True):
                assert f.get_tensor(k).numel() == math.ceil(n / 8)
    info = load_emr(out).info(per_tensor=True)
    assert info["total_bytes"] == actual
    for t in range(len(TASKS)):
        ones = sum(int(res.masks[t][k].sum()) for k in shapes)
        assert info["tasks"][t]["mask_ones_fraction"] == ones / sum(numels)
        # a mask file is its packed bits plus a header of a few hundred bytes
        assert 0 < info["tasks"][t]["mask_bytes"] - sum(math.ceil(n / 8) for n in numels) < 1024
        assert 1.0 <= info["tasks"][t]["mask_bits_per_param"] < 1.02


# -- errors: nothing written -------------------------------------------------------------------------


def test_wrong_base_missing_task_corrupted_mask_write_nothing(llama, tmp_path):
    _, base_dir, base, experts = llama
    res = merge_state_dicts(base, experts, "emr")
    art_dir = write_emr_artifact(res, tmp_path / "art", TASKS, base_identity(base_dir), fsync=False)
    art = load_emr(art_dir)
    out = tmp_path / "out"
    wrong = dict(base)
    wrong["model.norm.weight"] = base["model.norm.weight"] + 1e-3
    with pytest.raises(ValueError, match=r"not the artifact's base.*model\.norm\.weight"):
        materialize(art, "rte", wrong, out)
    fewer = {k: v for k, v in base.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"lacks tensor 'lm_head\.weight'"):
        materialize(art, "rte", fewer, out)
    with pytest.raises(ValueError, match="did you mean 'mnli'"):
        materialize(art, "mnlii", base_dir, out)
    assert not out.exists() and leftovers(tmp_path) == []
    # CLI: same errors, exit status 1, nothing written
    assert (
        main(["emr", "materialize", str(art_dir), "--task", "nope", str(out), "--base", str(base_dir)]) == 1
    )
    assert not out.exists()
    # a flipped bit in a mask file: refused by its sha256 before anything is written
    corrupt = tmp_path / "corrupt"
    write_emr_artifact(res, corrupt, TASKS, base_identity(base_dir), fsync=False)
    mask_path = corrupt / "masks-001.safetensors"
    data = bytearray(mask_path.read_bytes())
    data[-5] ^= 0x10
    mask_path.write_bytes(bytes(data))
    bad = load_emr(corrupt)  # sizes and headers are fine
    with pytest.raises(ArtifactError, match=r"masks-001\.safetensors is corrupted"):
        materialize(bad, "qnli", base_dir, out)
    assert materialize(bad, "sst2", base_dir, tmp_path / "ok").exists()  # other tasks still work
    with pytest.raises(ArtifactError, match="corrupted"):
        bad.verify()
    # a truncated mask file: refused when loading
    mask_path.write_bytes(bytes(data[:-3]))
    with pytest.raises(ArtifactError, match=r"masks-001\.safetensors has \d+ bytes"):
        load_emr(corrupt)
    # a damaged header
    mask_path.write_bytes(b"\x00" * 8 + bytes(data[8:]))
    with pytest.raises(ArtifactError):
        load_emr(corrupt)
    assert not out.exists() and leftovers(tmp_path) == []


def test_non_zero_padding_bits_are_refused(tmp_path):
    base, experts = odd_model(2)
    res = merge_state_dicts(base, experts, "emr")
    art_dir = write_emr_artifact(res, tmp_path / "art", ["x", "y"], fsync=False)
    art = load_emr(art_dir)
    with safe_open(str(art_dir / "masks-000.safetensors"), "pt") as f:
        assert f.get_tensor("c.bias").numel() == 2  # 11 elements: 5 padding bits in the last byte
    from weightmerge.io.safetensors_format import read_header

    header, _ = read_header(art_dir / "masks-000.safetensors")
    path = art_dir / "masks-000.safetensors"
    data = bytearray(path.read_bytes())
    data[header["c.bias"].end - 1] |= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="padding bits"):
        art.mask("x", "c.bias")


def test_writer_errors_leave_nothing(tmp_path):
    base, _experts = odd_model(2)
    ident = base_identity(base)
    layout = [("a.weight", (37, 13), torch.float32)]
    w = EMRArtifactWriter(tmp_path / "a", tasks=["x", "y"], layout=layout, base_identity=ident, fsync=False)
    w.write("a.weight", (0, 10), EMRTensor(torch.zeros(10, 13), torch.zeros(2, 10, 13, dtype=torch.bool)))
    with pytest.raises(ValueError, match="130 of 481 elements written"):
        w.finalize([1.0, 1.0])
    assert not (tmp_path / "a").exists() and leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="not in the base"):
        EMRArtifactWriter(
            tmp_path / "b", tasks=["x"], layout=[("nope", (2,), torch.float32)], base_identity=ident
        )
    with pytest.raises(ValueError, match="given twice"):
        EMRArtifactWriter(tmp_path / "b", tasks=["x", "x"], layout=layout, base_identity=ident)
    with (
        pytest.raises(RuntimeError),
        EMRArtifactWriter(tmp_path / "c", tasks=["x", "y"], layout=layout, base_identity=ident, fsync=False),
    ):
        raise RuntimeError("engine failed")
    (tmp_path / "d").mkdir()
    with pytest.raises(FileExistsError):
        EMRArtifactWriter(tmp_path / "d", tasks=["x"], layout=layout, base_identity=ident)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_cli_info_json(llama, tmp_path, capsys):
    _, base_dir, base, experts = llama
    res = merge_state_dicts(base, experts, "emr")
    art_dir = write_emr_artifact(res, tmp_path / "art", TASKS, base_identity(base_dir), fsync=False)
    assert main(["emr", "info", str(art_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in info["tasks"]] == TASKS
    assert [t["rescaler"] for t in info["tasks"]] == res.rescalers
    assert main(["emr", "info", str(art_dir), "--tensors"]) == 0
    text = capsys.readouterr().out
    assert "bits/param" in text and "model.norm.weight" in text
    assert main(["emr", "verify", str(art_dir)]) == 0
    out = tmp_path / "m"
    assert main(["emr", "materialize", str(art_dir), "--task", "rte", str(out)]) == 0
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in res.task_state_dict(3).items())


# -- weightmerge merge with merge_method: emr -------------------------------------------------------


def test_cli_merge_writes_an_artifact_with_per_task_heads(tmp_path):
    """The product path: YAML -> `weightmerge merge` (streamed, row-chunked under --max-memory)
    -> artifact; excluded tensors are kept per task; materialize == the in-memory EMR result."""
    base_dir, dirs, base, experts = make_family(tmp_path, 4, layouts=("single", "sharded"))
    cfg = tmp_path / "emr.yaml"
    cfg.write_text(
        "merge_method: emr\n"
        f"base_model: {base_dir}\n"
        "models:\n" + "".join(f"  - model: {d}\n" for d in dirs) + "parameters:\n  rescale: global\n"
        "exclude: ['lm_head']\n"
    )
    out = tmp_path / "art"
    budget = str(FIXED_OVERHEAD_BYTES + 3 * 32 * 8 * 4)  # ~3 rows of 32 elements per chunk
    assert main(["merge", str(cfg), str(out), "-q", "--max-memory", budget]) == 0
    art = load_emr(out)
    assert art.tasks == [d.name for d in dirs] and art.rescale == "global"
    assert art.own_names(0) == ["lm_head.weight"]
    res = merge_state_dicts(base, experts, "emr", {"rescale": "global", "exclude": ["lm_head"]})
    assert art.rescalers == res.rescalers
    for i, task in enumerate(art.tasks):
        got = load_file(str(materialize(art, task, base_dir, tmp_path / f"m{i}") / "model.safetensors"))
        want = res.task_state_dict(i)
        want["lm_head.weight"] = experts[i]["lm_head.weight"]
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    # the streamed artifact's data files equal the in-memory writer's, byte for byte
    heads = {t: {"lm_head.weight": experts[i]["lm_head.weight"]} for i, t in enumerate(art.tasks)}
    mem = write_emr_artifact(
        res, tmp_path / "mem", art.tasks, base_identity(base_dir), heads, rescale="global", fsync=False
    )
    for f in art.files:
        assert (out / f).read_bytes() == (mem / f).read_bytes(), f
