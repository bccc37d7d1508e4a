"""Fine-tuning one expert per task (body + its own head), seeded, with the best checkpoint on
validation kept, and cached on disk.

Recipe (``TrainSettings``): AdamW (fused; no weight decay by default, so token embeddings never
seen in training keep exactly their base values and the task vector is 0 there), separate
learning rates for the body and the freshly initialised head, linear warm-up then linear decay,
gradient norm clipped to 1, examples truncated to ``max_length`` tokens and padded per batch. The
data order is a seeded permutation per epoch, bucketed by length (``epoch_batches``); dropout
draws come from the seeded global generator inside a forked RNG state, so the same seed gives the
same expert bit for bit on the same machine and library versions. Validation accuracy is measured
``evals_per_epoch`` times per epoch; the weights with the best validation accuracy (earliest on
ties) are kept, and training stops after ``patience``
evaluations without improvement (early stopping).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from weightmerge.eval import cache
from weightmerge.eval.evaluate import head_accuracy, labels_of, pooled_features
from weightmerge.eval.family import ExpertFamily, Split
from weightmerge.eval.model import Classifier, body_state, new_head

# Bump when the training code changes in a way that changes the weights (part of every expert key).
RECIPE_VERSION = 1


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-4
    head_lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_length: int = 64
    evals_per_epoch: int = 2
    patience: int = 2
    max_grad_norm: float = 1.0
    bucket: int = 8  # batches are cut from length-sorted windows of bucket x batch_size examples

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length", "evals_per_epoch", "patience", "bucket"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"training setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "head_lr", "max_grad_norm"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"training setting {name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("weight_decay must be >= 0 and warmup_ratio in [0, 1)")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Expert:
    """A fine-tuned expert: body weights, head weights and how it was made."""

    task: str
    body: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]  # {"weight": (n_classes, hidden), "bias": (n_classes,)}
    val_accuracy: float
    history: tuple[tuple[float, float], ...]  # (epochs done, validation accuracy)
    seconds: float  # training time when it was made
    cached: bool  # loaded from the cache in this run
    key: str
    directory: Path


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (stable across runs and platforms)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def expert_key(*, task_fingerprint: str, model_fingerprint: str, settings: TrainSettings, seed: int) -> str:
    return cache.content_key(
        {
            "kind": "expert",
            "recipe": RECIPE_VERSION,
            "task": task_fingerprint,
            "model": model_fingerprint,
            "settings": settings.as_dict(),
            "seed": seed,
        }
    )


def expert_dir(cache_dir: Path, task: str, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task)
    return Path(cache_dir) / "experts" / f"{safe}-{key[:20]}"


def epoch_batches(
    lengths: list[int], *, batch_size: int, bucket: int, generator: torch.Generator
) -> list[list[int]]:
    """One epoch's batches: a seeded permutation cut into windows of ``bucket * batch_size``
    examples, each window sorted by length (stable) and cut into batches, then the batches
    shuffled. Similar lengths share a batch (less padding) while the order stays random."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * bucket
    batches: list[list[int]] = []
    for s in range(0, len(perm), window):
        part = sorted(perm[s : s + window], key=lambda i: lengths[i])
        batches.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
    order = torch.randperm(len(batches), generator=generator).tolist() if bucket > 1 else range(len(batches))
    return [batches[i] for i in order]


def _linear_schedule(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _eval_steps(steps_per_epoch: int, epochs: int, per_epoch: int) -> dict[int, float]:
    """{global step after which to evaluate: epochs done}."""
    points: dict[int, float] = {}
    for e in range(epochs):
        for k in range(1, per_epoch + 1):
            within = max(1, round(k * steps_per_epoch / per_epoch))
            points[e * steps_per_epoch + within] = e + within / steps_per_epoch
    return points


def fine_tune(
    encoder: ExpertFamily,
    *,
    n_classes: int,
    train: Split,
    validation: Split,
    settings: TrainSettings,
    seed: int,
    desc: str = "fine-tune",
    progress: bool = True,
    device: str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float, tuple[tuple[float, float], ...]]:
    """Train body + head; returns (best body, best head, best validation accuracy, history)."""
    if len(train) == 0 or len(validation) == 0:
        raise ValueError(f"{desc}: training and validation splits must not be empty")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = encoder.new_body().to(device)
        head = new_head(encoder.hidden_size, n_classes, seed=seed).to(device)
        model = Classifier(body, head, pool=train.pool)
        opt = torch.optim.AdamW(
            [
                {"params": list(body.parameters()), "lr": settings.lr},
                {"params": list(head.parameters()), "lr": settings.head_lr},
            ],
            weight_decay=settings.weight_decay,
            fused=True,  # one kernel for all parameters (faster steps: docs/benchmarks.md)
        )
        steps_per_epoch = math.ceil(len(train) / settings.batch_size)
        total = steps_per_epoch * settings.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, _linear_schedule(total, math.ceil(settings.warmup_ratio * total))
        )
        eval_at = _eval_steps(steps_per_epoch, settings.epochs, settings.evals_per_epoch)
        val_labels = labels_of(validation)
        order_gen = torch.Generator().manual_seed(seed)
        lengths = train.lengths()
        best_acc = -1.0
        best_body: dict[str, torch.Tensor] = {}
        best_head: dict[str, torch.Tensor] = {}
        history: list[tuple[float, float]] = []
        bad = 0
        step = 0
        bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step")
        stop = False
        for _epoch in range(settings.epochs):
            for batch in epoch_batches(
                lengths, batch_size=settings.batch_size, bucket=settings.bucket, generator=order_gen
            ):
                model.train()
                encoder.train_mode(body)
                inputs, labels = _to(train.batch(batch), device)
                loss = nn.functional.cross_entropy(model(*inputs), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                if step in eval_at:
                    feats = pooled_features(body, validation)
                    head_sd = {"weight": head.weight.detach(), "bias": head.bias.detach()}
                    acc = head_accuracy(head_sd, feats, val_labels)
                    history.append((round(eval_at[step], 4), acc))
                    bar.set_postfix(loss=f"{loss.detach().item():.3f}", val=f"{acc:.3f}")
                    if acc > best_acc:
                        best_acc, bad = acc, 0
                        best_body = body_state(body)
                        best_head = {k: v.to("cpu", copy=True) for k, v in head_sd.items()}
                    else:
                        bad += 1
                        if bad >= settings.patience:
                            stop = True
                            break
            if stop:
                break
        bar.close()
    return best_body, best_head, best_acc, tuple(history)


def _to(
    batch: tuple[tuple[torch.Tensor, ...], torch.Tensor], device: str
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    if device == "cpu":
        return batch
    inputs, labels = batch
    return tuple(x.to(device) for x in inputs), labels.to(device)


def load_or_train(
    encoder: ExpertFamily,
    *,
    task: str,
    task_fingerprint: str,
    n_classes: int,
    train: Split,
    validation: Split,
    settings: TrainSettings,
    seed: int,
    cache_dir: Path,
    progress: bool = True,
    device: str = "cpu",
) -> Expert:
    """The expert of ``task`` from the cache, or trained now and cached."""
    key = expert_key(
        task_fingerprint=task_fingerprint,
        model_fingerprint=encoder.fingerprint,
        settings=settings,
        seed=seed,
    )
    directory = expert_dir(cache_dir, task, key)
    weights, meta_path = directory / "expert.safetensors", directory / "meta.json"
    if weights.exists() and meta_path.exists():
        meta = cache.load_json(meta_path)
        tensors = cache.load_tensors(weights)
        return Expert(
            task=task,
            body={k[5:]: v for k, v in tensors.items() if k.startswith("body.")},
            head={k[5:]: v for k, v in tensors.items() if k.startswith("head.")},
            val_accuracy=float(meta["val_accuracy"]),
            history=tuple((float(a), float(b)) for a, b in meta["history"]),
            seconds=float(meta["seconds"]),
            cached=True,
            key=key,
            directory=directory,
        )
    t0 = time.perf_counter()
    body, head, val_acc, history = fine_tune(
        encoder,
        n_classes=n_classes,
        train=train,
        validation=validation,
        settings=settings,
        seed=seed,
        desc=f"fine-tune {task}",
        progress=progress,
        device=device,
    )
    seconds = time.perf_counter() - t0
    tensors = {**{f"body.{k}": v for k, v in body.items()}, **{f"head.{k}": v for k, v in head.items()}}
    cache.save_tensors(weights, tensors)
    cache.save_json(
        meta_path,
        {
            "task": task,
            "task_fingerprint": task_fingerprint,
            "model": encoder.name,
            "model_fingerprint": encoder.fingerprint,
            "settings": settings.as_dict(),
            "seed": seed,
            "val_accuracy": val_acc,
            "history": [list(h) for h in history],
            "seconds": seconds,
            "torch": torch.__version__,
        },
    )
    return Expert(
        task=task,
        body=body,
        head=head,
        val_accuracy=val_acc,
        history=history,
        seconds=seconds,
        cached=False,
        key=key,
        directory=directory,
    )


# ---------------------------------------------------------------------------------------------
# Multitask training: one body, one head per task (the multitask baseline and the multitask base)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultitaskModel:
    """A body trained jointly on several tasks, with one head per task."""

    tasks: tuple[str, ...]
    body: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]
    val_accuracy: float  # mean over tasks of the validation accuracy, at the kept checkpoint
    history: tuple[tuple[float, float], ...]
    steps: int
    seconds: float
    cached: bool
    key: str


def multitask_schedule(
    lengths: Mapping[str, list[int]], *, settings: TrainSettings, generator: torch.Generator
) -> list[list[tuple[str, list[int]]]]:
    """Per epoch, every task's batches of that epoch (as `epoch_batches` cuts them) shuffled
    together: the joint model takes exactly as many steps as the experts do in all."""
    epochs = []
    for _ in range(settings.epochs):
        items = [
            (task, b)
            for task in sorted(lengths)
            for b in epoch_batches(
                lengths[task], batch_size=settings.batch_size, bucket=settings.bucket, generator=generator
            )
        ]
        order = torch.randperm(len(items), generator=generator).tolist()
        epochs.append([items[i] for i in order])
    return epochs


def train_multitask(
    family: ExpertFamily,
    *,
    tasks: Mapping[str, tuple[int, Split, Split]],
    settings: TrainSettings,
    seed: int,
    desc: str = "multitask",
    progress: bool = True,
    device: str = "cpu",
) -> tuple[
    dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], float, tuple[tuple[float, float], ...], int
]:
    """Train one body with a head per task on the mixture of ``tasks`` ({name: (n_classes, train,
    validation)}), with the expert recipe; keeps the checkpoint with the best mean validation
    accuracy. Returns (body, heads, mean validation accuracy, history, steps taken)."""
    names = sorted(tasks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = family.new_body().to(device)
        heads = nn.ModuleDict(
            {t: new_head(family.hidden_size, tasks[t][0], seed=derive_seed(seed, t)) for t in names}
        ).to(device)
        pool = tasks[names[0]][1].pool
        opt = torch.optim.AdamW(
            [
                {"params": list(body.parameters()), "lr": settings.lr},
                {"params": list(heads.parameters()), "lr": settings.head_lr},
            ],
            weight_decay=settings.weight_decay,
            fused=True,
        )
        gen = torch.Generator().manual_seed(seed)
        schedule = multitask_schedule(
            {t: tasks[t][1].lengths() for t in names}, settings=settings, generator=gen
        )
        steps_per_epoch = len(schedule[0])
        total = steps_per_epoch * settings.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, _linear_schedule(total, math.ceil(settings.warmup_ratio * total))
        )
        eval_at = _eval_steps(steps_per_epoch, settings.epochs, settings.evals_per_epoch)
        best = -1.0
        best_body: dict[str, torch.Tensor] = {}
        best_heads: dict[str, dict[str, torch.Tensor]] = {}
        history: list[tuple[float, float]] = []
        bad, step, stop = 0, 0, False
        bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step")
        for epoch in schedule:
            for task, batch in epoch:
                body.train()
                family.train_mode(body)
                inputs, labels = _to(tasks[task][1].batch(batch), device)
                head = cast(nn.Linear, heads[task])
                loss = nn.functional.cross_entropy(head(pool(body, *inputs)), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_([*body.parameters(), *heads.parameters()], settings.max_grad_norm)
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                if step in eval_at:
                    accs = []
                    for t in names:
                        val = tasks[t][2]
                        lin = cast(nn.Linear, heads[t])
                        h = {"weight": lin.weight.detach(), "bias": lin.bias.detach()}
                        accs.append(head_accuracy(h, pooled_features(body, val), labels_of(val)))
                    acc = sum(accs) / len(accs)
                    history.append((round(eval_at[step], 4), acc))
                    if acc > best:
                        best, bad = acc, 0
                        best_body = body_state(body)
                        best_heads = {
                            t: {
                                "weight": cast(nn.Linear, heads[t]).weight.detach().to("cpu", copy=True),
                                "bias": cast(nn.Linear, heads[t]).bias.detach().to("cpu", copy=True),
                            }
                            for t in names
                        }
                    else:
                        bad += 1
                        if bad >= settings.patience:
                            stop = True
                            break
            if stop:
                break
        bar.close()
    return best_body, best_heads, best, tuple(history), step


def load_or_train_multitask(
    family: ExpertFamily,
    *,
    tasks: Mapping[str, tuple[int, Split, Split]],
    fingerprints: Mapping[str, str],
    settings: TrainSettings,
    seed: int,
    cache_dir: Path,
    progress: bool = True,
    label: str = "multitask",
    device: str = "cpu",
) -> MultitaskModel:
    """The multitask model of ``tasks`` from the cache, or trained now and cached."""
    names = tuple(sorted(tasks))
    key = cache.content_key(
        {
            "kind": "multitask",
            "recipe": RECIPE_VERSION,
            "tasks": {t: fingerprints[t] for t in names},
            "model": family.fingerprint,
            "settings": settings.as_dict(),
            "seed": seed,
        }
    )
    directory = Path(cache_dir) / "multitask" / f"{label}-{key[:20]}"
    weights, meta_path = directory / "model.safetensors", directory / "meta.json"
    if weights.exists() and meta_path.exists():
        meta = cache.load_json(meta_path)
        tensors = cache.load_tensors(weights)
        heads: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("head."):
                task, part = k[5:].rsplit(".", 1)
                heads.setdefault(task, {})[part] = v
        return MultitaskModel(
            tasks=names,
            body={k[5:]: v for k, v in tensors.items() if k.startswith("body.")},
            heads=heads,
            val_accuracy=float(meta["val_accuracy"]),
            history=tuple((float(a), float(b)) for a, b in meta["history"]),
            steps=int(meta["steps"]),
            seconds=float(meta["seconds"]),
            cached=True,
            key=key,
        )
    t0 = time.perf_counter()
    body, heads, val, history, steps = train_multitask(
        family, tasks=tasks, settings=settings, seed=seed, desc=label, progress=progress, device=device
    )
    seconds = time.perf_counter() - t0
    tensors = {f"body.{k}": v for k, v in body.items()}
    for t, h in heads.items():
        tensors.update({f"head.{t}.{part}": v for part, v in h.items()})
    cache.save_tensors(weights, tensors)
    cache.save_json(
        meta_path,
        {"tasks": list(names), "model_fingerprint": family.fingerprint, "settings": settings.as_dict(),
         "seed": seed, "val_accuracy": val, "history": [list(h) for h in history], "steps": steps,
         "seconds": seconds},
    )  # fmt: skip
    return MultitaskModel(
        tasks=names, body=body, heads=heads, val_accuracy=val, history=history, steps=steps, seconds=seconds,
        cached=False, key=key,
    )  # fmt: skip
