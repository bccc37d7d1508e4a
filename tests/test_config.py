"""The YAML merge config: mergekit compatibility (filters, gradients, precedence), our keys,
errors with location and did-you-mean, paths, PEFT references, the validate command.

Expected per-tensor values are computed by hand (fractions written out below) and, where
mergekit 0.1.5 is installed, checked against mergekit's own config reader and parameter resolver.
"""

from __future__ import annotations

import glob
import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import require
from weightmerge.cli import main
from weightmerge.config import (
    ConfigError,
    MergeConfig,
    ModelRef,
    gradient_t,
    layer_index_of,
    layer_positions,
    load_config,
)
from weightmerge.methods._params import resolve_params
from weightmerge.methods.base import MethodSpec, Param, TensorCtx
from weightmerge.methods.registry import METHODS

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(glob.glob(str(REPO / "examples" / "*.yaml")))


def _apply(ctx: TensorCtx) -> torch.Tensor:
    return ctx.x.sum(dim=0)


# A stand-in with mergekit's TIES parameter names, so the config semantics are tested on their
# own, whatever the real methods declare.
TOY_TIES = MethodSpec(
    name="ties",
    summary="toy",
    paper="",
    params=(
        Param("weight", "float", 1.0, "w", per_model=True),
        Param("density", "float", 1.0, "d", per_model=True, low=0.0, high=1.0),
        Param("lambda", "float", 1.0, "l"),
        Param("normalize", "bool", True, "n"),
        Param("mode", "str", "a", "m", choices=("a", "b", "c")),
        Param("scope", "str", "per_tensor", "s", choices=("per_tensor", "global"), tensor_scoped=False),
        Param("steps", "int", 3, "i", low=1),
        Param("fisher", "stats", None, "f"),
    ),
    apply=_apply,
)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> MethodSpec:
    monkeypatch.setitem(METHODS, "ties", TOY_TIES)
    return TOY_TIES


def write(tmp_path: Path, text: str, name: str = "merge.yaml") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return p


def error_of(cfg: Any, **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(cfg, **kw)
    assert "\n" not in str(info.value)
    return info.value


# mergekit's README TIES example (Llama-2-13B: 40 layers).
MERGEKIT_TIES = """\
    models:
      - model: psmathur/orca_mini_v3_13b
        parameters:
          density: [1, 0.7, 0.1] # density gradient
          weight: 1.0
      - model: garage-bAInd/Platypus2-13B
        parameters:
          density: 0.5
          weight: [0, 0.3, 0.7, 1] # weight gradient
      - model: WizardLM/WizardMath-13B-V1.0
        parameters:
          density: 0.33
          weight:
            - filter: mlp
              value: 0.5
            - value: 0
    merge_method: ties
    base_model: TheBloke/Llama-2-13B-fp16
    parameters:
      normalize: true
      int8_mask: true
    dtype: float16
"""

# A realistic dare_ties: densities filtered by module type, a 5-point weight gradient.
DARE_TIES = """\
    merge_method: ties
    base_model: base
    models:
      - model: base
      - model: math
        parameters:
          density:
            - filter: self_attn
              value: 0.6
            - filter: mlp
              value: [0.2, 0.8]
          weight: [0, 0.5, 0.3, 0.7, 1]
      - model: code
        parameters:
          density: 0.5
          weight:
            - filter: mlp
              value: 0.25
    parameters:
      weight: 0.75
      density: 0.9
      lambda: 1e-1
    dtype: bfloat16
"""


# ---------------------------------------------------------------------------------------------
# Values per tensor (hand-computed)
# ---------------------------------------------------------------------------------------------


def test_mergekit_readme_ties_values(tmp_path: Path, toy: MethodSpec) -> None:
    cfg = load_config(write(tmp_path, MERGEKIT_TIES))
    assert cfg.n_models == 3 and cfg.base_model == ModelRef(str(tmp_path / "TheBloke/Llama-2-13B-fp16"))

    def at(name: str, layer: int | None) -> dict[str, Any]:
        return cfg.raw_params_for(name, layer_index=layer, num_layers=None if layer is None else 40)

    # layer 13: t = 13/39 = 1/3. density[0] = [1, .7, .1] at 2/3 of the first segment: 1/3 + 1.4/3
    # = 0.8; weight[1] = [0, .3, .7, 1] at position 1 exactly: 0.3; mlp filter -> 0.5, else 0.
    p = at("model.layers.13.mlp.down_proj.weight", 13)
    assert p["density"] == pytest.approx([0.8, 0.5, 0.33], abs=1e-12)
    assert p["weight"] == pytest.approx([1.0, 0.3, 0.5], abs=1e-12)
    assert p["normalize"] is True and "int8_mask" not in p
    p = at("model.layers.13.self_attn.q_proj.weight", 13)
    assert p["weight"] == pytest.approx([1.0, 0.3, 0.0], abs=1e-12)
    # layer 26: t = 2/3: density 0.7*(2/3) + 0.1*(1/3) = 0.5; weight at position 2: 0.7
    p = at("model.layers.26.mlp.up_proj.weight", 26)
    assert p["density"] == pytest.approx([0.5, 0.5, 0.33], abs=1e-12)
    assert p["weight"] == pytest.approx([1.0, 0.7, 0.5], abs=1e-12)
    # last layer: t = 1 -> last values
    p = at("model.layers.39.mlp.up_proj.weight", 39)
    assert p["density"] == pytest.approx([0.1, 0.5, 0.33]) and p["weight"] == pytest.approx([1.0, 1.0, 0.5])
    # outside the layers (embeddings, final norm, lm_head): t = 0 -> first values
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        p = at(name, None)
        assert p["density"] == [1.0, 0.5, 0.33] and p["weight"] == [1.0, 0.0, 0.0]
    assert any("int8_mask" in n for n in cfg.notes)
    assert cfg.compute_dtype == torch.float32 and cfg.output_dtype == torch.float16


def test_dare_ties_filters_and_five_point_gradient(tmp_path: Path, toy: MethodSpec) -> None:
    cfg = load_config(write(tmp_path, DARE_TIES))
    assert [str(e.model) for e in cfg.models] == [str(tmp_path / "math"), str(tmp_path / "code")]
    L = 32

    def at(layer: int | None, module: str) -> dict[str, Any]:
        name = "model.embed_tokens.weight" if layer is None else f"model.layers.{layer}.{module}.weight"
        return cfg.raw_params_for(name, layer_index=layer, num_layers=None if layer is None else L)

    # weight [0, .5, .3, .7, 1] over 32 layers: position = 4 * i / 31
    #   i=8:  pos 32/31 -> 0.5 + (0.3-0.5) * 1/31 = 15.3/31
    #   i=10: pos 40/31 -> 0.5 - 0.2 * 9/31       = 13.7/31
    #   i=16: pos 64/31 -> 0.3 + 0.4 * 2/31       = 10.1/31
    #   i=24: pos 96/31 -> 0.7 + 0.3 * 3/31       = 22.6/31
    # model "code": mlp -> 0.25, otherwise no filter matches -> global weight 0.75.
    for i, w in ((0, 0.0), (8, 15.3 / 31), (10, 13.7 / 31), (16, 10.1 / 31), (24, 22.6 / 31), (31, 1.0)):
        assert at(i, "self_attn.q_proj")["weight"] == pytest.approx([w, 0.75], abs=1e-12)
        assert at(i, "mlp.gate_proj")["weight"] == pytest.approx([w, 0.25], abs=1e-12)
    # density for "math": self_attn 0.6; mlp gradient [0.2, 0.8] -> 0.2 + 0.6 * i/31;
    # layer norms match no filter -> the global 0.9.
    assert at(10, "self_attn.o_proj")["density"] == pytest.approx([0.6, 0.5])
    assert at(10, "mlp.down_proj")["density"] == pytest.approx([0.2 + 0.6 * 10 / 31, 0.5], abs=1e-12)
    assert at(10, "input_layernorm")["density"] == pytest.approx([0.9, 0.5])
    assert at(None, "")["density"] == pytest.approx([0.9, 0.5]) and at(None, "")["weight"] == [0.0, 0.75]
    assert at(3, "mlp.up_proj")["lambda"] == pytest.approx(0.1)  # YAML reads 1e-1 as a string
    # the lists resolve for the method: one value per (non-base) model
    r = resolve_params(toy, at(10, "mlp.up_proj"), cfg.n_models)
    assert len(r["weight"]) == 2 and len(r["density"]) == 2 and r["steps"] == 3


def test_gradient_t_and_interpolation_rules() -> None:
    assert gradient_t(None, None) == 0.0
    assert gradient_t(0, 1) == 1.0  # a single layer takes the last value (mergekit)
    assert gradient_t(3, 7) == 0.5
    with pytest.raises(ValueError):
        gradient_t(7, 7)


def test_string_and_bool_gradients_pick_discrete_values(tmp_path: Path, toy: MethodSpec) -> None:
    cfg = load_config(
        {"merge_method": "ties", "base_model": "b", "models": [{"model": "m"}],
         "parameters": {"mode": ["a", "b", "c"], "normalize": [True, False]}},
        base_dir=str(tmp_path),
    )  # fmt: skip
    # values[int(t * (len - 1))]: t = i / 10 for 11 layers
    got = [cfg.raw_params_for("x", layer_index=i, num_layers=11) for i in (0, 4, 5, 9, 10)]
    assert [g["mode"] for g in got] == ["a", "a", "b", "b", "c"]
    assert [g["normalize"] for g in got] == [True, True, True, True, False]


def test_per_model_overrides_global_and_first_filter_wins(tmp_path: Path, toy: MethodSpec) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """\
            merge_method: ties
            base_model: b
            models:
              - model: m1
                parameters:
                  weight:
                    - {filter: attn, value: 2.0}
                    - {filter: self_attn, value: 3.0}
              - model: m2
              - model: m3
                parameters: {weight: 4.0}
            parameters:
              weight: {filter: "*", value: 5.0}
            """,
        )
    )
    assert cfg.raw_params_for("h.0.self_attn.q", layer_index=0, num_layers=1)["weight"] == [2.0, 5.0, 4.0]
    assert cfg.raw_params_for("h.0.mlp.fc", layer_index=0, num_layers=1)["weight"] == [5.0, 5.0, 4.0]
    # nothing set anywhere -> left out (resolve_params fills the method default)
    assert "density" not in cfg.raw_params_for("h.0.mlp.fc", layer_index=0, num_layers=1)


def test_model_params_hold_only_tensor_independent_values(tmp_path: Path, toy: MethodSpec) -> None:
    cfg = load_config(write(tmp_path, DARE_TIES))
    mp = cfg.model_params()
    assert mp == {"lambda": 0.1}  # weight and density vary per tensor; nothing else is set
    r = cfg.resolved_model_params()
    assert r["scope"] == "per_tensor" and r["lambda"] == 0.1 and r["weight"] == (1.0, 1.0)


def test_params_by_tensor_reports_the_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = MethodSpec(
        name="ties", summary="toy", paper="", apply=_apply,
        params=(Param("density", "float", None, "d", required=True),),
    )  # fmt: skip
    monkeypatch.setitem(METHODS, "ties", spec)
    cfg = load_config(
        {"merge_method": "ties", "base_model": "b", "models": [{"model": "m"}],
         "parameters": {"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.25}]}},
        base_dir=str(tmp_path),
    )  # fmt: skip
    got = cfg.params_by_tensor(["layers.0.mlp.w", "layers.1.attn.w", "embed.weight"])
    assert got["layers.0.mlp.w"]["density"] == 0.5 and got["embed.weight"]["density"] == 0.25
    bad = {"merge_method": "ties", "base_model": "b", "models": [{"model": "m"}],
           "parameters": {"density": [{"filter": "mlp", "value": 0.5}]}}  # fmt: skip
    # the load-time check sees no tensor name: the required value is missing outside 'mlp'
    assert "needs parameter 'density'" in str(error_of(bad, base_dir=str(tmp_path)))


def test_stats_paths_per_model(tmp_path: Path, toy: MethodSpec) -> None:
    cfg = load_config(
        write(
            tmp_path / "cfg",
            """\
            merge_method: ties
            base_model: ../base
            models:
              - {model: ../a, parameters: {fisher: stats/a.safetensors}}
              - {model: ../b, parameters: {fisher: /abs/b.safetensors}}
            """,
        )
    )
    want = [str(tmp_path / "cfg" / "stats" / "a.safetensors"), "/abs/b.safetensors"]
    assert cfg.model_params()["fisher"] == want
    assert cfg.raw_params_for("layers.0.w", layer_index=0, num_layers=2)["fisher"] == want
    assert str(tmp_path / "cfg" / "stats" / "a.safetensors") in cfg.referenced_paths()


# ---------------------------------------------------------------------------------------------
# mergekit itself as the oracle (its YAML reader + parameter resolver)
# ---------------------------------------------------------------------------------------------


def _mergekit_values(text: str, names: list[str], n_layers: int) -> tuple[dict, dict]:
    mk_config = require("mergekit.config")
    from mergekit import merge_methods
    from mergekit.parameter_resolver import resolve_parameters

    doc = mk_config.MergeConfiguration.model_validate(yaml.safe_load(textwrap.dedent(text)))
    method = merge_methods.get(doc.merge_method)
    # what mergekit's planner builds from `models:` (one slice over all layers)
    out_slice = mk_config.OutputSliceDefinition(
        sources=[
            mk_config.InputSliceDefinition(model=e.model, layer_range=(0, n_layers), parameters=e.parameters)
            for e in doc.models
        ]
    )
    shared, per = {}, {}
    for name in names:
        idx = layer_index_of(name)
        t = 0 if idx is None else idx / (n_layers - 1)
        reader = mk_config.ConfigReader(config=doc, t=t, slice_out=out_slice)
        g, p = resolve_parameters(
            method.spec,
            tensor_name=name,
            inputs={e.model: name for e in doc.models},
            sources=reader.parameter_sources,
            base_model=doc.base_model,
            t=t,
        )
        shared[name] = g
        per[name] = [p[e.model] for e in doc.models if e.model != doc.base_model]
    return shared, per


@pytest.mark.parametrize("text", [MERGEKIT_TIES, DARE_TIES], ids=["readme_ties", "dare_ties"])
def test_same_values_as_mergekit(tmp_path: Path, toy: MethodSpec, text: str) -> None:
    _compare_with_mergekit(tmp_path, text)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "task_arithmetic"])
def test_same_values_as_mergekit_with_our_methods(tmp_path: Path, method: str) -> None:
    text = DARE_TIES.replace("merge_method: ties", f"merge_method: {method}")
    _compare_with_mergekit(tmp_path, text.replace("weight: 0.75\n", "weight: 0.75\n      int8_mask: true\n"))
    _compare_with_mergekit(tmp_path, MERGEKIT_TIES.replace("merge_method: ties", f"merge_method: {method}"))


# mergekit's README slerp example, in the `models:` form (its `slices:` form spans all layers).
MERGEKIT_SLERP = """\
    models:
      - model: psmathur/orca_mini_v3_13b
      - model: garage-bAInd/Platypus2-13B
    merge_method: slerp
    base_model: psmathur/orca_mini_v3_13b
    parameters:
      t:
        - filter: self_attn
          value: [0, 0.5, 0.3, 0.7, 1]
        - filter: mlp
          value: [1, 0.5, 0.7, 0.3, 0]
        - value: 0.5 # fallback for rest of tensors
    dtype: float16
"""


def test_slerp_readme_example(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MERGEKIT_SLERP))
    assert cfg.n_models == 1 and cfg.models[0].model.path.endswith("Platypus2-13B")
    # layer 13 of 40: t = 1/3, position 4/3 -> self_attn 0.5 - 0.2/3, mlp 0.5 + 0.2/3; norms 0.5
    at = {m: cfg.raw_params_for(f"model.layers.13.{m}.weight", layer_index=13, num_layers=40)["t"]
          for m in ("self_attn.k_proj", "mlp.up_proj", "post_attention_layernorm")}  # fmt: skip
    assert at == pytest.approx({"self_attn.k_proj": 0.5 - 0.2 / 3, "mlp.up_proj": 0.5 + 0.2 / 3,
                                "post_attention_layernorm": 0.5}, abs=1e-12)  # fmt: skip
    _compare_with_mergekit(tmp_path, MERGEKIT_SLERP)


def _compare_with_mergekit(tmp_path: Path, text: str) -> None:
    n_layers = 40
    names = [
        f"model.layers.{i}.{m}.weight"
        for i in range(n_layers)
        for m in ("self_attn.q_proj", "mlp.down_proj", "input_layernorm")
    ] + ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    shared, per = _mergekit_values(text, names, n_layers)
    cfg = load_config(write(tmp_path, text))
    pos = layer_positions(names)
    assert pos["model.layers.7.mlp.down_proj.weight"] == (7, n_layers)
    for name in names:
        ours = cfg.raw_params_for(name, layer_index=pos[name][0], num_layers=pos[name][1])
        compared = 0
        for p in cfg.spec.params:
            if p.name not in ours:
                continue
            if p.per_model:
                want = [d[p.name] for d in per[name]]
            elif p.name in shared[name]:
                want = shared[name][p.name]
            else:
                continue
            assert ours[p.name] == (want if p.kind != "float" else pytest.approx(want, abs=1e-15)), (
                name,
                p.name,
            )
            compared += 1
        assert compared >= 2 or cfg.merge_method == "slerp"


# ---------------------------------------------------------------------------------------------
# Layer positions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "idx"),
    [
        ("model.layers.7.mlp.up_proj.weight", 7),
        ("model.decoder.layers.11.self_attn.k_proj.bias", 11),
        ("transformer.h.0.attn.c_attn.weight", 0),
        ("bert.encoder.layer.10.output.dense.weight", 10),
        ("blocks.3.attn.qkv.weight", 3),
        ("encoder.block.4.layer.1.DenseReluDense.wi.weight", 4),  # T5: the block, not the sub-layer
        ("visual.transformer.resblocks.5.mlp.c_fc.weight", 5),
        ("model.layers.2.mlp.experts.7.w1.weight", 2),
        ("layers.12", 12),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
        ("model.norm.weight", None),
        ("transformer.ln_f.weight", None),
        ("encoder.layers_norm.3.weight", None),
        ("model.layers.x.weight", None),
    ],
)
def test_layer_index_of(name: str, idx: int | None) -> None:
    assert layer_index_of(name) == idx


def test_layer_positions_count_each_stack() -> None:
    names = (
        [f"encoder.block.{i}.w" for i in range(6)] + [f"decoder.block.{i}.w" for i in range(3)] + ["shared.w"]
    )
    pos = layer_positions(names)
    assert pos["encoder.block.5.w"] == (5, 6) and pos["decoder.block.2.w"] == (2, 3)
    assert pos["shared.w"] == (None, None)


# ---------------------------------------------------------------------------------------------
# Errors: location and did-you-mean
# ---------------------------------------------------------------------------------------------


def base_doc(**extra: Any) -> dict[str, Any]:
    return {"merge_method": "ties", "base_model": "b", "models": [{"model": "m1"}, {"model": "m2"}], **extra}


@pytest.mark.parametrize(
    ("doc", "location", "fragment"),
    [
        ({**base_doc(), "merge_methd": "x"}, "merge_methd", "did you mean 'merge_method'?"),
        (
            base_doc(models=[{"model": "a"}, {"model": "c", "paramters": {}}]),
            "models[1].paramters",
            "did you mean 'parameters'?",
        ),
        (
            base_doc(models=[{"model": "a"}, {"model": "c", "parameters": {"densty": 0.5}}]),
            "models[1].parameters.densty",
            "unknown parameter 'densty' for method 'ties' (did you mean 'density'?)",
        ),
        (base_doc(parameters={"lamda": 1.0}), "parameters.lamda", "did you mean 'lambda'?"),
        ({**base_doc(), "merge_method": "tie"}, "merge_method", "did you mean 'ties'?"),
        (
            base_doc(models=[{"model": "a", "parameters": {"normalize": True}}]),
            "models[0].parameters.normalize",
            "move it to the top-level 'parameters'",
        ),
        (base_doc(parameters={"density": 1.5}), "parameters.density", "must be in [0, 1], got 1.5"),
        (base_doc(parameters={"density": [0.1, 1.2]}), "parameters.density[1]", "must be in [0, 1]"),
        (
            base_doc(parameters={"density": [{"filter": "mlp", "value": "x"}]}),
            "parameters.density[0].value",
            "must be a number",
        ),
        (
            base_doc(parameters={"density": [{"filter": "mlp", "valeu": 1}]}),
            "parameters.density[0].valeu",
            "did you mean 'value'?",
        ),
        (base_doc(parameters={"density": [{"value": 1}, 0.5]}), "parameters.density", "mixes"),
        (base_doc(parameters={"density": []}), "parameters.density", "empty list"),
        (base_doc(parameters={"mode": "d"}), "parameters.mode", "must be one of ['a', 'b', 'c']"),
        (base_doc(parameters={"steps": [1, 2]}), "parameters.steps", "gradient (list) is not allowed"),
        (
            base_doc(parameters={"scope": [{"filter": "mlp", "value": "global"}]}),
            "parameters.scope",
            "applies to the whole model",
        ),
        (base_doc(parameters={"fisher": "f.safetensors"}), "parameters.fisher", "one file per model"),
        (
            base_doc(models=[{"model": "a", "parameters": {"fisher": "f"}}, {"model": "c"}]),
            "models",
            "given for models [0] but not for [1]",
        ),
        ({**base_doc(), "base_model": None}, "base_model", "set 'base_model'"),
        (base_doc(models=[{"model": "b"}]), "models", "only the base model"),
        (base_doc(dtype="bf16"), "dtype", "unknown dtype 'bf16'"),
        (base_doc(out_dtype="float8"), "out_dtype", "unknown dtype"),
        (base_doc(tokenizer_source="union"), "tokenizer_source", "'union' is not supported"),
        (base_doc(tokenizer={"source": "base", "tokens": {"<x>": {}}}), "tokenizer.tokens", "not supported"),
        (base_doc(tokenizer={}), "tokenizer.source", "'union' is not supported"),  # mergekit's default
        (base_doc(tokenizer={"sorce": "base"}), "tokenizer.sorce", "did you mean 'source'?"),
        (base_doc(tokenizer_source="base", tokenizer={"source": "base"}), "tokenizer", "not both"),
        (
            {**base_doc(), "base_model": None, "merge_method": "linear", "tokenizer_source": "base"},
            "tokenizer_source",
            "needs a base_model",
        ),
        ({**base_doc(), "modules": {}}, "modules", "not supported yet"),
        ({**base_doc(), "slices": []}, "models", "not both"),
        ({**base_doc(), "modules": {}}, "modules", "not supported yet"),
        (base_doc(exclude=["(unclosed"]), "exclude[0]", "invalid regular expression"),
        (base_doc(exclude="lm_head"), "exclude", "valid list"),
        (base_doc(seed=-1), "seed", "greater than or equal to 0"),
        (base_doc(seed=True), "seed", "valid integer"),
        (base_doc(models=["a"]), "models[0]", "write '- model: a'"),
        (base_doc(models=[{"model": "a+b+c"}]), "models[0].model", "at most one '+'"),
        (base_doc(models=[{"model": 3}]), "models[0].model", "got int 3"),
        (
            base_doc(models=[{"model": {"model": "a", "revision": "main"}}]),
            "models[0].model.revision",
            "unknown key",
        ),
        (base_doc(models=[{"parameters": {}}]), "models[0].model", "missing"),
        ({"merge_method": "ties", "base_model": "b"}, "models", "list the models"),
        (base_doc(models={"model": "a"}), "models", "valid list"),
    ],
)
def test_errors_name_location(
    tmp_path: Path, toy: MethodSpec, doc: dict[str, Any], location: str, fragment: str
) -> None:
    err = error_of(doc, base_dir=str(tmp_path))
    assert err.location == location, str(err)
    assert fragment in str(err), str(err)
    assert str(err).startswith(f"{location}: ")


def test_error_names_the_file_and_yaml_line(tmp_path: Path, toy: MethodSpec) -> None:
    p = write(
        tmp_path, "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {densty: 0.1}\n"
    )
    err = error_of(p)
    assert str(err) == (
        f"{p}: models[0].parameters.densty: unknown parameter 'densty' for method 'ties' "
        "(did you mean 'density'?); known: ['density', 'fisher', 'lambda', 'mode', 'normalize', 'scope', "
        "'steps', 'weight']"
    )
    bad = write(tmp_path, "merge_method: ties\nmodels: [\n  - model: a\n", "bad.yaml")
    err = error_of(bad)
    assert err.source == str(bad) and err.location.startswith("line ") and "invalid YAML" in str(err)
    assert "config file not found" in str(error_of(tmp_path / "nope.yaml"))
    assert "is a mapping" in str(error_of(write(tmp_path, "- a\n- b\n", "list.yaml")))


def test_unknown_parameter_of_a_real_method() -> None:
    doc = {"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "a"}],
           "parameters": {"lambd": 0.3}}  # fmt: skip
    err = error_of(doc)
    assert err.location == "parameters.lambd" and "did you mean 'lambda'?" in str(err)


def test_unknown_method_lists_ours() -> None:
    err = error_of({"merge_method": "frankenmerge", "models": [{"model": "a"}]})
    assert err.location == "merge_method" and "known:" in str(err) and "task_arithmetic" in str(err)


# ---------------------------------------------------------------------------------------------
# Models, paths, PEFT
# ---------------------------------------------------------------------------------------------


def test_paths_relative_to_the_config_file(tmp_path: Path, toy: MethodSpec) -> None:
    p = write(
        tmp_path / "configs" / "deep",
        """\
        merge_method: ties
        base_model: ../../ckpt/base
        models:
          - model: ./a
          - model: /abs/b
          - model: ~/c
        tokenizer_source: ../tok
        """,
    )
    cfg = load_config(p)
    assert cfg.base_model == ModelRef(str(tmp_path / "ckpt" / "base"))
    assert [e.model.path for e in cfg.models] == [
        str(tmp_path / "configs" / "deep" / "a"),
        "/abs/b",
        os.path.expanduser("~/c"),
    ]
    assert cfg.tokenizer_path == str(tmp_path / "configs" / "tok")
    assert cfg.source == str(p)
    # a dict is read relative to base_dir (default: the current directory)
    d = load_config({"merge_method": "linear", "models": [{"model": "x"}]}, base_dir=str(tmp_path))
    assert d.models[0].model.path == str(tmp_path / "x")


def test_peft_references(tmp_path: Path, toy: MethodSpec) -> None:
    adapter = tmp_path / "adapters" / "math_lora"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "llama"}')
    p = write(
        tmp_path,
        """\
        merge_method: ties
        base_model: base
        models:
          - model: base+adapters/code_lora     # mergekit's MODEL+LORA
          - model: {model: base, lora: adapters/x+y}
          - model: adapters/math_lora          # an adapter directory: applied to base_model
        """,
    )
    cfg = load_config(p)
    b = str(tmp_path / "base")
    assert [e.model for e in cfg.models] == [
        ModelRef(b, str(tmp_path / "adapters" / "code_lora")),
        ModelRef(b, str(tmp_path / "adapters" / "x+y")),
        ModelRef(b, str(adapter)),
    ]
    assert str(cfg.models[0].model) == f"{b}+{tmp_path / 'adapters' / 'code_lora'}"
    assert any("PEFT adapter" in n for n in cfg.notes)
    again = load_config(cfg.resolved())  # the '+' inside a path survives the round trip
    assert [e.model for e in again.models] == [e.model for e in cfg.models]
    err = error_of({"merge_method": "linear", "models": [{"model": str(adapter)}]})
    assert err.location == "models[0].model" and "set 'base_model'" in str(err)


def test_base_listed_among_models(tmp_path: Path, toy: MethodSpec) -> None:
    doc = {"merge_method": "ties", "base_model": "b",
           "models": [{"model": "b", "parameters": {"weight": 9.0}}, {"model": "m"}]}  # fmt: skip
    cfg = load_config(doc, base_dir=str(tmp_path))
    assert cfg.n_models == 1 and "ignored" in cfg.notes[0]
    # a method over full weights keeps it (mergekit's linear averages it in too)
    lin = {"merge_method": "linear", "base_model": "b", "models": [{"model": "b"}, {"model": "m"}]}
    assert load_config(lin, base_dir=str(tmp_path)).n_models == 2
    lin2 = {"merge_method": "linear", "base_model": "b", "models": [{"model": "m"}]}
    assert any("not averaged in" in n for n in load_config(lin2, base_dir=str(tmp_path)).notes)


def test_per_model_list_length_follows_merged_models(tmp_path: Path, toy: MethodSpec) -> None:
    doc = {"merge_method": "ties", "base_model": "b",
           "models": [{"model": "m1", "parameters": {"weight": 2.0}}, {"model": "b"}, {"model": "m2"},
                      {"model": "m3", "parameters": {"density": 0.5}}]}  # fmt: skip
    cfg = load_config(doc, base_dir=str(tmp_path))
    raw = cfg.raw_params_for("layers.0.w", layer_index=0, num_layers=4)
    assert raw["weight"] == [2.0, 1.0, 1.0] and raw["density"] == [1.0, 1.0, 0.5]
    r = resolve_params(TOY_TIES, raw, cfg.n_models)
    assert r["weight"] == (2.0, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# dtypes, our keys, round trip
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "out_dtype", "compute", "output"),
    [
        (None, None, torch.float32, None),
        ("float64", None, torch.float64, torch.float64),
        ("bfloat16", None, torch.float32, torch.bfloat16),
        ("torch.float16", "float32", torch.float32, torch.float32),
        (None, "bfloat16", torch.float32, torch.bfloat16),
    ],
)
def test_dtypes(tmp_path: Path, dtype: str | None, out_dtype: str | None, compute: torch.dtype,
                output: torch.dtype | None) -> None:  # fmt: skip
    doc: dict[str, Any] = {"merge_method": "linear", "models": [{"model": "a"}]}
    if dtype:
        doc["dtype"] = dtype
    if out_dtype:
        doc["out_dtype"] = out_dtype
    cfg = load_config(doc, base_dir=str(tmp_path))
    assert cfg.compute_dtype == compute and cfg.output_dtype == output


def test_our_keys_and_recorded_keys(tmp_path: Path, toy: MethodSpec) -> None:
    cfg = load_config(
        base_doc(
            seed=7, exclude=["^lm_head\\.", "classifier"], chat_template="chatml", tokenizer_source="base"
        ),
        base_dir=str(tmp_path),
    )
    assert cfg.seed == 7 and cfg.exclude == ("^lm_head\\.", "classifier")
    assert cfg.chat_template == "chatml" and cfg.tokenizer_path == str(tmp_path / "b")
    tok = load_config(base_doc(tokenizer={"source": "m1"}), base_dir=str(tmp_path))
    assert tok.tokenizer_path == str(tmp_path / "m1")


def test_resolved_round_trip(tmp_path: Path, toy: MethodSpec) -> None:
    cfg = load_config(write(tmp_path, DARE_TIES))
    res = cfg.resolved()
    assert res["parameters"]["mode"] == "a" and res["parameters"]["steps"] == 3  # defaults recorded
    assert "int8_mask" not in json.dumps(res)
    again = load_config(yaml.safe_load(cfg.to_yaml()))
    names = [f"model.layers.{i}.{m}.weight" for i in range(8) for m in ("mlp.up_proj", "self_attn.v_proj")]
    names.append("lm_head.weight")
    assert again.params_by_tensor(names) == cfg.params_by_tensor(names)
    assert again.output_dtype == cfg.output_dtype == torch.bfloat16
    assert again.to_yaml() == cfg.to_yaml()


# ---------------------------------------------------------------------------------------------
# Examples and the validate command
# ---------------------------------------------------------------------------------------------


def test_there_is_an_example_per_method() -> None:
    stems = {Path(p).stem for p in EXAMPLES}
    assert stems >= {"linear", "task_arithmetic", "ties", "ties_paper", "dare_linear", "dare_ties", "pcb",
                     "pcb_dare", "emr", "fisher", "regmean"}  # fmt: skip


@pytest.mark.parametrize("path", EXAMPLES, ids=[Path(p).stem for p in EXAMPLES])
def test_example_validates(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    method = yaml.safe_load(Path(path).read_text())["merge_method"]
    cfg = load_config(path)
    assert isinstance(cfg, MergeConfig) and cfg.merge_method == method
    assert cfg.params_by_tensor(["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"])
    assert main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert f"method: {method}" in out and out.rstrip().endswith("OK")


def test_validate_cli(tmp_path: Path, toy: MethodSpec, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, DARE_TIES)
    assert main(["validate", str(p)]) == 0
    out = capsys.readouterr().out
    assert "method: ties" in out and "gradient [0.0, 0.5, 0.3, 0.7, 1.0] over layers" in out
    assert "output dtype: bfloat16" in out and "note: not found (yet):" in out
    assert main(["validate", "--json", str(p)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["merge_method"] == "ties" and len(data["config"]["models"]) == 2
    assert main(["validate", "--check-paths", str(p)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found:" in err
    bad = write(
        tmp_path,
        "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {densty: 1}}]\n",
        "b.yaml",
    )
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "models[0].parameters.densty" in err and "did you mean 'density'?" in err
