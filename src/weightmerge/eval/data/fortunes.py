"""Fortune-cookie tasks from Debian's `fortunes`, `fortunes-min` and `fortunes-{de,es,it,br,pl,cs,eo}`.

A fortune file (/usr/share/games/fortunes/...) holds texts separated by lines that are just ``%``.
Each text is cleaned: bytes decoded as UTF-8 (a text that is not valid UTF-8 is dropped), terminal
overstrikes (``x\\b``) removed, a trailing attribution (a line starting with ``--``/``―``/``—`` in the
last three lines, and what follows it) cut, whitespace collapsed. A text is kept if it is 20 to 1000
characters long and at least 60% of its non-space characters are letters (this drops ASCII art,
code and tables), then cut to at most 400 characters at a word boundary.

* ``fortune_topic`` -- which of 8 English topic files a fortune comes from (art, computers,
  education, food, law, politics, science, work).
* ``fortune_language`` -- the language of a fortune: English, German, Spanish, Italian,
  Portuguese (Brazilian), Polish, Czech, Esperanto, from the packages' language folders. A non-
  English text in which English function words make up at least a quarter of the words is dropped
  (some folders quote English signatures and mailing lists).

Licence: the fortune collections are distributed by Debian as free data (see each package's
/usr/share/doc/*/copyright); they are read at run time and not copied into this repository.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from weightmerge.eval.data._text import data_dir, letter_fraction, squash, truncate
from weightmerge.eval.tasks import Task, TaskDataUnavailable, make_task

MIN_CHARS, MAX_CHARS, TRUNCATE_CHARS, MIN_LETTER_FRACTION = 20, 1000, 400, 0.6
INSTALL = (
    "apt-get install fortunes fortunes-min fortunes-de fortunes-es fortunes-it fortunes-br fortunes-pl "
    "fortunes-cs fortunes-eo"
)

TOPICS: tuple[str, ...] = ("art", "computers", "education", "food", "law", "politics", "science", "work")

# English: every prose file of Debian's fortunes + fortunes-min (not ascii-art, translate-me,
# nor the Latin paradoxum); the other languages: every file of their folder, less the listed ones.
ENGLISH_FILES: tuple[str, ...] = (
    "art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education",
    "ethnic", "food", "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law", "linux",
    "linuxcookie", "literature", "love", "magic", "medicine", "men-women", "miscellaneous", "news",
    "people", "perl", "pets", "platitudes", "politics", "pratchett", "riddles", "science",
    "songs-poems", "sports", "startrek", "tao", "wisdom", "work", "zippy",
)  # fmt: skip
LANGUAGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # label, folder (or "" for the top-level English files), excluded files
    ("english", "", ()),
    ("german", "de", ("asciiart", "translations")),
    ("spanish", "es", ()),
    ("italian", "it", ()),
    ("portuguese", "brasil", ()),  # a single file
    ("polish", "pl", ()),
    ("czech", "cs", ("klasik-sk",)),  # klasik-sk is Slovak
    ("esperanto", "eo", ()),
)
_FUNCTION_WORDS = "the and of to is you that it in for with this are be not have was on what your"
ENGLISH_FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split(" "))

_SOURCE = (
    "Debian packages {packages}, /usr/share/games/fortunes/{files} (free data: see "
    "/usr/share/doc/<package>/copyright); read at run time"
)
_ATTRIBUTION = re.compile(r"^\s*(?:--|―|—)\s*\S")
_OVERSTRIKE = re.compile(r".\x08")


def split_fortunes(data: bytes) -> list[str]:
    """Raw texts of a fortune file (separator: a line holding only ``%``); invalid UTF-8 is dropped."""
    texts = []
    for chunk in re.split(rb"(?m)^%[ \t]*\r?$\n?", data):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            texts.append(text)
    return texts


def clean_fortune(raw: str) -> str | None:
    """The cleaned text of one fortune (see the module docstring), or None if it is rejected."""
    lines = _OVERSTRIKE.sub("", raw).replace("\r", "").rstrip().split("\n")
    for i in range(max(1, len(lines) - 3), len(lines)):
        if _ATTRIBUTION.match(lines[i]):
            lines = lines[:i]
            break
    text = squash("\n".join(lines))
    if not MIN_CHARS <= len(text) <= MAX_CHARS or letter_fraction(text) < MIN_LETTER_FRACTION:
        return None
    return truncate(text, max_chars=TRUNCATE_CHARS)


def english_fraction(text: str) -> float:
    """Share of the words (lower-cased, letters only) that are common English function words."""
    words = re.findall(r"[^\W\d_]+", text.lower())
    return sum(w in ENGLISH_FUNCTION_WORDS for w in words) / len(words) if words else 0.0


def fortunes_root() -> Path:
    return data_dir(
        env="WEIGHTMERGE_FORTUNES_DIR",
        default="/usr/share/games/fortunes",
        what="fortune files",
        install=INSTALL,
    )


def load_fortune_file(relpath: str) -> tuple[str, ...]:
    """Cleaned, kept texts of one fortune file (path relative to the fortunes folder), in file order."""
    return _load_fortune_file(fortunes_root() / relpath)


@functools.cache
def _load_fortune_file(path: Path) -> tuple[str, ...]:  # cached per path, once per process
    if not path.is_file():
        raise TaskDataUnavailable(f"fortune file {path} not found ({INSTALL})")
    texts = (clean_fortune(raw) for raw in split_fortunes(path.read_bytes()))
    return tuple(t for t in texts if t is not None)


def language_files(root: Path, folder: str, exclude: tuple[str, ...]) -> list[str]:
    """Fortune files of one language (paths relative to `root`, sorted): text files, not .dat/.u8."""
    if folder == "":
        return list(ENGLISH_FILES)
    if (root / folder).is_file():
        return [folder]
    if not (root / folder).is_dir():
        raise TaskDataUnavailable(f"fortune folder {root / folder} not found ({INSTALL})")
    names = sorted(p.name for p in (root / folder).iterdir() if p.is_file() and not p.is_symlink())
    return [f"{folder}/{n}" for n in names if not n.endswith((".dat", ".u8")) and n not in exclude]


def build_topic(*, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    return make_task(
        name="fortune_topic",
        label_names=TOPICS,
        texts_by_label={topic: load_fortune_file(topic) for topic in TOPICS},
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        description="Topic of an English fortune-cookie text: the fortune file it comes from.",
        source=_SOURCE.format(packages="fortunes", files="{" + ",".join(TOPICS) + "}"),
    )


def language_pools() -> dict[str, list[str]]:
    """label -> kept texts of that language (computed once per process and fortunes folder)."""
    return {label: list(texts) for label, texts in _language_pools(fortunes_root())}


@functools.cache
def _language_pools(root: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    pools = []
    for label, folder, exclude in LANGUAGES:
        texts = [t for f in language_files(root, folder, exclude) for t in _load_fortune_file(root / f)]
        if label != "english":
            texts = [t for t in texts if english_fraction(t) < 0.25]
        pools.append((label, tuple(texts)))
    return tuple(pools)


def build_language(*, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    return make_task(
        name="fortune_language",
        label_names=tuple(label for label, _, _ in LANGUAGES),
        texts_by_label=language_pools(),
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        description="Language of a fortune-cookie text (8 languages).",
        source=_SOURCE.format(
            packages="fortunes, fortunes-min, fortunes-de, fortunes-es, fortunes-it, fortunes-br, "
            "fortunes-pl, fortunes-cs, fortunes-eo",
            files="{<English files>,de,es,it,brasil,pl,cs,eo}",
        ),
    )
