"""The contract every registered method keeps, checked for each method in the registry (a new method
joins these tests by being registered; see docs/adding-a-method.md):

* the streamed merge (checkpoint files -> ``merge_config``) equals ``merge_state_dicts`` bit for bit,
  with the method's defaults and with each of its ``examples`` parameter sets;
* where the method may run on row chunks, a merge split into small ragged row chunks is that same
  result bit for bit, and a method that may not is never split;
* where the method declares ``order_invariant``, permuting the models (and their per-model
  parameters) changes the result by float rounding at most;
* too few or too many models, or no base model for a method that needs one, fail the same way in
  memory and in a config, before any tensor is read;
* ``docs/methods/`` has a page that names the method in its title, and its parameter table lists
  exactly the method's parameters with their defaults.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightmerge import merge_state_dicts
from weightmerge.config import load_config
from weightmerge.engine.merge import MergeOptions, merge_config, open_and_plan
from weightmerge.methods._params import resolve_params
from weightmerge.methods.aux import module_name
from weightmerge.methods.base import MethodSpec, Param
from weightmerge.methods.registry import METHODS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods"
N_MODELS = 3
SEED = 7
# (rows, cols) shapes chosen so that 160-element row chunks are ragged; a 1-D ".weight" (a norm)
# and a bias; an integer buffer is copied.
SHAPES: dict[str, tuple[int, ...]] = {
    "enc.attn.weight": (12, 16),
    "enc.attn.bias": (12,),
    "enc.mlp.weight": (9, 20),
    "norm.weight": (16,),
}
CHUNK_ELEMENTS = 160


def n_models_for(spec: MethodSpec) -> int:
    return max(spec.min_models, min(N_MODELS, spec.max_models or N_MODELS))


def family(n: int, *, dtype: torch.dtype = torch.float32) -> tuple[dict, list[dict]]:
    """A base and ``n`` experts: base + a shared direction + each expert's own deltas and spikes,
    so signs both agree and conflict; an int buffer equal everywhere."""
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    shared = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    experts = []
    for i in range(n):
        e = {}
        for k, v in base.items():
            own = torch.randn(v.shape, generator=g, dtype=torch.float64)
            spikes = (torch.rand(v.shape, generator=g, dtype=torch.float64) < 0.05) * 6.0 * own.sign()
            e[k] = (v + 0.05 * (0.6 * shared[k] + own + spikes) * (1 + 0.3 * i)).to(dtype)
        e["pos.ids"] = torch.arange(5)
        experts.append(e)
    base = {k: v.to(dtype) for k, v in base.items()}
    base["pos.ids"] = torch.arange(5)
    return base, experts


def side_inputs(spec: MethodSpec, experts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, list[dict]]:
    """Per-model statistics for each ``stats`` parameter, by its declared layout: positive values of
    the tensor's shape ("param"), or an (in, in) Gram matrix per 2-D ``.weight`` ("module_gram")."""
    out: dict[str, list[dict]] = {}
    for p in spec.params:
        if p.kind != "stats":
            continue
        layout = p.layout
        per_model = []
        for i, e in enumerate(experts):
            g = torch.Generator().manual_seed(100 + i)
            d: dict[str, torch.Tensor] = {}
            for k, v in e.items():
                if not v.is_floating_point():
                    continue
                if layout == "param":
                    d[k] = torch.rand(v.shape, generator=g) + 0.1
                elif v.dim() == 2 and (m := module_name(k)) is not None:
                    a = torch.randn(2 * v.shape[1], v.shape[1], generator=g)
                    d[m] = a.T @ a / a.shape[0]
            per_model.append(d)
        out[p.name] = per_model
    return out


def required_value(p: Param) -> Any:
    """A valid value for a required non-statistics parameter, from its declared kind and range."""
    if p.choices:
        return p.choices[0]
    if p.kind == "bool":
        return False
    lo = p.low if p.low is not None else 0.0
    hi = p.high if p.high is not None else lo + 1.0
    v = (lo + hi) / 2
    return round(v) if p.kind == "int" else v


def param_sets(spec: MethodSpec) -> list[dict[str, Any]]:
    """The defaults (required parameters filled in), then each declared example."""
    required = {p.name: required_value(p) for p in spec.params if p.required and p.kind != "stats"}
    return [dict(required)] + [{**required, **ex} for ex in spec.examples]


def cases() -> list[Any]:
    return [
        pytest.param(name, i, id=f"{name}-{i}")
        for name, spec in sorted(METHODS.items())
        for i in range(len(param_sets(spec)))
    ]


def write_inputs(
    tmp: Path, spec: MethodSpec, base: dict | None, experts: list[dict], params: dict, side: dict
) -> dict[str, Any]:
    """Write the checkpoints (and statistics files) and return the config mapping. A per-model list
    goes into each model's entry (at the top level a list is a gradient over the layers)."""
    lists = {k: v for k, v in params.items() if isinstance(v, (list, tuple))}
    params = {k: v for k, v in params.items() if k not in lists}
    (tmp / "base").mkdir(parents=True)
    if base is not None:
        save_file(base, str(tmp / "base" / "model.safetensors"))
    models = []
    for i, e in enumerate(experts):
        d = tmp / f"expert_{i}"
        d.mkdir()
        save_file(e, str(d / "model.safetensors"))
        entry: dict[str, Any] = {"model": str(d)}
        if lists:
            entry["parameters"] = {k: v[i] for k, v in lists.items()}
        for key, stats in side.items():
            f = tmp / f"{key}_{i}.safetensors"
            save_file(stats[i], str(f))
            entry.setdefault("parameters", {})[key] = str(f)
        models.append(entry)
    cfg: dict[str, Any] = {"merge_method": spec.name, "models": models, "parameters": params, "seed": SEED}
    if base is not None:
        cfg["base_model"] = str(tmp / "base")
    return cfg


def load_output(out: Path) -> dict[str, torch.Tensor]:
    index = out / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []
    sd: dict[str, torch.Tensor] = {}
    for f in files or ["model.safetensors"]:
        sd.update(load_file(str(out / f)))
    return sd


def assert_same_bits(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), what
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: {k}"
        same = torch.equal(g.view(-1).view(torch.uint8), w.contiguous().view(-1).view(torch.uint8))
        assert same, f"{what}: tensor {k} differs (max |diff| {(g.double() - w.double()).abs().max()})"


def streamed_equals(result: Any, out: Path, base_dir: Path, n: int, what: str) -> None:
    """Compare a streamed output directory with the in-memory result: a checkpoint tensor by
    tensor, or (a per-task artifact) every task's reconstruction."""
    if isinstance(result, Mapping):
        assert_same_bits(load_output(out), result, what)
        return
    from weightmerge.emr import load_emr

    art = load_emr(out)
    for i in range(n):
        assert_same_bits(art.task_state_dict(i, base_dir), result.task_state_dict(i), f"{what}, task {i}")


def run_both(tmp: Path, spec: MethodSpec, params: dict, **opts: Any) -> dict[str, Any]:
    """Merge in memory and streamed, compare; returns the config mapping."""
    n = n_models_for(spec)
    base, experts = family(n)
    side = side_inputs(spec, experts)
    raw = write_inputs(tmp, spec, base if spec.needs_base else None, experts, params, side)
    cfg = load_config(raw)
    want = merge_state_dicts(
        base if spec.needs_base else None, experts, spec.name, {**params, **side}, seed=SEED
    )
    out = tmp / "out"
    merge_config(cfg, out, MergeOptions(quiet=True, copy_tokenizer=False, **opts))
    streamed_equals(want, out, tmp / "base", n, f"{spec.name} {params}")
    return raw


@pytest.mark.parametrize(("name", "case"), cases())
def test_stream_equals_in_memory(tmp_path: Path, name: str, case: int) -> None:
    spec = METHODS[name]
    run_both(tmp_path, spec, param_sets(spec)[case])


@pytest.mark.parametrize(("name", "case"), cases())
def test_row_chunked_equals_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, case: int
) -> None:
    """Where the method may run on row chunks, tiny ragged chunks give the whole-tensor bits; where
    it may not, the plan never splits a tensor."""
    from weightmerge.engine import plan as plan_mod

    spec = METHODS[name]
    params = param_sets(spec)[case]
    monkeypatch.setattr(plan_mod, "CACHE_CHUNK_ELEMENTS", CHUNK_ELEMENTS)
    opened = open_and_plan(load_config(run_both(tmp_path, spec, params)))
    try:
        chunked = [t for t in opened.plan.merged if t.chunk_rows is not None]
        if spec.is_row_chunkable(opened.model_params):
            assert chunked, f"{name}: declared row-chunkable, but no tensor was split"
            assert any(t.shape[0] % t.chunk_rows for t in chunked), "no ragged last chunk"
        else:
            assert not chunked, f"{name}: not row-chunkable, but split: {[t.name for t in chunked]}"
    finally:
        opened.close()


def permuted(params: Mapping[str, Any], spec: MethodSpec, order: Sequence[int]) -> dict[str, Any]:
    out = dict(params)
    for p in spec.params:
        v = out.get(p.name)
        if (p.per_model or p.kind == "stats") and isinstance(v, (list, tuple)):
            out[p.name] = [v[i] for i in order]
    return out


@pytest.mark.parametrize(("name", "case"), cases())
def test_model_order_invariance(name: str, case: int) -> None:
    """Declared ``order_invariant`` (for these parameters): the models in reverse order give the same
    merge up to float64 rounding. Not declared: reversing them changes the result (else the method
    should declare it)."""
    spec = METHODS[name]
    n = n_models_for(spec)
    if n < 2:
        pytest.skip(f"{name} merges a single model")
    params = param_sets(spec)[case]
    base, experts = family(n, dtype=torch.float64)
    base_arg = base if spec.needs_base else None
    side = side_inputs(spec, experts)
    order = list(reversed(range(n)))
    kw = {"seed": SEED, "compute_dtype": torch.float64}
    a = merge_state_dicts(base_arg, experts, name, {**params, **side}, **kw)
    b = merge_state_dicts(
        base_arg, [experts[i] for i in order], name, permuted({**params, **side}, spec, order), **kw
    )
    if not isinstance(a, Mapping):  # per-task outputs: task i of one is task order[i] of the other
        a = {f"{i}.{k}": v for i in range(n) for k, v in a.task_state_dict(order[i]).items()}
        b = {f"{i}.{k}": v for i in range(n) for k, v in b.task_state_dict(i).items()}
    close = all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-9, atol=1e-12) for k in a)
    if spec.is_order_invariant(resolve_params(spec, {**params, **side}, n)):
        assert close, f"{name} declares order_invariant, but reversing the models changed the result"
    else:
        assert not close, f"{name}: reversing the models changed nothing; should it declare order_invariant?"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_input_count_errors_in_memory_and_in_a_config(tmp_path: Path, name: str) -> None:
    """Too few models, too many, or no base for a method that needs one: a ValueError naming the
    method from ``merge_state_dicts``, and a config error from ``load_config`` (before any tensor
    data is read: the config names directories that do not exist)."""
    spec = METHODS[name]
    params = param_sets(spec)[0]
    base, experts = family(max(spec.min_models, N_MODELS) + 2)
    wrong: list[tuple[dict | None, list[dict], str]] = [(base, [], "empty|no models|at least")]
    if spec.min_models > 1:
        wrong.append((base, experts[: spec.min_models - 1], "at least"))
    if spec.max_models is not None:
        wrong.append((base, experts[: spec.max_models + 1], "at most"))
    if spec.needs_base:
        wrong.append((None, experts[: n_models_for(spec)], "base"))
    for b, models, why in wrong:
        side = side_inputs(spec, models)
        with pytest.raises(ValueError, match=why):
            merge_state_dicts(b, models, name, {**params, **side})
        cfg: dict[str, Any] = {
            "merge_method": name,
            "models": [{"model": str(tmp_path / f"absent_{i}")} for i in range(len(models))],
            "parameters": params,
        }
        if b is not None:
            cfg["base_model"] = str(tmp_path / "absent_base")
        with pytest.raises(ValueError, match=why):
            load_config(cfg)


# -- the docs page ---------------------------------------------------------------------------------


def doc_page(name: str) -> Path:
    """The page of docs/methods/ whose title names the method in backticks."""
    pages = [p for p in sorted(DOCS.glob("*.md")) if f"`{name}`" in p.read_text().splitlines()[0]]
    assert len(pages) == 1, f"{name}: expected one docs/methods/*.md titled with `{name}`, found {pages}"
    return pages[0]


def param_table(page: Path) -> dict[str, str]:
    """name -> default cell of the first table with the header | name | type | default | meaning |."""
    lines = page.read_text().splitlines()
    header = re.compile(r"\|\s*name\s*\|\s*type\s*\|\s*default\s*\|.*")
    head = [i for i, ln in enumerate(lines) if header.fullmatch(ln)]
    assert head, f"{page.name}: no parameter table (| name | type | default | meaning |)"
    rows: dict[str, str] = {}
    for ln in lines[head[0] + 2 :]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]]
        rows[cells[0].strip("`")] = cells[2]
    return rows


def default_cell(cell: str, name: str) -> str:
    """A cell may give per-method defaults: ``true (`della`), false (`della_linear`)``."""
    per = re.findall(r"([^,()]+?)\s*\(`([a-z_0-9]+)`\)", cell)
    for value, method in per:
        if method == name:
            return value.strip()
    return cell


def cell_matches(first: str, p: Param) -> bool:
    """Whether the first word of a default cell writes the parameter's default."""
    d = p.default
    if d is None:  # "required", or a word for "not set" (maybe followed by a gloss)
        words = {"required"} if p.required else {"unset", "none", "auto", "—", "-"}
        return first.lower().rstrip(":") in words
    if isinstance(d, bool):
        return first == str(d).lower()
    if isinstance(d, (int, float)):
        try:
            return float(first) == float(d)
        except ValueError:
            return False
    return first == str(d)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_docs_page_lists_the_parameters_and_defaults(name: str) -> None:
    spec = METHODS[name]
    rows = param_table(doc_page(name))
    assert sorted(rows) == sorted(p.name for p in spec.params), f"{name}: table rows vs spec params"
    for p in spec.params:
        cell = default_cell(rows[p.name], name).strip("`").strip()
        first = cell.split(" ")[0].strip("`,;")
        assert cell_matches(first, p), f"{name}.{p.name}: default {p.default!r}, table says {cell!r}"
