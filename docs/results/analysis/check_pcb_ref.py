"""Correctness at scale: weightmerge's pcb vs tests/ref_pcb.py on the real seed-SEED experts.

Usage: OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python docs/results/analysis/check_pcb_ref.py SEED OUT.json

Memory: the float64 reference on the whole 22.7M-parameter model x 8 experts does not fit next to
other jobs (~20 GB), so the checks are
  1. global scope, float64, every tensor except embeddings.word_embeddings (D ~ 11M),
  2. per_tensor scope, float64, every tensor except embeddings.word_embeddings,
  3. global scope on the WHOLE model (all tensors), reference pcb_vector fed float32 task vectors
     (its arithmetic then runs in float32) vs weightmerge float32 (the harness's compute dtype).
weightmerge is run in float64 for 1-2 (float64 compute) and float32 for 3; also float32 for 1.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import ref_pcb  # noqa: E402

from weightmerge import merge_state_dicts  # noqa: E402
from weightmerge.eval.cache import default_cache_dir  # noqa: E402
from weightmerge.eval.config import load_config  # noqa: E402
from weightmerge.eval.model import load_encoder  # noqa: E402
from weightmerge.eval.runner import prepare_seed  # noqa: E402

torch.set_num_threads(1)
seed = int(sys.argv[1])
out_path = Path(sys.argv[2])
cfg = load_config(Path(__file__).parent / "h1-seed0.yaml")
cache = default_cache_dir()
enc = load_encoder(cfg.model, cache_dir=cache)
ctx = prepare_seed(cfg, enc, seed, cache_dir=cache, progress=False, log=lambda m: None)
assert all(e.cached for e in ctx.experts.values())
base_all = {k: v.float() for k, v in enc.base_state.items()}
bodies_all = [ctx.experts[t].body for t in ctx.held_in]
results: dict = {"seed": seed}


def compare(label, ours, ref, base, keys):
    d_ours = torch.cat([(ours[k].double() - base[k].double()).reshape(-1) for k in keys])
    d_ref = torch.cat([(ref[k].double() - base[k].double()).reshape(-1) for k in keys])
    diff = (d_ours - d_ref).abs()
    r = {
        "D": d_ref.numel(),
        "max_abs_diff": float(diff.max()),
        "rel_l2_diff": float(diff.norm() / d_ref.norm()),
        "ref_tau_norm": float(d_ref.norm()),
        "n_diff_gt_1e-6_abs": int((diff > 1e-6).sum()),
        "support_mismatch": int(((d_ours != 0) != (d_ref != 0)).sum()),
        "ref_nonzero": int((d_ref != 0).sum()),
    }
    results[label] = r
    print(label, json.dumps(r), flush=True)


params = {"keep_ratio": 0.1, "clamp_ratio": 0.01, "lambda": 1.0}
sub = sorted(k for k in base_all if "word_embeddings" not in k)
base = {k: base_all[k].double() for k in sub}  # float64 in -> float64 out (no cast-back rounding)
bodies = [{k: b[k].double() for k in sub} for b in bodies_all]

# 1. global, float64, without word embeddings
t0 = time.perf_counter()
ref = ref_pcb.pcb_state_dicts(base, bodies, keep_ratio=0.1, clamp_ratio=0.01, lam=1.0, scope="global")
t_ref = time.perf_counter() - t0
for dt in (torch.float64, torch.float32):
    ours = merge_state_dicts(base, bodies, "pcb", {**params, "scope": "global"}, seed=seed, compute_dtype=dt)
    compare(f"global_noWordEmb_ours_{str(dt)[6:]}_vs_ref_fp64", ours, ref, base, sub)
    del ours
results["ref_seconds_global_noWordEmb"] = t_ref
del ref
gc.collect()

# 2. per_tensor, float64, without word embeddings
ref = ref_pcb.pcb_state_dicts(base, bodies, keep_ratio=0.1, clamp_ratio=0.01, lam=1.0, scope="per_tensor")
for dt in (torch.float64, torch.float32):
    ours = merge_state_dicts(base, bodies, "pcb", {**params, "scope": "per_tensor"}, seed=seed, compute_dtype=dt)
    compare(f"per_tensor_noWordEmb_ours_{str(dt)[6:]}_vs_ref_fp64", ours, ref, base, sub)
    del ours
del ref, bodies
gc.collect()

# 3. global, whole model, float32 reference arithmetic
keys = sorted(base_all)
T = torch.stack([torch.cat([(b[k].float() - base_all[k]).reshape(-1) for k in keys]) for b in bodies_all])
t0 = time.perf_counter()
tau, W, Tc = ref_pcb.pcb_vector(T, keep_ratio=0.1, clamp_ratio=0.01, lam=[1.0] * T.shape[0], inter="A")
results["ref_seconds_global_whole_fp32"] = time.perf_counter() - t0
del W, Tc, T
gc.collect()
flat_base = torch.cat([base_all[k].reshape(-1) for k in keys])
ref = ref_pcb.unflatten((flat_base.double() + tau.double()).float(), base_all, keys)
del tau
ours = merge_state_dicts(base_all, bodies_all, "pcb", {**params, "scope": "global"}, seed=seed)
compare("global_whole_ours_fp32_vs_ref_fp32", ours, ref, base_all, keys)
out_path.write_text(json.dumps(results, indent=2) + "\n")
