"""A many-class glyph dataset built offline from Debian's fonts: *characters are the classes*.

The fine-grained, many-class case of the paper (CUB: 200 classes) on data any machine can install:

    apt-get install fonts-dejavu-core fonts-dejavu-extra fonts-liberation2 fonts-freefont-ttf \\
        fonts-croscore fonts-cmu fonts-paratype fonts-go fonts-oldstandard fonts-texgyre \\
        fonts-linuxlibertine fonts-ebgaramond fonts-open-sans fonts-roboto-unhinted fonts-noto-core
    pip install 'pml-mutual[vision]' fonttools
    python -c "from pml_mutual.data.glyphs import load_glyphs; load_glyphs()"   # builds and caches once

How it is built (deterministic for a given set of font files):

1. Every ``.ttf``/``.otf`` under the font directories is read with fontTools; its cmap says which of the
   candidate characters (Latin, Latin-1, Latin Extended-A, Greek, Cyrillic letters and digits) it has.
2. Each (character, font) is rendered with Pillow at a fixed size on a fixed baseline (so ``o`` and ``O``
   still differ by size) into a 32×32 grey image; blank glyphs and the font's "missing glyph" box are dropped.
3. Clone fonts (the same rendering of the basic Latin letters and digits) keep one copy.
4. Homoglyphs (Latin A / Greek Α / Cyrillic А ...) that render (nearly) identically in most fonts that
   have both keep the lowest code point: two classes that look the same are not two classes.
5. Characters drawn by at least ``min_fonts`` distinct fonts become the classes (in code-point order).
6. Fonts are split by *family* into train (≈60 %) and test (≈40 %) with a fixed seed, so the test
   images of every class come from font families never seen in training.

The result is cached as an ``.npz`` under ``$PML_MUTUAL_CACHE`` or ``~/.cache/pml_mutual``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

FONT_DIRS = ("/usr/share/fonts",)
FONT_PACKAGES = (
    "fonts-dejavu-core fonts-dejavu-extra fonts-liberation2 fonts-freefont-ttf fonts-croscore fonts-cmu "
    "fonts-paratype fonts-go fonts-oldstandard fonts-texgyre fonts-linuxlibertine fonts-ebgaramond "
    "fonts-open-sans fonts-roboto-unhinted fonts-noto-core"
)
BUILD_VERSION = 1
SIZE = 32
FONT_PX = 22
BASELINE = 25


def candidate_characters() -> list[str]:
    ranges = [
        (0x30, 0x39),
        (0x41, 0x5A),
        (0x61, 0x7A),  # digits, Basic Latin letters
        (0xC0, 0xFF),  # Latin-1 letters
        (0x100, 0x17F),  # Latin Extended-A
        (0x391, 0x3A9),
        (0x3B1, 0x3C9),  # Greek
        (0x401, 0x45F),  # Cyrillic
    ]
    chars = [chr(c) for a, b in ranges for c in range(a, b + 1)]
    return [c for c in chars if c.isalnum()]


def cache_dir() -> Path:
    return Path(os.environ.get("PML_MUTUAL_CACHE", Path.home() / ".cache" / "pml_mutual"))


def font_files(font_dirs: Iterable[str | os.PathLike] = FONT_DIRS) -> list[Path]:
    files = []
    for d in font_dirs:
        d = Path(d)
        if d.is_dir():
            files += [p for p in d.rglob("*") if p.suffix.lower() in (".ttf", ".otf") and p.is_file()]
    return sorted(set(files))


def _imports():
    try:
        from fontTools.ttLib import TTFont
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "building the glyph dataset needs Pillow and fontTools: pip install Pillow fonttools"
        ) from e
    return TTFont, Image, ImageDraw, ImageFont


def _family(ttfont, path: Path) -> str:
    names = ttfont["name"] if "name" in ttfont else None
    for name_id in (16, 1):
        rec = names.getName(name_id, 3, 1, 0x409) if names is not None else None
        rec = rec or (names.getName(name_id, 1, 0, 0) if names is not None else None)
        if rec is not None:
            return str(rec).strip()
    return path.stem.split("-")[0]


def render(font, ch: str, Image, ImageDraw) -> np.ndarray:
    img = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(img).text((SIZE / 2, BASELINE), ch, font=font, fill=255, anchor="ms")
    return np.asarray(img, dtype=np.uint8)


def build_glyphs(
    font_dirs: Sequence[str | os.PathLike] = FONT_DIRS,
    min_fonts: int = 40,
    test_fraction: float = 0.4,
    seed: int = 0,
    homoglyph_tolerance: float = 6.0,
    progress: bool = False,
) -> dict:
    """Build the dataset in memory (see the module docstring); returns arrays and metadata."""
    TTFont, Image, ImageDraw, ImageFont = _imports()
    files = font_files(font_dirs)
    if not files:
        raise FileNotFoundError(
            f"no .ttf/.otf fonts under {list(map(str, font_dirs))}: apt-get install {FONT_PACKAGES}"
        )
    chars = candidate_characters()
    char_index = {c: i for i, c in enumerate(chars)}
    basic = [c for c in chars if c.isascii()]
    images = np.zeros((len(files), len(chars), SIZE, SIZE), dtype=np.uint8)
    present = np.zeros((len(files), len(chars)), dtype=bool)
    families = []
    for fi, path in enumerate(files):
        try:
            tt = TTFont(str(path), lazy=True, fontNumber=0)
            cmap = tt.getBestCmap() or {}
            families.append(_family(tt, path))
            tt.close()
            font = ImageFont.truetype(str(path), FONT_PX)
        except Exception:  # unreadable or bitmap-only font: skip it
            families.append("")
            continue
        missing = render(font, "\ue000", Image, ImageDraw) if 0xE000 not in cmap else None
        for ch in chars:
            if ord(ch) not in cmap:
                continue
            img = render(font, ch, Image, ImageDraw)
            if img.max() < 64 or (missing is not None and np.array_equal(img, missing)):
                continue
            images[fi, char_index[ch]] = img
            present[fi, char_index[ch]] = True
        if progress and fi % 50 == 0:
            print(f"  rendered {fi + 1}/{len(files)} fonts", flush=True)

    # Clones: fonts that draw the basic Latin letters and digits identically (e.g. the same face twice).
    basic_idx = [char_index[c] for c in basic]
    keep_font = present[:, basic_idx].sum(1) >= len(basic_idx) // 2
    signatures = {}
    for fi in np.flatnonzero(keep_font):
        key = hashlib.sha1(images[fi, basic_idx].tobytes() + present[fi, basic_idx].tobytes()).hexdigest()
        if key in signatures:
            keep_font[fi] = False
        else:
            signatures[key] = fi
    # Fonts with little coverage of the basics stay out: they are mostly other scripts' fonts.

    # Homoglyphs: for each pair of characters, how often two fonts' renderings are nearly equal.
    fonts = np.flatnonzero(keep_font)
    n_chars = len(chars)
    same = np.zeros((n_chars, n_chars))
    both = np.zeros((n_chars, n_chars))
    for fi in fonts:
        idx = np.flatnonzero(present[fi])
        x = images[fi, idx].reshape(len(idx), -1).astype(np.float32)
        sq = (x * x).sum(1)
        # RMS pixel difference
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0) / x.shape[1])
        both[np.ix_(idx, idx)] += 1
        same[np.ix_(idx, idx)] += dist < homoglyph_tolerance
    alias = np.arange(n_chars)
    for j in range(n_chars):
        for i in range(j):
            if alias[i] == i and both[i, j] > 0 and same[i, j] / both[i, j] > 0.5:
                alias[j] = i
                break
    # Classes: characters that are their own alias and drawn by enough distinct fonts.
    coverage = present[fonts].sum(0)
    class_chars = [i for i in range(n_chars) if alias[i] == i and coverage[i] >= min_fonts]
    if not class_chars:
        raise ValueError(
            f"no character is drawn by {min_fonts} distinct fonts: install more fonts ({FONT_PACKAGES})"
        )

    # Train/test split by font family, fixed seed.
    fams = sorted({families[fi] for fi in fonts})
    rng = np.random.default_rng(seed)
    test_fams = set(
        np.array(fams)[rng.permutation(len(fams))[: int(round(test_fraction * len(fams)))]].tolist()
    )
    xs, ys, is_test, font_of = [], [], [], []
    for label, ci in enumerate(class_chars):
        for fi in fonts:
            if present[fi, ci]:
                xs.append(images[fi, ci])
                ys.append(label)
                is_test.append(families[fi] in test_fams)
                font_of.append(int(fi))
    return {
        "images": np.stack(xs),
        "labels": np.asarray(ys, dtype=np.int64),
        "is_test": np.asarray(is_test),
        "font_index": np.asarray(font_of, dtype=np.int64),
        "classes": np.asarray([ord(chars[i]) for i in class_chars], dtype=np.int64),
        "fonts": np.asarray([str(files[fi]) for fi in fonts]),
        "families": np.asarray([families[fi] for fi in fonts]),
        "test_families": np.asarray(sorted(test_fams)),
    }


def _cache_key(files: Sequence[Path], **params) -> str:
    h = hashlib.sha1(json.dumps({"v": BUILD_VERSION, **params}, sort_keys=True).encode())
    for f in files:
        h.update(f"{f}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def load_glyphs(
    font_dirs: Sequence[str | os.PathLike] = FONT_DIRS,
    min_fonts: int = 40,
    test_fraction: float = 0.4,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    rebuild: bool = False,
    progress: bool = True,
) -> tuple[TensorDataset, TensorDataset, dict]:
    """(train, test, meta): float32 (1, 32, 32) images in [0, 1], int64 labels 0..C−1 in code-point order.

    Built once and cached; ``meta`` holds the class characters, fonts, families and the test families.
    """
    files = font_files(font_dirs)
    params = dict(min_fonts=min_fonts, test_fraction=test_fraction, seed=seed)
    path = Path(cache) if cache is not None else cache_dir() / f"glyphs-{_cache_key(files, **params)}.npz"
    if rebuild or not path.is_file():
        if progress:
            print(
                f"building the glyph dataset from {len(files)} font files (once; cached at {path})",
                flush=True,
            )
        data = build_glyphs(font_dirs, progress=progress, **params)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **data)
        os.replace(tmp, path)
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    x = torch.from_numpy(data["images"].astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(data["labels"])
    test = torch.from_numpy(data["is_test"])
    meta = {
        "characters": "".join(chr(c) for c in data["classes"]),
        "n_classes": int(len(data["classes"])),
        "n_fonts": int(len(data["fonts"])),
        "fonts": data["fonts"].tolist(),
        "test_families": data["test_families"].tolist(),
        "font_index": data["font_index"],
        "is_test": data["is_test"],
        "cache": str(path),
    }
    return TensorDataset(x[~test], y[~test]), TensorDataset(x[test], y[test]), meta
