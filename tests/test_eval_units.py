"""Unit tests of the evaluation harness: pooling, accuracy, probes, statistics, training, config,
aggregation. A tiny random BERT (no download) stands in for the encoder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from weightmerge.eval import cache as cache_lib
from weightmerge.eval.config import EvalConfigError, builtin_config, grid_points, parse_config
from weightmerge.eval.evaluate import (
    accuracy,
    few_shot_index,
    fit_probe,
    head_accuracy,
    head_predictions,
    pooled_features,
)
from weightmerge.eval.model import (
    Classifier,
    collate,
    encode,
    head_from_state,
    load_encoder,
    mean_pool,
)
from weightmerge.eval.report import aggregate, stat
from weightmerge.eval.runner import _subsets
from weightmerge.eval.stats import fisher_diagonal, gram_matrices
from weightmerge.eval.train import (
    TrainSettings,
    _eval_steps,
    _linear_schedule,
    epoch_batches,
    expert_key,
    fine_tune,
)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory):
    return load_encoder("tiny-random", cache_dir=tmp_path_factory.mktemp("cache"))


EXAMPLES = [
    ("abc cab bca", 0),
    ("xyz zyx", 1),
    ("a b c a", 0),
    ("zz yy xx zz yy", 1),
    ("cab", 0),
    ("yx", 1),
]


# --------------------------------------------------------------------------------------------- model


def test_mean_pool_hand_computed() -> None:
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(mean_pool(h, mask), torch.tensor([[2.0, 3.0], [7.0, 8.0]]))
    # an all-padding row gives 0, not NaN
    assert torch.equal(mean_pool(h[:1], torch.zeros((1, 3), dtype=torch.long)), torch.zeros((1, 2)))


def test_tiny_random_encoder_is_deterministic(tmp_path: Path, encoder) -> None:
    again = load_encoder("tiny-random", cache_dir=tmp_path)
    assert again.fingerprint == encoder.fingerprint
    assert set(again.base_state) == set(encoder.base_state)
    for k, v in encoder.base_state.items():
        assert torch.equal(v, again.base_state[k]), k


def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a built-in model"):
        load_encoder(str(tmp_path / "nope"), cache_dir=tmp_path)


def test_collate_pads_and_masks(encoder) -> None:
    enc = encode(encoder.tokenizer, EXAMPLES[:2], max_length=64)
    ids, mask, labels = collate(enc, [1, 0])
    n0, n1 = len(enc.ids[0]), len(enc.ids[1])
    assert ids.shape == (2, max(n0, n1))
    assert mask.sum(dim=1).tolist() == [n1, n0]
    assert labels.tolist() == [1, 0]
    assert ids[0, n1:].eq(enc.pad_id).all()
    # [CLS] a b c ... [SEP]: special tokens added, truncation respected
    short = encode(encoder.tokenizer, [("abcdefghij", 0)], max_length=5)
    assert len(short.ids[0]) == 5


def test_pooled_features_match_one_at_a_time(encoder) -> None:
    enc = encode(encoder.tokenizer, EXAMPLES, max_length=64)
    body = encoder.new_body()
    batched = pooled_features(body, enc, batch_size=4)
    for i in range(len(EXAMPLES)):
        ids, mask, _ = collate(enc, [i])
        with torch.no_grad():
            single = mean_pool(body(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        torch.testing.assert_close(batched[i], single[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- evaluate


def test_head_accuracy_hand_computed() -> None:
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    head = {"weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "bias": torch.tensor([0.0, 0.0])}
    # logits: [1,0] [0,1] [1,1] (tie -> class 0) [-1,0]
    assert head_predictions(head, feats).tolist() == [0, 1, 0, 1]
    assert head_accuracy(head, feats, torch.tensor([0, 1, 1, 1])) == 0.75
    with pytest.raises(ValueError, match="differ"):
        accuracy(torch.tensor([0, 1]), torch.tensor([0]))


def test_fit_probe_separates_and_folds_standardisation() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0, 100.0], [0.0, 5.0, 100.0], [-5.0, -5.0, 100.0]])
    labels = torch.arange(3).repeat_interleave(20)
    feats = centers[labels] + 0.5 * torch.randn((60, 3), generator=g)
    head = fit_probe(feats, labels, n_classes=3)
    assert head["weight"].shape == (3, 3) and head["bias"].shape == (3,)
    assert head_accuracy(head, feats, labels) == 1.0
    # deterministic
    again = fit_probe(feats, labels, n_classes=3)
    assert torch.equal(head["weight"], again["weight"])


def test_few_shot_index_counts_and_determinism() -> None:
    labels = [0] * 10 + [1] * 3 + [2] * 7
    idx = few_shot_index(labels, shots=4, seed=1)
    picked = [labels[i] for i in idx]
    assert picked.count(0) == 4 and picked.count(1) == 3 and picked.count(2) == 4
    assert idx == sorted(set(idx)) == few_shot_index(labels, shots=4, seed=1)
    assert idx != few_shot_index(labels, shots=4, seed=2)
    with pytest.raises(ValueError):
        few_shot_index(labels, shots=0, seed=0)


# -------------------------------------------------------------------------------------------- stats


def test_gram_matrices_against_direct_computation(encoder) -> None:
    enc = encode(encoder.tokenizer, EXAMPLES, max_length=64)
    body = encoder.new_body()
    grams = gram_matrices(body, enc, examples=5, batch_size=2)
    params = {k for k, _ in body.named_parameters()}
    linears = {n for n, m in body.named_modules() if isinstance(m, torch.nn.Linear)}
    # every Linear that runs has a Gram; keys name modules whose weight is a body parameter
    assert {k for k in grams} <= linears and all(f"{k}.weight" in params for k in grams)
    assert "encoder.layer.0.attention.self.query" in grams
    # reference: the query projection's input is the embeddings' output; real tokens of 5 examples
    rows = []
    for i in range(5):
        ids, _, _ = collate(enc, [i])
        with torch.no_grad():
            x = body.embeddings(input_ids=ids)[0].double()  # (seq, d), no padding in a batch of 1
        rows.append(x)
    x = torch.cat(rows)
    ref = x.T @ x / x.shape[0]
    torch.testing.assert_close(
        grams["encoder.layer.0.attention.self.query"].double(), ref, atol=1e-5, rtol=1e-5
    )


def _objective(model: Classifier, ids, mask, p_fixed: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(model(ids, mask).double(), dim=-1)
    return (p_fixed.sqrt() * logp).sum()


def test_fisher_matches_finite_differences(encoder) -> None:
    enc = encode(encoder.tokenizer, EXAMPLES[:4], max_length=64)
    body = encoder.new_body()
    head = head_from_state(
        {
            "weight": torch.randn((2, encoder.hidden_size), generator=torch.Generator().manual_seed(3)),
            "bias": torch.tensor([0.1, -0.2]),
        }
    )
    model = Classifier(body, head)
    fisher = fisher_diagonal(model, enc, examples=4, batch_size=2)
    assert set(fisher) == {k for k, _ in body.named_parameters()}
    # literal reference for two elements: per batch, the derivative of sum_x sum_c sqrt(p_c) log p_c
    # (p held at the unperturbed point) by central differences in float64, squared, summed, / 4
    model64 = Classifier(
        encoder.new_body(),
        head_from_state({"weight": head.weight.detach().double(), "bias": head.bias.detach().double()}),
    )
    model64.double().eval()
    params = dict(model64.body.named_parameters())
    for name, index in (("embeddings.LayerNorm.bias", (3,)), ("encoder.layer.1.output.dense.weight", (2, 5))):
        total = 0.0
        for batch in ([0, 1], [2, 3]):
            ids, mask, _ = collate(enc, batch)
            with torch.no_grad():
                p0 = torch.softmax(model64(ids, mask), dim=-1)
                h = 1e-5
                param = params[name]
                orig = float(param[index])
                param[index] = orig + h
                up = float(_objective(model64, ids, mask, p0))
                param[index] = orig - h
                down = float(_objective(model64, ids, mask, p0))
                param[index] = orig
            total += ((up - down) / (2 * h)) ** 2
        assert math.isclose(float(fisher[name][index]), total / 4, rel_tol=2e-3, abs_tol=1e-9), name


# -------------------------------------------------------------------------------------------- train


def test_schedule_and_eval_points() -> None:
    f = _linear_schedule(10, 2)
    assert [round(f(s), 6) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert _eval_steps(10, 2, 2) == {5: 0.5, 10: 1.0, 15: 1.5, 20: 2.0}
    assert _eval_steps(3, 1, 2) == {2: 2 / 3, 3: 1.0}


def test_epoch_batches_cover_every_example_once_with_less_padding() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(3, 60, (100,), generator=g)]
    batches = epoch_batches(lengths, batch_size=8, bucket=4, generator=torch.Generator().manual_seed(1))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(100)) and len(batches) == math.ceil(100 / 8)
    assert sorted(len(b) for b in batches) == [4] + [8] * 12  # windows of 32, 32, 32 and 4
    again = epoch_batches(lengths, batch_size=8, bucket=4, generator=torch.Generator().manual_seed(1))
    assert batches == again
    plain = epoch_batches(lengths, batch_size=8, bucket=1, generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(1)).tolist()
    assert [sorted(b) for b in plain] == [sorted(perm[s : s + 8]) for s in range(0, 100, 8)]

    def padding(bs: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    assert padding(batches) < padding(plain)


@pytest.mark.slow  # fine-tunes twice
def test_fine_tune_is_seeded_and_keeps_the_best(encoder) -> None:
    data = encode(encoder.tokenizer, EXAMPLES * 3, max_length=32)
    val = encode(encoder.tokenizer, EXAMPLES, max_length=32)
    settings = TrainSettings(epochs=2, batch_size=4, lr=1e-3, head_lr=1e-2, patience=10)
    a = fine_tune(encoder, n_classes=2, train=data, validation=val, settings=settings, seed=5, progress=False)
    b = fine_tune(encoder, n_classes=2, train=data, validation=val, settings=settings, seed=5, progress=False)
    c = fine_tune(encoder, n_classes=2, train=data, validation=val, settings=settings, seed=6, progress=False)
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert any(not torch.equal(a[0][k], c[0][k]) for k in a[0])
    body, head, best, history = a
    assert best == max(acc for _, acc in history)
    assert len(history) == 4  # 2 evaluations per epoch, patience not reached
    # the kept weights are the best checkpoint: re-scoring them gives the best validation accuracy
    feats = pooled_features(encoder.new_body(body), val)
    assert head_accuracy(head, feats, torch.tensor(val.labels)) == best
    # the base was not modified
    assert any(not torch.equal(body[k], encoder.base_state[k]) for k in body)


def test_expert_key_depends_on_everything() -> None:
    s = TrainSettings()
    k = expert_key(task_fingerprint="t", model_fingerprint="m", settings=s, seed=0)
    assert k == expert_key(task_fingerprint="t", model_fingerprint="m", settings=TrainSettings(), seed=0)
    assert k != expert_key(task_fingerprint="t2", model_fingerprint="m", settings=s, seed=0)
    assert k != expert_key(task_fingerprint="t", model_fingerprint="m2", settings=s, seed=0)
    assert k != expert_key(
        task_fingerprint="t", model_fingerprint="m", settings=TrainSettings(lr=3e-4), seed=0
    )
    assert k != expert_key(task_fingerprint="t", model_fingerprint="m", settings=s, seed=1)
    with pytest.raises(ValueError, match="epochs"):
        TrainSettings(epochs=0)


def test_cache_roundtrip(tmp_path: Path) -> None:
    p = tmp_path / "a" / "t.safetensors"
    cache_lib.save_tensors(p, {"x": torch.arange(6.0).reshape(2, 3)[:, 1:]})  # non-contiguous input
    assert torch.equal(cache_lib.load_tensors(p)["x"], torch.tensor([[1.0, 2.0], [4.0, 5.0]]))
    assert not list(tmp_path.glob("a/.*tmp*"))
    assert cache_lib.content_key({"a": 1, "b": 2}) == cache_lib.content_key({"b": 2, "a": 1})


# ------------------------------------------------------------------------------------------- config


def _cfg(**over):
    doc = {"tasks": ["t1", "t2"], "methods": [{"method": "task_arithmetic", "params": {"lambda": 0.3}}]}
    doc.update(over)
    return doc


def test_config_defaults_and_grid_points() -> None:
    cfg = parse_config(
        _cfg(
            methods=[
                {
                    "method": "ties",
                    "params": {"density": 0.2},
                    "grid": {"density": [0.2, 0.5], "lambda": [1.0, 0.5]},
                }
            ]
        )
    )
    assert cfg.seeds == [0] and cfg.sizes.train == 600 and cfg.training.max_length == 64
    pts = grid_points(cfg.methods[0])
    # default first, then the grid (the default point appears once)
    assert pts == [
        {"density": 0.2},
        {"density": 0.2, "lambda": 1.0},
        {"density": 0.2, "lambda": 0.5},
        {"density": 0.5, "lambda": 1.0},
        {"density": 0.5, "lambda": 0.5},
    ]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_cfg(methods=[{"method": "tiess"}]), "unknown merge method 'tiess'.*did you mean 'ties'"),
        (_cfg(methods=[{"method": "ties", "params": {"densty": 0.2}}]), "densty"),
        (_cfg(methods=[{"method": "ties", "params": {"density": 2.0}}]), "density"),
        (_cfg(methods=[{"method": "fisher", "params": {"fisher": []}}]), "computed by the harness"),
        (_cfg(held_out=["t1"]), "both held-in"),
        (_cfg(tasks=["t1", "t1"]), "listed twice"),
        (_cfg(taks=["x"]), "unknown key"),
        (_cfg(sizes={"train": 0}), "sizes.train"),
        (_cfg(n_experts=[5]), "n_experts"),
        (_cfg(methods=[{"method": "linear"}, {"method": "linear"}]), "labelled 'linear'"),
        (_cfg(methods=[{"method": "linear", "label": "base"}]), "reserved"),
        (_cfg(methods=[{"method": "slerp", "params": {"t": 0.5}}]), "at most 1"),
    ],
)
def test_config_errors(doc, message: str) -> None:
    with pytest.raises(EvalConfigError, match=message):
        parse_config(doc, source="x.yaml")


def test_builtin_configs_name_real_tasks_and_methods() -> None:
    from weightmerge.eval.tasks import BUILTIN_HELD_IN, available_tasks

    for name in ("demo", "benchmark", "benchmark-defaults", "benchmark-tuned", "benchmark-scope"):
        cfg = builtin_config(name)
        assert set(cfg.tasks) | set(cfg.held_out) <= set(available_tasks()), name
    full = builtin_config("benchmark")
    assert tuple(full.tasks) == BUILTIN_HELD_IN and len(full.seeds) == 3
    assert len(builtin_config("demo").tasks) == 4
    # docs/results.md's configs: the full benchmark's tasks, seeds, sizes and default points
    defaults = {m.name: m.params for m in full.methods}
    for name in ("benchmark-defaults", "benchmark-tuned"):
        cfg = builtin_config(name)
        assert (cfg.tasks, cfg.held_out, cfg.seeds, cfg.sizes) == (
            full.tasks,
            full.held_out,
            full.seeds,
            full.sizes,
        ), name
        assert all(m.params == defaults[m.name] for m in cfg.methods), name
    assert not any(m.grid for m in builtin_config("benchmark-defaults").methods)
    scope = builtin_config("benchmark-scope")  # the same experts as benchmark-defaults
    assert (scope.tasks, scope.seeds, scope.sizes) == (full.tasks, full.seeds, full.sizes)
    assert {(m.method, m.params.get("scope")) for m in scope.methods} >= {
        ("ties", None),
        ("ties", "global"),
        ("pcb", None),
        ("pcb", "per_tensor"),
    }
    assert [m.name for m in builtin_config("benchmark-defaults").methods] == list(defaults)


# ------------------------------------------------------------------------------------------- report


def test_stat_sample_std_hand_computed() -> None:
    s = stat([0.5, 0.7, None, 0.9])
    assert s is not None
    assert s["n"] == 3 and math.isclose(s["mean"], 0.7) and math.isclose(s["std"], 0.2)
    assert stat([0.4])["std"] == 0.0  # type: ignore[index]
    assert stat([None]) is None


def test_aggregate_two_seeds() -> None:
    cfg = parse_config(_cfg(n_experts=[1]))

    def seed_result(a: float) -> dict:
        row = {"avg": a, "normalized_avg": a / 0.8, "held_in": {"t1": a, "t2": a}, "normalized": {}}
        return {
            "rows": {"individual": row, "task_arithmetic": row, "base": row},
            "sweep": {"task_arithmetic": {"1": [{"normalized_avg": a}, {"normalized_avg": a + 0.1}]}},
            "held_out_references": {},
            "experts": {
                t: {"val_accuracy": 1, "test_accuracy": 1, "train_seconds": 2, "cached": False}
                for t in ("t1", "t2")
            },
        }

    summ = aggregate(cfg, [seed_result(0.4), seed_result(0.6)])
    assert summ["order"] == ["individual", "task_arithmetic", "base"]
    r = summ["rows"]["task_arithmetic"]
    assert math.isclose(r["avg"]["mean"], 0.5) and math.isclose(r["avg"]["std"], math.sqrt(0.02))
    assert summ["sweep"]["task_arithmetic"]["1"]["n"] == 4
    assert math.isclose(summ["sweep"]["task_arithmetic"]["1"]["mean"], 0.55)


def test_subsets_are_distinct_sorted_and_seeded() -> None:
    tasks = [f"t{i}" for i in range(8)]
    subs = _subsets(tasks, 4, 3, seed=0)
    assert len(subs) == 3 and len({tuple(s) for s in subs}) == 3
    assert all(len(s) == 4 and s == sorted(s, key=tasks.index) for s in subs)
    assert subs == _subsets(tasks, 4, 3, seed=0) and subs != _subsets(tasks, 4, 3, seed=1)
    assert len(_subsets(tasks[:3], 2, 10, seed=0)) == 3  # only 3 distinct pairs exist
