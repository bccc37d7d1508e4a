"""Builders of the built-in image tasks (the vision benchmark), from packaged data only.

* ``fashion_mnist`` -- Debian ``dataset-fashion-mnist`` (Zalando's Fashion-MNIST, MIT licence):
  28x28 photos of 10 kinds of clothing, from ``/usr/share/datasets/fashion-mnist`` (or
  ``$WEIGHTMERGE_FASHION_MNIST_DIR``).
* ``animal_mnist`` -- PyPI ``animal-mnist`` (MIT): 28x28 silhouettes of 10 animals, read from the
  package's data files (its loader imports TensorFlow, so it is never imported).
* ``sklearn_digits`` -- the UCI optical handwritten digits bundled with scikit-learn
  (``sklearn.datasets.load_digits``, 8x8, CC BY 4.0): held out, scored with the head of
  ``glyph_digits`` (printed digits -> handwritten digits).
* glyph tasks -- characters rendered from the TrueType fonts of the Debian packages
  ``fonts-dejavu-core``, ``fonts-liberation``, ``fonts-freefont-ttf`` (all free licences, see
  ``/usr/share/doc/<package>/copyright``) and icons of ``fonts-font-awesome`` (SIL OFL 1.1), at
  32x32 with a seeded random font, size, offset and rotation per image. The pool of a class is
  the same for every seed (the seed only draws the splits).
* ``shapes`` -- geometric shapes drawn with Pillow (procedural, no data file).

`docs/tasks.md` lists each task's classes and the reasoning behind the held-out ones.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from weightmerge.eval.images import ImageTask, make_image_task
from weightmerge.eval.tasks import TaskDataUnavailable, class_quotas

SIZE = 32  # rendered glyphs and shapes are SIZE x SIZE
FONT_DIRS = ("/usr/share/fonts/truetype",)
FONT_INSTALL = "apt-get install fonts-dejavu-core fonts-liberation fonts-freefont-ttf fonts-font-awesome"
# (typeface, file name) of the text fonts used for glyphs; a missing file is skipped
TEXT_FONTS: tuple[tuple[str, str], ...] = (
    ("sans", "DejaVuSans.ttf"),
    ("sans", "DejaVuSans-Bold.ttf"),
    ("sans", "DejaVuSansCondensed-Oblique.ttf"),
    ("sans", "LiberationSans-Regular.ttf"),
    ("sans", "LiberationSans-BoldItalic.ttf"),
    ("sans", "FreeSans.ttf"),
    ("sans", "FreeSansBold.ttf"),
    ("serif", "DejaVuSerif.ttf"),
    ("serif", "DejaVuSerif-Bold.ttf"),
    ("serif", "LiberationSerif-Regular.ttf"),
    ("serif", "LiberationSerif-Italic.ttf"),
    ("serif", "FreeSerif.ttf"),
    ("serif", "FreeSerifBold.ttf"),
    ("mono", "DejaVuSansMono.ttf"),
    ("mono", "DejaVuSansMono-Bold.ttf"),
    ("mono", "LiberationMono-Regular.ttf"),
    ("mono", "LiberationMono-Italic.ttf"),
    ("mono", "FreeMono.ttf"),
    ("mono", "FreeMonoBold.ttf"),
)
ICON_FONT = "fontawesome-webfont.ttf"
# Font Awesome 4.7 code points: held-in icons, and the disjoint set the multitask base is trained on
ICONS_A: dict[str, int] = {
    "home": 0xF015, "star": 0xF005, "heart": 0xF004, "user": 0xF007, "camera": 0xF030,
    "bell": 0xF0F3, "car": 0xF1B9, "plane": 0xF072, "music": 0xF001, "cloud": 0xF0C2,
}  # fmt: skip
ICONS_B: dict[str, int] = {
    "envelope": 0xF0E0, "search": 0xF002, "trash": 0xF1F8, "lock": 0xF023, "flag": 0xF024,
    "gift": 0xF06B, "leaf": 0xF06C, "key": 0xF084, "truck": 0xF0D1, "umbrella": 0xF0E9,
}  # fmt: skip
DIGITS = tuple("0123456789")
UPPER = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
GREEK = tuple("αβγδεζηθικλμνξοπρστυφχψω")
CYRILLIC = tuple("бвгджзийлфцчшщъыьэюяЖЗИЛФЦЧШЩЭЮЯ")
SYMBOLS = tuple("+-=<>%&@#$?!*/\\~^§¶{}[]|;")
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
ROTATIONS = ("0", "90", "180", "270")


def _font_path(name: str) -> Path | None:
    for root in (os.environ.get("WEIGHTMERGE_FONT_DIR"), *FONT_DIRS):
        if root and Path(root).is_dir():
            found = sorted(Path(root).rglob(name))
            if found:
                return found[0]
    return None


@functools.lru_cache(maxsize=1)
def text_fonts() -> tuple[tuple[str, Path], ...]:
    fonts = tuple((kind, p) for kind, name in TEXT_FONTS if (p := _font_path(name)) is not None)
    kinds = {k for k, _ in fonts}
    if len(fonts) < 3 or kinds != {"sans", "serif", "mono"}:
        raise TaskDataUnavailable(f"glyph tasks need the free TrueType fonts ({FONT_INSTALL})")
    return fonts


@functools.lru_cache(maxsize=256)
def _font(path: Path, size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(str(path), size)


def render(text: str, font: Path, *, rng: random.Random, rotate: float = 0.0) -> np.ndarray:
    """One SIZE x SIZE uint8 image of ``text``: random size (55-85 % of the frame), offset and a
    small random rotation (+-12 degrees) added to ``rotate``; white on black."""
    from PIL import Image, ImageDraw

    canvas = 3 * SIZE
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    f = _font(font, int(SIZE * rng.uniform(0.55, 0.85)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    x = (canvas - (right - left)) / 2 - left + rng.uniform(-3, 3)
    y = (canvas - (bottom - top)) / 2 - top + rng.uniform(-3, 3)
    draw.text((x, y), text, fill=255, font=f)
    img = img.rotate(rotate + rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR)
    c = (canvas - SIZE) // 2
    return np.asarray(img.crop((c, c, c + SIZE, c + SIZE)), dtype=np.uint8)


def _pool_size(n_train: int, n_val: int, n_test: int, k: int) -> int:
    need = max(sum(q) for q in zip(*(class_quotas(n, k) for n in (n_train, n_val, n_test)), strict=True))
    return int(need * 1.1) + 8  # rendering can repeat an image; duplicates are dropped


def _rendered(
    name: str, labels: Sequence[str], draw: Callable[[int, random.Random], np.ndarray], pool: int
) -> dict[str, np.ndarray]:
    """``pool`` images per class, image i of class c drawn by ``draw(c, rng)`` with an rng seeded
    from (task, class, i): the pools do not depend on the split seed."""
    out = {}
    for c, label in enumerate(labels):
        rng = random.Random(f"{name}\x1f{label}")
        out[label] = np.stack([draw(c, rng) for _ in range(pool)])
    return out


def _glyph_task(
    name: str,
    labels: Sequence[str],
    chars: Sequence[str],
    *,
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    description: str,
    head: str | None = None,
) -> ImageTask:
    fonts = text_fonts()
    pool = _pool_size(n_train, n_val, n_test, len(labels))

    def draw(c: int, rng: random.Random) -> np.ndarray:
        return render(chars[c], rng.choice(fonts)[1], rng=rng)

    return make_image_task(
        name=name, label_names=labels, images_by_label=_rendered(name, labels, draw, pool), seed=seed,
        n_train=n_train, n_val=n_val, n_test=n_test, description=description,
        source=f"glyphs rendered from Debian fonts ({FONT_INSTALL})", head=head,
    )  # fmt: skip


def build_glyph_digits(*, seed: int, n_train: int, n_val: int, n_test: int) -> ImageTask:
    return _glyph_task("glyph_digits", DIGITS, DIGITS, seed=seed, n_train=n_train, n_val=n_val,
                       n_test=n_test, description="printed digit 0-9 in 19 fonts")  # fmt: skip


def build_glyph_letters(*, seed: int, n_train: int, n_val: int, n_test: int) -> ImageTask:
    return _glyph_task("glyph_letters", UPPER, UPPER, seed=seed, n_train=n_train, n_val=n_val,
                       n_test=n_test, description="printed capital letter A-Z")  # fmt: skip


def build_glyph_lowercase(*, seed: int, n_train: int, n_val: int, n_test: int) -> ImageTask:
    lower = tuple(c.lower() for c in UPPER)
    return _glyph_task("glyph_lowercase", UPPER, lower, seed=seed, n_train=n_train, n_val=n_val,
                       n_test=n_test, description="printed small letter a-z, labelled A-Z",
                       head="glyph_letters")  # fmt: skip


def build_glyph_greek(*, seed: int, n_train: int, n_val: int, n_test: int) -> ImageTask:
    return _glyph_task("glyph_greek", GREEK, GREEK, seed=seed, n_train=n_train, n_val=n_val,
                       n_test=n_test, description="printed small Greek letter")  # fmt: skip


def build_glyph_cyrillic(*, seed: int, n_train: int, n_val: int, n_test: int) -> ImageTask:
    return _glyph_task("glyph_cyrillic", CYRILLIC, CYRILLIC, seed=seed, n_train=n_train, n_val=n_val,
                       n_test=n_test, description="printed Cyrillic letter")  # fmt: skip


def build_glyph_symbols(*, seed: int, n_train: int, n_val: int, n_test: int) -> ImageTask:
    return _glyph_task("glyph_symbols", SYMBOLS, SYMBOLS, seed=seed, n_train=n_train, n_val=n_val,
                       n_test=n_test, description="printed ASCII symbol or section/pilcrow sign")  # fmt: skip


def build_glyph_typeface(*, seed: int, n_train: int, n_val: int, n_test: int) -> ImageTask:
    """Sans, serif or monospace? A random letter or digit in a random font of that kind."""
    name, kinds = "glyph_typeface", ("sans", "serif", "mono")
    fonts = text_fonts()
    chars = UPPER + tuple(c.lower() for c in UPPER) + DIGITS

    def draw(c: int, rng: random.Random) -> np.ndarray:
        return render(rng.choice(chars), rng.choice([p for k, p in fonts if k == kinds[c]]), rng=rng)

    pool = _pool_size(n_train, n_val, n_test, len(kinds))
    return make_image_task(
        name=name, label_names=kinds, images_by_label=_rendered(name, kinds, draw, pool), seed=seed,
        n_train=n_train, n_val=n_val, n_test=n_test,
        description="typeface kind (sans, serif, mono) of a random letter or digit",
        source=f"glyphs rendered from Debian fonts ({FONT_INSTALL})",
    )  # fmt: skip


def build_glyph_rotation(*, seed: int, n_train: int, n_val: int, n_test: int) -> ImageTask:
    """Which way up? A random capital letter or digit rotated by 0, 90, 180 or 270 degrees."""
    name = "glyph_rotation"
    fonts = text_fonts()
    chars = tuple("ABCDEFGJKLMNPQRTUVWY2345679")  # no glyph equal to itself turned by 90/180 degrees

    def draw(c: int, rng: random.Random) -> np.ndarray:
        return render(rng.choice(chars), rng.choice(fonts)[1], rng=rng, rotate=90.0 * c)

    pool = _pool_size(n_train, n_val, n_test, 4)
    return make_image_task(
        name=name, label_names=ROTATIONS, images_by_label=_rendered(name, ROTATIONS, draw, pool), seed=seed,
        n_train=n_train, n_val=n_val, n_test=n_test,
        description="rotation (0/90/180/270 degrees) of a capital letter or digit",
        source=f"glyphs rendered from Debian fonts ({FONT_INSTALL})",
    )  # fmt: skip


def _icon_task(name: str, icons: dict[str, int], *, seed: int, n_train: int, n_val: int, n_test: int,
               description: str) -> ImageTask:  # fmt: skip
    path = _font_path(ICON_FONT)
    if path is None:
        raise TaskDataUnavailable(f"icon tasks need Font Awesome ({FONT_INSTALL})")
    labels = tuple(icons)
    points = [chr(icons[k]) for k in labels]

    def draw(c: int, rng: random.Random) -> np.ndarray:
        return render(points[c], path, rng=rng)

    pool = _pool_size(n_train, n_val, n_test, len(labels))
    return make_image_task(
        name=name, label_names=labels, images_by_label=_rendered(name, labels, draw, pool), seed=seed,
        n_train=n_train, n_val=n_val, n_test=n_test, description=description,
        source="Font Awesome 4.7 icons, Debian fonts-font-awesome (SIL OFL 1.1)",
    )  # fmt: skip


def build_icons(*, seed: int, n_train: int, n_val: int, n_test: int) -> ImageTask:
    return _icon_task("icons", ICONS_A, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test,
                      description="one of 10 Font Awesome icons")  # fmt: skip


def build_icons_b(*, seed: int, n_train: int, n_val: int, n_test: int) -> ImageTask:
    return _icon_task("icons_b", ICONS_B, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test,
                      description="one of 10 other Font Awesome icons")  # fmt: skip


def _shape(kind: str, rng: random.Random) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(img)
    r = rng.uniform(6, 13)
    cx, cy = rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1)
    width = rng.randint(1, 3)
    fill = 255 if rng.random() < 0.5 and kind not in ("ring", "cross") else None
    box = (cx - r, cy - r, cx + r, cy + r)
    turn = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        d.ellipse(box, outline=255, fill=fill, width=width)
    elif kind == "ring":
        d.ellipse(box, outline=255, width=width)
        d.ellipse((cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2), outline=255, width=width)
    elif kind == "square":
        pts = [
            (cx + r * math.cos(turn + a), cy + r * math.sin(turn + a)) for a in (0.785, 2.356, 3.927, 5.498)
        ]
        d.polygon(pts, outline=255, fill=fill, width=width)
    elif kind == "diamond":
        pts = [(cx, cy - r), (cx + r * 0.6, cy), (cx, cy + r), (cx - r * 0.6, cy)]
        d.polygon(pts, outline=255, fill=fill, width=width)
    elif kind == "triangle":
        pts = [(cx + r * math.cos(turn + a), cy + r * math.sin(turn + a)) for a in (0.0, 2.094, 4.189)]
        d.polygon(pts, outline=255, fill=fill, width=width)
    else:  # cross
        for a in (turn, turn + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            d.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=width + 1)
    return np.asarray(img, dtype=np.uint8)


def build_shapes(*, seed: int, n_train: int, n_val: int, n_test: int) -> ImageTask:
    pool = _pool_size(n_train, n_val, n_test, len(SHAPES))
    images = _rendered("shapes", SHAPES, lambda c, rng: _shape(SHAPES[c], rng), pool)
    return make_image_task(
        name="shapes", label_names=SHAPES, images_by_label=images, seed=seed, n_train=n_train, n_val=n_val,
        n_test=n_test, description="a random outlined or filled geometric shape",
        source="drawn with Pillow (procedural)",
    )  # fmt: skip


# ----------------------------------------------------------------------------------- packaged photos

FASHION_LABELS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle-boot")  # fmt: skip
ANIMAL_LABELS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


@functools.lru_cache(maxsize=1)
def _fashion() -> dict[str, np.ndarray]:
    root = Path(os.environ.get("WEIGHTMERGE_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")
    files = [root / f for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")]
    if not all(f.exists() for f in files):
        raise TaskDataUnavailable(
            f"Fashion-MNIST not found in {root} (apt-get install dataset-fashion-mnist)"
        )
    images, labels = _idx(files[0]), _idx(files[1])
    return {name: images[labels == c] for c, name in enumerate(FASHION_LABELS)}


def build_fashion_mnist(*, seed: int, n_train: int, n_val: int, n_test: int) -> ImageTask:
    return make_image_task(
        name="fashion_mnist", label_names=FASHION_LABELS, images_by_label=_fashion(), seed=seed,
        n_train=n_train, n_val=n_val, n_test=n_test, description="Fashion-MNIST clothing photo (28x28)",
        source="Debian dataset-fashion-mnist (MIT)",
    )  # fmt: skip


@functools.lru_cache(maxsize=1)
def _animals() -> dict[str, np.ndarray]:
    import importlib.util
    import pickle

    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataUnavailable(
            "animal_mnist needs the PyPI package animal-mnist (pip install --no-deps animal-mnist)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    with gzip.open(root / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(root / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(pickle.load(f))
    return {name: images[labels == c] for c, name in enumerate(ANIMAL_LABELS)}


def build_animal_mnist(*, seed: int, n_train: int, n_val: int, n_test: int) -> ImageTask:
    return make_image_task(
        name="animal_mnist", label_names=ANIMAL_LABELS, images_by_label=_animals(), seed=seed,
        n_train=n_train, n_val=n_val, n_test=n_test, description="Animal-MNIST silhouette (28x28)",
        source="PyPI animal-mnist (MIT)",
    )  # fmt: skip


@functools.lru_cache(maxsize=1)
def _digits() -> dict[str, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TaskDataUnavailable("sklearn_digits needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    images = np.clip(np.rint(d.images * 255.0 / 16.0), 0, 255).astype(np.uint8)
    return {str(c): images[d.target == c] for c in range(10)}


def build_sklearn_digits(*, seed: int, n_train: int, n_val: int, n_test: int) -> ImageTask:
    by = _digits()
    return make_image_task(
        name="sklearn_digits", label_names=DIGITS, images_by_label=by, seed=seed, n_train=n_train,
        n_val=n_val, n_test=n_test, description="handwritten digit, 8x8 (UCI optical digits)",
        source="scikit-learn's bundled load_digits (UCI, CC BY 4.0)", head="glyph_digits",
    )  # fmt: skip
