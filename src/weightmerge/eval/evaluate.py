"""Evaluators: pooled features of a body on a split, accuracy of a head on them, and the linear
probes used for held-out scoring. Batched inference, no gradients.

Accuracy is computed from features so that one pass of a body over a split serves every head
applied to it (a held-in task's head, and the held-out tasks reusing that head's label space).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from weightmerge.eval.family import Split

EVAL_BATCH_SIZE = 128


@torch.inference_mode()
def pooled_features(body: nn.Module, enc: Split, *, batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """(n_examples, hidden) pooled features of a prepared split (text: mean-pooled last hidden
    states; images: the vision body's pooled output), in the split's order."""
    if len(enc) == 0:
        raise ValueError("cannot compute features of an empty split")
    was_training = body.training
    body.eval()
    out: torch.Tensor | None = None
    device = next(body.parameters()).device  # fine-tuning may run on a GPU (--device)
    for index in enc.inference_order(batch_size):
        inputs, _ = enc.batch(index)
        if device.type != "cpu":
            inputs = tuple(x.to(device) for x in inputs)
        pooled = enc.pool(body, *inputs).float().cpu()
        if out is None:
            out = torch.empty((len(enc), pooled.shape[1]), dtype=torch.float32)
        out[torch.tensor(index)] = pooled
    body.train(was_training)
    assert out is not None
    return out


def labels_of(enc: Split) -> torch.Tensor:
    return enc.label_tensor


def head_predictions(head: Mapping[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """argmax of ``features @ W^T + b`` (ties -> the lowest class index)."""
    logits = features @ head["weight"].float().T + head["bias"].float()
    return logits.argmax(dim=1)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ")
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty split")
    return float((predictions == labels).float().mean())


def head_accuracy(head: Mapping[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor) -> float:
    return accuracy(head_predictions(head, features), labels)


def fit_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_classes: int,
    l2: float = 1e-3,
    steps: int = 100,
) -> dict[str, torch.Tensor]:
    """A multinomial logistic-regression head on frozen features (full-batch L-BFGS, deterministic).

    Features are standardised with the training statistics, which are folded back into the
    returned ``weight``/``bias`` so the head applies to raw features like a trained head.
    """
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError("fit_probe needs as many labels as feature rows, at least one")
    x = features.double()
    mu = x.mean(dim=0)
    sd = x.std(dim=0, unbiased=False).clamp(min=1e-6)
    z = (x - mu) / sd
    w = torch.zeros((n_classes, x.shape[1]), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
    y = labels.long()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        weight = w / sd  # (n_classes, d): z @ w^T = (x - mu) @ (w / sd)^T
        bias = b - weight @ mu
    return {"weight": weight.float(), "bias": bias.float()}


def few_shot_index(labels: Sequence[int], *, shots: int, seed: int) -> list[int]:
    """``shots`` examples per class (all of a class when it has fewer), drawn with ``seed``."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    chosen: list[int] = []
    for y in sorted(by_class):
        members = by_class[y]
        perm = torch.randperm(len(members), generator=g).tolist()
        chosen.extend(members[p] for p in perm[:shots])
    return sorted(chosen)
