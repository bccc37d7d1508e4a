"""Hypothesis 2: what the word-embedding matrix does to each scope. Merges (seed SEED experts of
docs/results/analysis/h1-seed0.yaml, cached) are composed tensor by tensor and scored on the held-in test splits
with the harness's own score/summarise (same numbers as `weightmerge eval`).

Usage: OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python docs/results/analysis/hybrids.py SEED OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from weightmerge import merge_state_dicts
from weightmerge.eval.cache import default_cache_dir
from weightmerge.eval.config import load_config
from weightmerge.eval.model import load_encoder
from weightmerge.eval.runner import prepare_seed, reference_rows, score_merged, summarise

torch.set_num_threads(1)
seed = int(sys.argv[1])
out_path = Path(sys.argv[2])
cfg = load_config(Path(__file__).parent / "h1-seed0.yaml")
cache = default_cache_dir()
enc = load_encoder(cfg.model, cache_dir=cache)
ctx = prepare_seed(cfg, enc, seed, cache_dir=cache, progress=False, log=lambda m: None)
assert all(e.cached for e in ctx.experts.values())
reference, _ = reference_rows(ctx)
base = enc.base_state
bodies = [ctx.experts[t].body for t in ctx.held_in]
WE = "embeddings.word_embeddings.weight"
assert WE in base
NOWE = {"exclude": [r"embeddings\.word_embeddings\.weight"]}

cache_m: dict = {}


def m(label, method, params):
    if label not in cache_m:
        cache_m[label] = merge_state_dicts(base, bodies, method, params, seed=seed)
    return cache_m[label]


def compose(main, we_from):
    out = dict(main)
    out[WE] = base[WE] if we_from is None else we_from[WE]
    return out


res = {}


def run(label, state):
    scores = score_merged(ctx, state, tasks=ctx.held_in, held_out=(), validation=False)
    row = summarise(ctx, scores, reference)
    res[label] = {"normalized_avg": row["normalized_avg"], "avg": row["avg"]}
    print(f"{label}: norm {row['normalized_avg']:.4f} avg {row['avg']:.4f}", flush=True)
    out_path.write_text(json.dumps(res, indent=2) + "\n")


ties_pt = m("ties_pt", "ties", {"density": 0.2})
pcb_pt = m("pcb_pt", "pcb", {"keep_ratio": 0.1, "scope": "per_tensor"})
pcb_g = m("pcb_g", "pcb", {"keep_ratio": 0.1})
ties_g = m("ties_g", "ties", {"density": 0.2, "scope": "global"})
run("sanity ties_default (pt)", ties_pt)
run("sanity pcb_default (global)", pcb_g)
# per-tensor merges with the word embeddings left at the base (what embeddings are worth)
run("ties_pt, word_emb=base", compose(ties_pt, None))
run("pcb_pt, word_emb=base", compose(pcb_pt, None))
# global merges given the per-tensor merge of the word embeddings
run("pcb_global, word_emb from pcb_pt", compose(pcb_g, pcb_pt))
run("ties_global, word_emb from ties_pt", compose(ties_g, ties_pt))
# global statistics over every tensor EXCEPT word embeddings (their ~10.5M zero deltas no longer
# dilute the global rank), word embeddings per tensor
pcb_g_nowe = merge_state_dicts(base, bodies, "pcb", {"keep_ratio": 0.1, **NOWE}, seed=seed)
run("pcb_global(no word_emb in stats), word_emb from pcb_pt", compose(pcb_g_nowe, pcb_pt))
del pcb_g_nowe
ties_g_nowe = merge_state_dicts(base, bodies, "ties", {"density": 0.2, "scope": "global", **NOWE}, seed=seed)
run("ties_global(no word_emb in stats), word_emb from ties_pt", compose(ties_g_nowe, ties_pt))
del ties_g_nowe
# matched kept fraction: TIES per tensor at density 0.1 (= PCB keep_ratio)
run("ties_pt density 0.1", merge_state_dicts(base, bodies, "ties", {"density": 0.1}, seed=seed))
