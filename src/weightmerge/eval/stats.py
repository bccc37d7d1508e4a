"""Statistics of an expert on its own task's training data, for the Fisher and RegMean merges.

Diagonal Fisher (docs/methods/fisher.md, MergeLM's estimator): for each batch of the first ``examples``
training examples, back-propagate

    sum_{x in batch} sum_c sqrt(p_c(x)) * log p_c(x)      (p = softmax of the logits, detached in sqrt)

and add the squared gradient of every body parameter; divide the sum over batches by the number of
examples. It is the square of a batch sum (a batch-level approximation of the per-example Fisher,
as in the reference), so it depends on ``batch_size``, which is part of the cache key. The model
is in eval mode (no dropout). Result: ``{parameter name: tensor of the parameter's shape}``.

RegMean Gram matrices (docs/methods/regmean.md): for every ``nn.Linear`` module of the body, G = X^T X / rows,
where X stacks the module's inputs over the first ``examples`` training examples, batch x sequence
flattened to rows, **padding positions excluded** (they depend on how examples are batched, not on
the task); inputs that are not (batch, sequence, features) -- e.g. a pooler over the first token --
count every row. Accumulated in float64, stored in float32. Result: ``{module name: (in, in)}``
with module names such that ``<module>.weight`` is the body parameter (the key layout
``merge_state_dicts(..., "regmean", {"gram": [...]})`` expects).

Both are cached next to the expert (``fisher-<key>.safetensors``, ``gram-<key>.safetensors``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from weightmerge.eval import cache
from weightmerge.eval.family import ExpertFamily, Split
from weightmerge.eval.model import Classifier, head_from_state


@dataclass(frozen=True)
class StatsSettings:
    fisher_examples: int = 256
    gram_examples: int = 600
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("fisher_examples", "gram_examples", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"stats setting {name} must be >= 1, got {getattr(self, name)}")


def _batches(enc: Split, *, examples: int, batch_size: int) -> Iterator[list[int]]:
    n = min(examples, len(enc))
    for s in range(0, n, batch_size):
        yield list(range(s, min(n, s + batch_size)))


def fisher_diagonal(
    model: Classifier, data: Split, *, examples: int, batch_size: int, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the body parameters of ``model`` (see the module docstring)."""
    if len(data) == 0:
        raise ValueError("fisher_diagonal: empty data")
    model.eval()
    params = [(k, p) for k, p in model.body.named_parameters() if p.requires_grad]
    acc = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params}
    count = 0
    batches = list(_batches(data, examples=examples, batch_size=batch_size))
    for index in tqdm(batches, desc="fisher", disable=not progress, leave=False):
        inputs, _ = data.batch(index)
        logits = model(*inputs)
        logp = torch.log_softmax(logits, dim=-1)
        objective = (logp.detach().exp().sqrt() * logp).sum()
        grads = torch.autograd.grad(objective, [p for _, p in params], allow_unused=True)
        for (k, _), g in zip(params, grads, strict=True):
            if g is not None:
                acc[k] += g.float().square()
        count += len(index)
    return {k: v / count for k, v in acc.items()}


def gram_matrices(
    body: nn.Module, data: Split, *, examples: int, batch_size: int, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Input Gram matrices X^T X / rows of every nn.Linear in ``body`` (see the module docstring)."""
    if len(data) == 0:
        raise ValueError("gram_matrices: empty data")
    body.eval()
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    current_mask: list[torch.Tensor] = []

    def hook_for(name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            mask = current_mask[0] if current_mask else None
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.bool()]  # (real tokens, features)
            else:
                x = x.reshape(-1, x.shape[-1])
            x = x.double()
            if name not in sums:
                sums[name] = torch.zeros((x.shape[1], x.shape[1]), dtype=torch.float64)
                rows[name] = 0
            sums[name] += x.T @ x
            rows[name] += int(x.shape[0])

        return hook

    handles = [
        m.register_forward_pre_hook(hook_for(name))
        for name, m in body.named_modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        batches = list(_batches(data, examples=examples, batch_size=batch_size))
        with torch.inference_mode():
            for index in tqdm(batches, desc="regmean gram", disable=not progress, leave=False):
                inputs, _ = data.batch(index)
                mask = data.row_mask(inputs)
                current_mask[:] = [] if mask is None else [mask]
                data.pool(body, *inputs)
    finally:
        for h in handles:
            h.remove()
    return {k: (sums[k] / max(rows[k], 1)).float() for k in sorted(sums)}


def _stats_path(directory: Path, kind: str, settings: StatsSettings, expert_key: str) -> Path:
    examples = settings.fisher_examples if kind == "fisher" else settings.gram_examples
    key = cache.content_key(
        {"kind": kind, "expert": expert_key, "examples": examples, "batch_size": settings.batch_size}
    )
    return directory / f"{kind}-{key[:20]}.safetensors"


def load_or_compute(
    kind: str,
    *,
    encoder: ExpertFamily,
    body: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor],
    data: Split,
    settings: StatsSettings,
    expert_key: str,
    directory: Path,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], bool]:
    """(statistics, loaded from cache) for ``kind`` in {"fisher", "gram"} of one expert."""
    if kind not in ("fisher", "gram"):
        raise ValueError(f"unknown statistics kind {kind!r}; expected 'fisher' or 'gram'")
    path = _stats_path(directory, kind, settings, expert_key)
    if path.exists():
        return cache.load_tensors(path), True
    net = encoder.new_body(body)
    if kind == "fisher":
        stats = fisher_diagonal(
            Classifier(net, head_from_state(head), pool=data.pool),
            data,
            examples=settings.fisher_examples,
            batch_size=settings.batch_size,
            progress=progress,
        )
    else:
        stats = gram_matrices(
            net, data, examples=settings.gram_examples, batch_size=settings.batch_size, progress=progress
        )
    cache.save_tensors(path, stats)
    return stats, False
