"""WordNet tasks from Debian's `wordnet-base` (WordNet 3.0 database files in /usr/share/wordnet).

Each line of data.noun / data.verb / data.adj / data.adv is one synset:
``offset lex_filenum ss_type w_cnt word lex_id [word lex_id]... p_cnt [pointers]... | gloss``.
The two-digit `lex_filenum` names the lexicographer file, i.e. the supersense (noun.animal,
verb.motion, ...; the fixed table of lexnames(5WN) below). The gloss is a definition followed by
zero or more quoted usage examples: ``have an existence, be extant; "Is there a God?"``.

Tasks (texts are built from the data, labels from the file numbers / file names):

* ``wordnet_noun_a`` -- 8 noun supersenses of mostly physical things (animal, artifact, body, food,
  location, object, plant, substance); text ``"lemma: definition"``.
* ``wordnet_noun_b`` -- 8 other noun supersenses (act, attribute, cognition, communication, event,
  group, person, state); same text form.
* ``wordnet_verb`` -- 8 verb supersenses; same text form.
* ``wordnet_pos`` -- noun / verb / adjective / adverb from the definition alone.
* ``wordnet_noun_b_usage``, ``wordnet_verb_usage`` (held out, heads ``wordnet_noun_b`` and
  ``wordnet_verb``) -- the same supersenses, but the text is one of the synset's *usage examples*
  (``"Is there a God?"``), never its definition.
* ``wordnet_adj_type`` (extra, not in the built-in lists) -- descriptive head adjective vs
  satellite vs relational (pertainym) adjective.

No synset feeds both a supersense task and its usage variant: a noun or verb synset with a usable
example (>= 3 words) goes to the *usage* side when the first byte of sha256("n00001740") (pos and
offset) is even, otherwise to the *gloss* side. So a held-out usage sentence never belongs to a
synset whose definition an expert was trained on.

Licence: WordNet 3.0 (Princeton University) may be used, copied and distributed with its notice;
the data is read from the installed package at run time and not copied into this repository.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from weightmerge.eval.data._text import data_dir, squash
from weightmerge.eval.tasks import Task, TaskDataUnavailable, make_task

LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip

NOUN_A: tuple[str, ...] = ("animal", "artifact", "body", "food", "location", "object", "plant", "substance")
NOUN_B: tuple[str, ...] = (
    "act",
    "attribute",
    "cognition",
    "communication",
    "event",
    "group",
    "person",
    "state",
)
VERB: tuple[str, ...] = (
    "body",
    "change",
    "cognition",
    "communication",
    "contact",
    "creation",
    "motion",
    "social",
)
POS_FILES: tuple[tuple[str, str], ...] = (
    ("noun", "noun"),
    ("verb", "verb"),
    ("adjective", "adj"),
    ("adverb", "adv"),
)
ADJ_TYPES: tuple[str, ...] = ("descriptive", "satellite", "relational")

MIN_EXAMPLE_WORDS = 3
INSTALL = "apt-get install wordnet-base"
_SOURCE = (
    "Debian package wordnet-base, /usr/share/wordnet/data.{files} (WordNet 3.0, Princeton University; "
    "WordNet 3.0 licence: use, copy and distribute with the copyright notice); read at run time"
)


@dataclass(frozen=True)
class Synset:
    offset: int
    pos: str  # ss_type: n, v, a (head adjective), s (satellite adjective), r (adverb)
    lexname: str  # e.g. "noun.animal"
    lemmas: tuple[str, ...]  # readable: underscores -> spaces, adjective markers like "(p)" removed
    definition: str
    examples: tuple[str, ...]  # the quoted usage examples, in order

    @property
    def key(self) -> str:
        return f"{self.pos}{self.offset:08d}"


_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_FIRST_EXAMPLE = re.compile(r'(?:^|;)\s*"')


def split_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """``'def; "ex one"; "ex two"'`` -> ``('def', ('ex one', 'ex two'))``: the definition is the text
    before the first quote that opens a `;`-separated part; examples are the quoted strings after it."""
    gloss = squash(gloss)
    m = _FIRST_EXAMPLE.search(gloss)
    if m is None:
        return gloss.strip(" ;"), ()
    examples = tuple(squash(e) for e in re.findall(r'"([^"]+)"', gloss[m.start() :]) if squash(e))
    return gloss[: m.start()].strip(" ;"), examples


def parse_data_line(line: str) -> Synset | None:
    """One synset from a line of a WordNet data file; None for the licence header (indented lines)."""
    if not line.strip() or line.startswith(" "):
        return None
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    if not sep or len(fields) < 6:
        raise ValueError(f"malformed WordNet data line: {line[:80]!r}")
    lex, pos, count = int(fields[1]), fields[2], int(fields[3], 16)
    if pos not in "nvasr" or not 0 <= lex < len(LEXNAMES) or count < 1:
        raise ValueError(f"malformed WordNet data line: {line[:80]!r}")
    lemmas = tuple(_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(count))
    definition, examples = split_gloss(gloss)
    return Synset(int(fields[0]), pos, LEXNAMES[lex], lemmas, definition, examples)


def parse_data_file(path: Path) -> tuple[Synset, ...]:
    with path.open(encoding="utf-8") as fh:
        return tuple(s for s in (parse_data_line(line) for line in fh) if s is not None)


def load_synsets(pos_file: str) -> tuple[Synset, ...]:
    """All synsets of data.<pos_file> (noun, verb, adj, adv), parsed once per process and folder."""
    root = data_dir(
        env="WEIGHTMERGE_WORDNET_DIR", default="/usr/share/wordnet", what="WordNet", install=INSTALL
    )
    return _load_data_file(root / f"data.{pos_file}")


@functools.cache
def _load_data_file(path: Path) -> tuple[Synset, ...]:
    if not path.is_file():
        raise TaskDataUnavailable(f"WordNet file {path} not found ({INSTALL})")
    return parse_data_file(path)


def usage_example(s: Synset) -> str | None:
    """The synset's first usage example of at least MIN_EXAMPLE_WORDS words, if any."""
    return next((e for e in s.examples if len(e.split()) >= MIN_EXAMPLE_WORDS), None)


def on_usage_side(s: Synset) -> bool:
    """True for synsets reserved for the usage tasks (see the module docstring)."""
    return usage_example(s) is not None and hashlib.sha256(s.key.encode()).digest()[0] % 2 == 0


def gloss_text(s: Synset) -> str:
    return f"{s.lemmas[0]}: {s.definition}"


def supersense_pools(
    synsets: Iterable[Synset], *, prefix: str, labels: Sequence[str], usage: bool
) -> dict[str, list[str]]:
    """label -> texts for the synsets of lexnames ``prefix + label``: gloss texts of gloss-side
    synsets, or (``usage=True``) usage examples of usage-side synsets."""
    wanted = {prefix + label: label for label in labels}
    pools: dict[str, list[str]] = {label: [] for label in labels}
    for s in synsets:
        label = wanted.get(s.lexname)
        if label is None or not s.definition or on_usage_side(s) != usage:
            continue
        text = usage_example(s) if usage else gloss_text(s)
        if text:
            pools[label].append(text)
    return pools


_SUPERSENSE: dict[str, tuple[str, tuple[str, ...], bool, str | None]] = {
    # task name -> (data file, labels, usage side?, head)
    "wordnet_noun_a": ("noun", NOUN_A, False, None),
    "wordnet_noun_b": ("noun", NOUN_B, False, None),
    "wordnet_verb": ("verb", VERB, False, None),
    "wordnet_noun_b_usage": ("noun", NOUN_B, True, "wordnet_noun_b"),
    "wordnet_verb_usage": ("verb", VERB, True, "wordnet_verb"),
}


def build_supersense(name: str, *, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    """One of the supersense tasks in _SUPERSENSE."""
    pos_file, labels, usage, head = _SUPERSENSE[name]
    form = "one usage example of the synset (never its definition)" if usage else '"lemma: definition"'
    pools = supersense_pools(load_synsets(pos_file), prefix=f"{pos_file}.", labels=labels, usage=usage)
    return make_task(
        name=name,
        label_names=labels,
        texts_by_label=pools,
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        description=f"WordNet {pos_file} supersense (lexicographer file) of a synset from {form}.",
        source=_SOURCE.format(files=pos_file),
        head=head,
    )


def build_noun_a(*, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    return build_supersense("wordnet_noun_a", seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)


def build_noun_b(*, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    return build_supersense("wordnet_noun_b", seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)


def build_verb(*, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    return build_supersense("wordnet_verb", seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)


def build_noun_b_usage(*, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    return build_supersense("wordnet_noun_b_usage", seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)


def build_verb_usage(*, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    return build_supersense("wordnet_verb_usage", seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)


def build_pos(*, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    pools = {label: [s.definition for s in load_synsets(f)] for label, f in POS_FILES}
    return make_task(
        name="wordnet_pos",
        label_names=tuple(label for label, _ in POS_FILES),
        texts_by_label=pools,
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        description="Part of speech (noun, verb, adjective, adverb) of a WordNet synset from its definition.",
        source=_SOURCE.format(files="{noun,verb,adj,adv}"),
    )


def adj_type(s: Synset) -> str | None:
    """descriptive: head synset of adj.all; satellite: ss_type s; relational: adj.pert; else None."""
    if s.pos == "s":
        return "satellite"
    if s.lexname == "adj.all":
        return "descriptive"
    return "relational" if s.lexname == "adj.pert" else None


def build_adj_type(*, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    pools: dict[str, list[str]] = {label: [] for label in ADJ_TYPES}
    for s in load_synsets("adj"):
        label = adj_type(s)
        if label is not None and s.definition:
            pools[label].append(gloss_text(s))
    return make_task(
        name="wordnet_adj_type",
        label_names=ADJ_TYPES,
        texts_by_label=pools,
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        description=(
            'WordNet adjective kind from "lemma: definition": descriptive head adjective (adj.all), '
            "satellite of a head, or relational adjective (adj.pert, 'of or relating to ...')."
        ),
        source=_SOURCE.format(files="adj"),
    )
