"""Task-vector statistics of the cached experts (hypotheses 2 and 4) and per-group footprint of
merges (which tensors each method actually changes).

Usage: OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python docs/results/analysis/stats_experts.py SEED OUT.json
Loads the experts of docs/results/analysis/h1-seed0.yaml for SEED from the cache (never trains: fails if missing).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch

from weightmerge import merge_state_dicts
from weightmerge.eval.cache import default_cache_dir
from weightmerge.eval.config import load_config
from weightmerge.eval.model import load_encoder
from weightmerge.eval.runner import prepare_seed

torch.set_num_threads(1)
seed = int(sys.argv[1])
out_path = Path(sys.argv[2])
cfg = load_config(Path(__file__).parent / "h1-seed0.yaml")
cache = default_cache_dir()
enc = load_encoder(cfg.model, cache_dir=cache)
ctx = prepare_seed(cfg, enc, seed, cache_dir=cache, progress=False, log=lambda m: print(m, file=sys.stderr))
assert all(e.cached for e in ctx.experts.values()), "experts not cached"
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
numel = {g: sum(base[k].numel() for k in keys if group(k) == g) for g in groups}
D = sum(numel.values())
res: dict = {"seed": seed, "tasks": tasks, "D": D, "numel": numel, "keys": len(keys)}
res["expert_val_acc"] = {t: ctx.experts[t].val_accuracy for t in tasks}

# Task vectors, per group
T = {k: torch.stack([b[k].float().reshape(-1) - base[k].reshape(-1) for b in bodies]) for k in keys}
per = {}
for g in groups:
    ks = [k for k in keys if group(k) == g]
    x = torch.cat([T[k] for k in ks], dim=1)  # (n, numel_g)
    b = torch.cat([base[k].reshape(-1) for k in ks])
    nz = (x != 0)
    norms = x.norm(dim=1)
    # sign conflicts among entries where >= 2 experts are non-zero
    pos, neg = (x > 0).sum(0), (x < 0).sum(0)
    multi = (pos + neg) >= 2
    conflict = multi & (pos > 0) & (neg > 0)
    per[g] = {
        "numel": x.shape[1],
        "tau_norm_per_expert": [round(float(v), 5) for v in norms],
        "tau_sq_share_mean": None,  # filled below
        "rel_drift_mean": float((norms / b.norm().clamp(min=1e-12)).mean()),
        "frac_nonzero_mean": float(nz.float().mean()),
        "mean_abs_nonzero": float(x.abs().sum() / nz.sum().clamp(min=1)),
        "frac_sign_conflict_of_multi": float(conflict.sum() / multi.sum().clamp(min=1)),
        "frac_multi": float(multi.float().mean()),
    }
    del x, nz, pos, neg, multi, conflict
tot_sq = [sum(per[g]["tau_norm_per_expert"][i] ** 2 for g in groups) for i in range(len(tasks))]
for g in groups:
    per[g]["tau_sq_share_mean"] = sum(
        per[g]["tau_norm_per_expert"][i] ** 2 / tot_sq[i] for i in range(len(tasks))
    ) / len(tasks)
res["per_group"] = per
res["tau_norm_total"] = [round(v**0.5, 5) for v in tot_sq]
res["base_norm_total"] = float(torch.sqrt(sum((base[k] ** 2).sum() for k in keys)))

# whole-model: cosine between experts, sign conflicts, quantiles of |tau| per expert
flat = torch.cat([T[k] for k in keys], dim=1)
nrm = flat.norm(dim=1, keepdim=True)
cos = (flat / nrm) @ (flat / nrm).T
off = cos[~torch.eye(len(tasks), dtype=torch.bool)]
res["cosine_offdiag_mean"] = float(off.mean())
res["cosine_offdiag_max"] = float(off.max())
pos, neg = (flat > 0).sum(0), (flat < 0).sum(0)
multi = (pos + neg) >= 2
res["whole_frac_exact_zero_mean"] = float((flat == 0).float().mean())
res["whole_frac_sign_conflict_of_multi"] = float(((pos > 0) & (neg > 0) & multi).sum() / multi.sum())
# top-20 % per expert (TIES trim, per tensor): conflict among surviving entries
kept = torch.zeros_like(flat, dtype=torch.bool)
off0 = 0
for k in keys:
    m = T[k].shape[1]
    kk = max(1, int(0.2 * m))
    if kk < m:
        thr = T[k].abs().topk(kk, dim=1).values[:, -1:]
        kept[:, off0 : off0 + m] = T[k].abs() >= thr
    else:
        kept[:, off0 : off0 + m] = True
    off0 += m
kept &= flat != 0
tp, tn = ((flat > 0) & kept).sum(0), ((flat < 0) & kept).sum(0)
tm = (tp + tn) >= 2
res["trim20_pt_frac_sign_conflict_of_multi"] = float(((tp > 0) & (tn > 0) & tm).sum() / tm.sum())
del kept, tp, tn, tm, pos, neg, multi
# global order statistics of |tau| per expert (what global scope thresholds on)
q = {}
for name, frac in (("top10pct_thr", 0.9), ("top20pct_thr", 0.8), ("clamp_hi_1pct", 0.99), ("clamp_hi_1e-4", 0.9999)):
    idx = int(frac * D)
    q[name] = [float(torch.kthvalue(flat[i].abs(), idx).values) for i in range(len(tasks))]
res["global_abs_quantiles"] = q
# fraction of each group's entries above the global top-20 % / top-10 % threshold (avg over experts)
above = {}
for name in ("top10pct_thr", "top20pct_thr"):
    above[name] = {}
    for g in groups:
        ks = [k for k in keys if group(k) == g]
        x = torch.cat([T[k] for k in ks], dim=1).abs()
        thr = torch.tensor(q[name])[:, None]
        above[name][g] = float((x >= thr).float().mean())
res["frac_of_group_above_global_thr"] = above
del flat

# Footprint of merges: per group, fraction of entries changed and norm of merged tau
configs = {
    "ties_default(pt)": ("ties", {"density": 0.2}),
    "ties_mk_global": ("ties", {"density": 0.2, "scope": "global"}),
    "pcb_default(global)": ("pcb", {"keep_ratio": 0.1}),
    "pcb_pt": ("pcb", {"keep_ratio": 0.1, "scope": "per_tensor"}),
    "task_arithmetic_0.3": ("task_arithmetic", {"lambda": 0.3}),
}
foot = {}
for label, (m, p) in configs.items():
    t0 = time.perf_counter()
    merged = merge_state_dicts(base, bodies, m, p, seed=seed)
    secs = time.perf_counter() - t0
    f = {}
    for g in groups:
        ks = [k for k in keys if group(k) == g]
        d = torch.cat([(merged[k].float() - base[k]).reshape(-1) for k in ks])
        f[g] = {"frac_changed": float((d != 0).float().mean()), "tau_m_norm": float(d.norm())}
    foot[label] = {"merge_seconds": secs, "per_group": f}
    del merged
res["merge_footprint"] = foot
out_path.write_text(json.dumps(res, indent=2) + "\n")
print(json.dumps(res, indent=1))
