"""Drift and interference statistics of cached experts (adapted from stats_experts.py, without the
global quantiles and merge footprints): relative drift ||tau|| / ||theta_0|| per expert and per
parameter group, pairwise cosine of the task vectors, exact-zero fraction, sign conflicts.

Usage: OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python docs/results/analysis/recipe_strong_stats.py CONFIG SEED OUT.json
CONFIG is an eval config (e.g. docs/results/analysis/recipe-strong.yaml, or h1-seed0.yaml for the
default recipe); its experts for SEED should be in the cache: like stats_experts.py it fails
(after the fact) if any had to be trained.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from weightmerge.eval.cache import default_cache_dir
from weightmerge.eval.config import load_config
from weightmerge.eval.model import load_encoder
from weightmerge.eval.runner import prepare_seed

torch.set_num_threads(1)
cfg_path, seed, out_path = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
cfg = load_config(cfg_path).model_copy(update={"held_out": []})
cache = default_cache_dir()
enc = load_encoder(cfg.model, cache_dir=cache)


ctx = prepare_seed(cfg, enc, seed, cache_dir=cache, progress=False, log=lambda m: print(m, file=sys.stderr))
assert all(e.cached for e in ctx.experts.values()), "experts were not all cached (some were trained)"
base = {k: v.float() for k, v in enc.base_state.items()}
tasks = list(ctx.held_in)
bodies = [ctx.experts[t].body for t in tasks]
keys = sorted(base)


def group(k: str) -> str:
    if "word_embeddings" in k:
        return "word_emb"
    if "position_embeddings" in k or "token_type_embeddings" in k:
        return "pos/type_emb"
    if "LayerNorm" in k:
        return "layernorm"
    if k.startswith("pooler"):
        return "pooler"
    if k.endswith(".bias"):
        return "linear_bias"
    if re.search(r"attention\.(self|output)", k):
        return "attn_weight"
    return "ffn_weight"


groups = sorted({group(k) for k in keys})
res: dict = {"config": str(cfg_path), "training": cfg.training.model_dump(), "seed": seed, "tasks": tasks}
res["expert_val_acc"] = {t: ctx.experts[t].val_accuracy for t in tasks}
T = {k: torch.stack([b[k].float().reshape(-1) - base[k].reshape(-1) for b in bodies]) for k in keys}
per = {}
for g in groups:
    ks = [k for k in keys if group(k) == g]
    x = torch.cat([T[k] for k in ks], dim=1)
    b = torch.cat([base[k].reshape(-1) for k in ks])
    norms = x.norm(dim=1)
    per[g] = {
        "numel": x.shape[1],
        "rel_drift_mean": float((norms / b.norm().clamp(min=1e-12)).mean()),
        "frac_nonzero_mean": float((x != 0).float().mean()),
    }
res["per_group"] = per
flat = torch.cat([T[k] for k in keys], dim=1)
base_flat = torch.cat([base[k].reshape(-1) for k in keys])
tau = flat.norm(dim=1)
res["base_norm_total"] = float(base_flat.norm())
res["tau_norm_total"] = [round(float(v), 5) for v in tau]
res["rel_drift_per_expert"] = {t: float(v) / res["base_norm_total"] for t, v in zip(tasks, tau, strict=True)}
res["rel_drift_mean"] = float(tau.mean()) / res["base_norm_total"]
ne = [k for k in keys if group(k) != "word_emb"]
flat_ne = torch.cat([T[k] for k in ne], dim=1)
res["rel_drift_mean_without_word_emb"] = float(flat_ne.norm(dim=1).mean()) / float(
    torch.cat([base[k].reshape(-1) for k in ne]).norm()
)


def cos_stats(x: torch.Tensor) -> tuple[float, float]:
    u = x / x.norm(dim=1, keepdim=True)
    c = u @ u.T
    off = c[~torch.eye(len(tasks), dtype=torch.bool)]
    return float(off.mean()), float(off.max())


res["cosine_offdiag_mean"], res["cosine_offdiag_max"] = cos_stats(flat)
res["cosine_offdiag_mean_without_word_emb"], res["cosine_offdiag_max_without_word_emb"] = cos_stats(flat_ne)
pos, neg = (flat > 0).sum(0), (flat < 0).sum(0)
multi = (pos + neg) >= 2
res["whole_frac_exact_zero_mean"] = float((flat == 0).float().mean())
res["whole_frac_sign_conflict_of_multi"] = float(((pos > 0) & (neg > 0) & multi).sum() / multi.sum())
out_path.write_text(json.dumps(res, indent=2) + "\n")
print(json.dumps(res, indent=1))
