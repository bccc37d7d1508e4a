"""Word polarity from the VADER sentiment lexicon (PyPI `vadersentiment`, file vader_lexicon.txt).

Each lexicon line is ``token<TAB>mean<TAB>std<TAB>[ten human ratings in -4..4]``. The task
``vader_words`` (held out, head ``food_sentiment``) keeps the tokens that are lower-case words of
at least 3 letters (hyphens and apostrophes allowed inside), whose mean rating is at least 1.0 away
from neutral and whose raters agree (standard deviation at most 1.5); the text is the word alone,
the label ``negative`` (mean < 0) or ``positive`` (mean > 0), the label names of ``food_sentiment``.

Licence: vaderSentiment is MIT-licensed; the lexicon is read from the installed package at run
time and not copied into this repository.
"""

from __future__ import annotations

import functools
import importlib.resources
import re

from weightmerge.eval.tasks import Task, TaskDataUnavailable, make_task

INSTALL = "pip install vadersentiment"
MIN_ABS_MEAN = 1.0
MAX_STD = 1.5
LABELS: tuple[str, ...] = ("negative", "positive")  # == food_sentiment's label names
_WORD = re.compile(r"[a-z][a-z]+(?:[-'][a-z]+)*")


def parse_lexicon(text: str) -> tuple[tuple[str, float, float], ...]:
    """(token, mean, std) for every line of a VADER lexicon file."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 3:
            raise ValueError(
                f"VADER lexicon line {n} has {len(fields)} tab-separated fields, expected 4: {line!r}"
            )
        rows.append((fields[0], float(fields[1]), float(fields[2])))
    return tuple(rows)


@functools.cache
def load_lexicon() -> tuple[tuple[str, float, float], ...]:
    try:
        resource = importlib.resources.files("vaderSentiment") / "vader_lexicon.txt"
        text = resource.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise TaskDataUnavailable(f"the VADER lexicon is not installed ({exc}); {INSTALL}") from exc
    return parse_lexicon(text)


def polarity(token: str, mean: float, std: float) -> str | None:
    """``negative``/``positive`` for a kept word (see the module docstring), else None."""
    if len(token) < 3 or not _WORD.fullmatch(token) or abs(mean) < MIN_ABS_MEAN or std > MAX_STD:
        return None
    return "positive" if mean > 0 else "negative"


def build_vader_words(*, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    pools: dict[str, list[str]] = {label: [] for label in LABELS}
    for token, mean, std in load_lexicon():
        label = polarity(token, mean, std)
        if label is not None:
            pools[label].append(token)
    return make_task(
        name="vader_words",
        label_names=LABELS,
        texts_by_label=pools,
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        description="Polarity of a single English word, from the VADER lexicon's mean human rating.",
        source="PyPI vadersentiment (MIT): vaderSentiment/vader_lexicon.txt; read at run time",
        head="food_sentiment",
    )
