"""mergekit's own example configs, run by ``weightmerge merge`` and by ``mergekit-yaml`` (0.1.5).

Every config in mergekit's ``examples/`` folder (github.com/arcee-ai/mergekit, read at a6e4028:
arcee_fusion, bio-merge, gradient-slerp, linear, orcamini-platy-44layer, ties) is kept as written
except that each Hugging Face model id points at a tiny generated checkpoint with the same tensor
names (a 40-layer Llama of width 32 stored in float32; experts are the base plus task vectors in
which no two entries tie in magnitude, so TIES's trimming has one answer, see ``_family``). Both tools
merge it; every output tensor is compared. Each example runs twice: as written (``dtype:
float16``: mergekit rounds the inputs to float16 and computes in float16, weightmerge computes in
float32 and rounds once, so they differ by rounding) and with ``dtype: float32`` (both compute in
float32). ``tests/test_mergekit_compat.py`` asserts the results; ``python tests/mergekit_compat.py``
prints the table of docs/mergekit-compat.md.
"""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ckpt_fixtures import llama_shapes, save_checkpoint, tiny_llama_config

# The example configs with {name} where mergekit's file names a model.
EXAMPLES: dict[str, str] = {
    "arcee_fusion.yml": """
models:
  - model: {model_a}
  - model: {model_b}
merge_method: arcee_fusion
base_model: {model_a}
dtype: bfloat16
""",
    "bio-merge.yml": """
models:
  - model: {mistral_instruct}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {biomistral}
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: {mistral}
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
    "gradient-slerp.yml": """
slices:
  - sources:
      - model: {orca}
        layer_range: [0, 40]
      - model: {platypus}
        layer_range: [0, 40]
merge_method: slerp
base_model: {orca}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
""",
    "linear.yml": """
models:
  - model: {orca}
    parameters:
      weight: 1.0
  - model: {wizardlm}
    parameters:
      weight: 0.3
  - model: {platypus}
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "orcamini-platy-44layer.yml": """
slices:
  - sources:
    - model: {orca}
      layer_range: [0, 24]
  - sources:
    - model: {platypus}
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
    "ties.yml": """
models:
  - model: {orca}
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {platypus}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: {wizardmath}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {llama2}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
}
LLAMA = ("orca", "platypus", "wizardlm", "wizardmath", "model_a", "model_b")
MISTRAL = ("mistral_instruct", "biomistral")


def _family(root: Path, names: tuple[str, ...], *, seed: int) -> tuple[str, dict[str, str]]:
    """A base and one expert per name. Base values lie on a 2**-20 grid and every expert's task
    vector holds distinct multiples of 2**-24 (a random permutation of 1..numel, random signs), so
    weights and task vectors are exact in float32 and no two entries of a task vector tie in
    magnitude: TIES's trimming has one answer, whoever computes it."""
    config = tiny_llama_config(num_hidden_layers=40)
    g = torch.Generator().manual_seed(seed)
    base = {
        k: torch.round(torch.randn(shape, generator=g) * 0.02 * 2**20) / 2**20
        for k, shape in llama_shapes(config).items()
    }
    base_dir = save_checkpoint(base, root / "base", "single", config)
    out = {}
    for name in names:
        sd = {}
        for k, v in base.items():
            mag = (torch.randperm(v.numel(), generator=g) + 1).reshape(v.shape).float()
            sign = torch.randint(0, 2, v.shape, generator=g).float() * 2 - 1
            sd[k] = v + sign * mag * 2**-24
        out[name] = str(save_checkpoint(sd, root / name, "single", config))
    return str(base_dir), out


def make_models(root: Path) -> dict[str, str]:
    """The tiny checkpoints: a Llama-2 family (base llama2) and a Mistral family (base mistral)."""
    base, names = _family(root / "llama", LLAMA, seed=0)
    names["llama2"] = base
    base, more = _family(root / "mistral", MISTRAL, seed=7)
    names.update(more, mistral=base)
    return names


@dataclass
class Outcome:
    example: str
    dtype: str
    ours: str  # "ok" or our error message
    theirs: str  # "ok" or mergekit's error
    tensors: int = 0
    bit_exact: int = 0  # tensors equal bit for bit
    max_ulps: float = 0.0  # largest difference, in units of the output dtype's eps at |theirs|max
    max_abs: float = 0.0


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _run_ours(cfg: Path, out: Path) -> str:
    from weightmerge.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["merge", "-q", str(cfg), str(out)])
    if rc == 0:
        return "ok"
    line = err.getvalue().strip().splitlines()[-1]
    return line.split(": ", 3)[-1].split(";")[0]  # the message, without the file and the list


def _run_theirs(cfg: Path, out: Path) -> str:
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            mergekit_yaml.main([str(cfg), str(out), "--quiet", "--no-copy-tokenizer"], standalone_mode=False)
    except Exception as err:  # the table records what mergekit said
        return f"{type(err).__name__}: {err}".splitlines()[0][:120]
    return "ok"


def run_example(name: str, models: dict[str, str], work: Path, *, dtype: str | None = None) -> Outcome:
    text = EXAMPLES[name].format(**models)
    label = "as written"
    if dtype is not None:
        text = text.replace("dtype: float16", f"dtype: {dtype}").replace("dtype: bfloat16", f"dtype: {dtype}")
        label = dtype
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / name
    cfg.write_text(text)
    res = Outcome(name, label, _run_ours(cfg, work / "ours"), _run_theirs(cfg, work / "theirs"))
    if res.ours != "ok" or res.theirs != "ok":
        return res
    ours, theirs = _tensors(work / "ours"), _tensors(work / "theirs")
    if sorted(ours) != sorted(theirs):
        only = sorted(set(ours) ^ set(theirs))
        res.ours = f"tensor names differ ({len(only)}: {only[:3]})"
        return res
    res.tensors = len(theirs)
    for k, b in theirs.items():
        a = ours[k]
        if a.dtype != b.dtype or a.shape != b.shape:
            res.ours = f"{k}: {a.dtype} {tuple(a.shape)} vs mergekit {b.dtype} {tuple(b.shape)}"
            return res
        if torch.equal(a, b):
            res.bit_exact += 1
            continue
        diff = (a.double() - b.double()).abs().max().item()
        scale = max(b.double().abs().max().item(), 1e-30) * torch.finfo(b.dtype).eps
        res.max_abs = max(res.max_abs, diff)
        res.max_ulps = max(res.max_ulps, diff / scale)
    return res


def table(rows: list[Outcome]) -> str:
    out = [
        "| example | dtype | weightmerge | mergekit-yaml | tensors equal bit for bit | largest difference |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.ours == "ok" and r.theirs == "ok":
            equal = f"{r.bit_exact} / {r.tensors}"
            largest = "0" if r.bit_exact == r.tensors else f"{r.max_abs:.3g} ({r.max_ulps:.2f} eps x max)"
        else:
            equal = largest = "-"
        out.append(f"| {r.example} | {r.dtype} | {r.ours} | {r.theirs} | {equal} | {largest} |")
    return "\n".join(out)


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        models = make_models(Path(tmp) / "models")
        rows = []
        for name in EXAMPLES:
            for dtype in (None, "float32"):
                rows.append(run_example(name, models, Path(tmp) / name / str(dtype), dtype=dtype))
                print(rows[-1], file=sys.stderr)
    print(table(rows))


if __name__ == "__main__":
    main()
