"""Image classification tasks: the `ImageTask` record and balanced seeded splits of image pools.

An image task is the vision counterpart of `weightmerge.eval.tasks.Task`: fixed, disjoint,
class-balanced train/validation/test splits, here of grayscale ``uint8`` images (any size; the
vision family resizes them). `make_image_task` draws the splits like `make_task` does for texts:
each class's pool is de-duplicated (by pixel bytes; an image seen under two labels is dropped),
shuffled by a generator seeded from sha256(task name, seed, class) and cut into consecutive
slices, so the splits are disjoint, depend only on the data, the name and the seed, and changing
``n_test`` never changes the training set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from weightmerge.eval.splits import class_quotas, derive_rng


@dataclass(frozen=True)
class Images:
    """A split of an image task: ``pixels`` (n, height, width) uint8 and ``labels`` (n,) int64."""

    pixels: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.pixels.dtype != torch.uint8 or self.pixels.dim() != 3:
            raise ValueError(
                f"images must be (n, height, width) uint8, got {tuple(self.pixels.shape)} {self.pixels.dtype}"
            )
        if self.labels.shape != (self.pixels.shape[0],):
            raise ValueError(f"{self.pixels.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class ImageTask:
    """An image classification task with fixed, disjoint splits (see `weightmerge.eval.tasks.Task`
    for ``head``: the held-in task whose label space a held-out task reuses)."""

    name: str
    label_names: tuple[str, ...]
    train: Images
    validation: Images
    test: Images
    description: str
    source: str
    head: str | None = None

    def __post_init__(self) -> None:
        labels = tuple(self.label_names)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"task {self.name!r}: label_names must be >= 2 distinct names, got {labels!r}")
        object.__setattr__(self, "label_names", labels)
        for split in self.splits():
            if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= len(labels)):
                raise ValueError(f"task {self.name!r}: a label is out of range for {len(labels)} labels")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def splits(self) -> tuple[Images, Images, Images]:
        return self.train, self.validation, self.test

    def fingerprint(self) -> str:
        """sha256 of the name, label names, head and every split's pixels and labels."""
        h = hashlib.sha256()
        h.update(repr((self.name, self.label_names, self.head)).encode())
        for split in self.splits():
            h.update(repr(tuple(split.pixels.shape)).encode())
            h.update(split.pixels.contiguous().numpy().tobytes())
            h.update(split.labels.to(torch.int64).numpy().tobytes())
        return h.hexdigest()


def make_image_task(
    *,
    name: str,
    label_names: Sequence[str],
    images_by_label: Mapping[str, np.ndarray],
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    description: str,
    source: str,
    head: str | None = None,
) -> ImageTask:
    """Class-balanced, disjoint, seeded splits from per-label pools of (n, h, w) uint8 images.

    Raises ValueError naming the task and the short classes when a pool is too small.
    """
    labels = tuple(label_names)
    k = len(labels)
    unknown = sorted(set(images_by_label) - set(labels))
    if unknown:
        raise ValueError(f"task {name!r}: images given for unknown labels {unknown}")
    pools: list[list[bytes]] = []
    shapes: set[tuple[int, ...]] = set()
    owners: dict[bytes, int] = {}
    for c, label in enumerate(labels):
        arr = np.asarray(images_by_label.get(label, np.zeros((0, 1, 1), np.uint8)), dtype=np.uint8)
        if arr.ndim != 3:
            raise ValueError(f"task {name!r}, label {label!r}: images must be (n, height, width)")
        if len(arr):
            shapes.add(tuple(arr.shape[1:]))
        seen = {a.tobytes() for a in arr}
        for b in seen:
            owners[b] = -1 if owners.get(b, c) != c else c
        pools.append(sorted(seen))
    if len(shapes) > 1:
        raise ValueError(f"task {name!r}: images of different sizes {sorted(shapes)}")
    shape = shapes.pop() if shapes else (1, 1)
    pools = [[b for b in pool if owners[b] == c] for c, pool in enumerate(pools)]
    quotas = [class_quotas(n, k) for n in (n_train, n_val, n_test)]
    need = [sum(q[c] for q in quotas) for c in range(k)]
    short = [
        f"{labels[c]!r} has {len(pools[c])} (needs {need[c]})" for c in range(k) if len(pools[c]) < need[c]
    ]
    if short:
        raise ValueError(
            f"task {name!r}: not enough distinct images for n_train={n_train}, n_val={n_val}, "
            f"n_test={n_test}: class {', class '.join(short)}; at most {k * min(len(p) for p in pools)} "
            "in all (balanced)"
        )
    splits: list[list[tuple[bytes, int]]] = [[], [], []]
    for c, pool in enumerate(pools):
        order = list(pool)
        derive_rng(name, seed, "class", c).shuffle(order)
        start = 0
        for s, q in enumerate(quotas):
            splits[s].extend((b, c) for b in order[start : start + q[c]])
            start += q[c]
    out = []
    for s, split in enumerate(splits):
        derive_rng(name, seed, "order", s).shuffle(split)
        pixels = (
            np.stack([np.frombuffer(b, dtype=np.uint8).reshape(shape) for b, _ in split])
            if split
            else (np.zeros((0, *shape), np.uint8))
        )
        out.append(
            Images(torch.from_numpy(pixels.copy()), torch.tensor([c for _, c in split], dtype=torch.int64))
        )
    return ImageTask(
        name=name,
        label_names=labels,
        train=out[0],
        validation=out[1],
        test=out[2],
        description=description,
        source=source,
        head=head,
    )
