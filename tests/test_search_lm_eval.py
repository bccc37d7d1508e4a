"""The lm-evaluation-harness evaluator, offline: a tiny random Llama built here, two "experts"
(random perturbations of it), a local multiple-choice task file read as two tasks (validation and
test split). The search's score of the default point equals lm_eval run directly on the merge that
`weightmerge merge` writes for the same point; the search runs only the validation task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import require

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # ~30-60 s on 2 busy cores: lm_eval imports, 4 tiny evaluations

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "is", "a", "the", "what", "?"]


def _tiny_llama(root: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    fast.save_pretrained(root / "base")
    for i in range(2):
        expert = LlamaForCausalLM(cfg)
        expert.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()})
        expert.save_pretrained(root / f"expert_{i}")


def _tasks(root: Path) -> Path:
    rows = [
        {"question": f"what is the {a} ?", "choices": [b, c], "label": i % 2}
        for i, (a, b, c) in enumerate(
            [("sun", "red", "blue"), ("tree", "green", "cat"), ("moon", "dog", "a")] * 3
        )
    ]
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[5:]))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, split in (("toy_val", "validation"), ("toy_test", "test")):
        doc = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {
                "data_files": {split: str(root / f"{'val' if split == 'validation' else 'test'}.jsonl")}
            },
            "output_type": "multiple_choice",
            f"{split}_split": split,
            "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    return tasks


def test_lm_eval_search_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from weightmerge.cli import main
    from weightmerge.search import parse_search_config
    from weightmerge.search.runner import run_search

    _tiny_llama(tmp_path)
    tasks = _tasks(tmp_path)
    merge = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / f"expert_{i}")} for i in range(2)],
        "parameters": {"lambda": 1.0},
    }
    data = {
        **merge,
        "search": {
            "evaluator": {
                "lm_eval": ["toy_val"],
                "test_tasks": ["toy_test"],
                "include_path": str(tasks),
                "include_defaults": False,
            },
            "objective": "toy_val/acc",
            "optimizer": "random",
            "budget": 1,
            "population": 1,
            "space": [{"param": "lambda", "low": 0.0, "high": 1.0}],
            "output_dir": str(tmp_path / "out"),
        },
    }
    s = run_search(parse_search_config(data), log=lambda _m: None, write=False)
    assert {"toy_val/acc", "mean/acc"} <= set(s["default"]["validation"])
    assert not any(k.startswith("toy_test") for r in s["history"] for k in r["scores"])
    assert {"toy_test/acc", "mean/acc"} <= set(s["best"]["test"])  # test only at the end, on the test task
    assert not any(k.startswith("toy_val") for k in s["best"]["test"])
    # the default point, merged to disk and scored by lm_eval directly
    (tmp_path / "default.yaml").write_text(yaml.safe_dump(merge))
    assert main(["merge", str(tmp_path / "default.yaml"), str(tmp_path / "merged")]) == 0
    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'merged'},tokenizer={tmp_path / 'base'},device=cpu",
        tasks=["toy_val"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
    )
    assert res is not None
    assert res["results"]["toy_val"]["acc,none"] == pytest.approx(s["default"]["validation"]["toy_val/acc"])
