"""lm-evaluation-harness as a search evaluator (the optional ``lm_eval`` extra).

The merged state dict is loaded into one causal LM (built once per worker from ``model_dir``: its
``config.json`` and tokenizer, i.e. the base model's folder) and scored with
``lm_eval.simple_evaluate`` on ``tasks`` during the search and on ``test_tasks`` once at the end.
Give the two lists as tasks that read the validation and the test split of your data (for example
two YAML tasks in ``include_path`` that differ in ``test_split``): the search never runs a test task.
Scores are named ``TASK/METRIC`` (``my_task/acc``); ``mean/METRIC`` averages a metric over tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LmEvalFactory:
    model_dir: str
    tasks: tuple[str, ...]
    test_tasks: tuple[str, ...]
    include_path: str | None = None
    include_defaults: bool = True
    limit: int | None = None
    batch_size: int = 8

    def build(self) -> LmEvalEvaluator:
        return LmEvalEvaluator(self)


def flatten_results(results: Mapping[str, Any], tasks: tuple[str, ...]) -> dict[str, float]:
    """``{task: {"acc,none": x, "acc_stderr,none": s, ...}}`` -> ``{"task/acc": x, "mean/acc": ...}``."""
    out: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {}
    for task in tasks:
        if task not in results:
            raise ValueError(f"lm_eval returned no results for task {task!r}; it returned {sorted(results)}")
        for key, value in results[task].items():
            metric, _, filt = key.partition(",")
            if "stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = metric if filt in ("", "none") else f"{metric},{filt}"
            out[f"{task}/{name}"] = float(value)
            per_metric.setdefault(name, []).append(float(value))
    for name, vals in per_metric.items():
        if len(vals) == len(tasks):
            out[f"mean/{name}"] = sum(vals) / len(vals)
    return out


class LmEvalEvaluator:
    def __init__(self, spec: LmEvalFactory) -> None:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ValueError(
                "the lm_eval evaluator needs lm-evaluation-harness: pip install 'weightmerge[lm-eval]'"
            ) from None
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from weightmerge.eval.model import quiet_transformers

        quiet_transformers()
        self.spec = spec
        self.model = AutoModelForCausalLM.from_pretrained(spec.model_dir)
        self.model.eval()
        tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
        self.lm = HFLM(pretrained=self.model, tokenizer=tokenizer, batch_size=spec.batch_size, device="cpu")
        self.tasks = TaskManager(include_path=spec.include_path, include_defaults=spec.include_defaults)

    def _load(self, state: Mapping[str, Any]) -> None:
        import torch

        params = dict(self.model.state_dict())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(
                f"merged tensor {unknown[0]!r} is not a weight of the model in {self.spec.model_dir}"
            )
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def evaluate(self, state: Mapping[str, Any], *, split: str) -> dict[str, float]:
        from lm_eval import simple_evaluate

        if split not in ("validation", "test"):
            raise ValueError(f"split must be validation or test, got {split!r}")
        tasks = self.spec.tasks if split == "validation" else self.spec.test_tasks
        self._load(state)
        res = simple_evaluate(
            model=self.lm,
            tasks=list(tasks),
            task_manager=self.tasks,
            limit=self.spec.limit,
            log_samples=False,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
        assert res is not None
        return flatten_results(res["results"], tasks)
