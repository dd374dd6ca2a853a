"""The glyph builder on real fonts: Debian's DejaVu (fonts-dejavu-core) when installed, else skipped."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("fontTools")
from pml_mutual.data.glyphs import build_glyphs, candidate_characters, load_glyphs  # noqa: E402

DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
pytestmark = pytest.mark.skipif(
    not DEJAVU.is_dir(), reason="needs fonts-dejavu-core (apt-get install fonts-dejavu-core)"
)


@pytest.fixture(scope="module")
def built():
    return build_glyphs([DEJAVU], min_fonts=3, test_fraction=0.4)


def test_classes_are_distinct_characters_drawn_by_enough_fonts(built):
    classes = [chr(c) for c in built["classes"]]
    assert len(classes) > 150
    assert set(classes) <= set(candidate_characters())
    counts = np.bincount(built["labels"])
    assert counts.min() >= 3
    # Homoglyphs collapse to the lowest code point: Latin A stays, Greek Alpha and Cyrillic A go.
    assert "A" in classes and "\u0391" not in classes and "\u0410" not in classes
    assert "o" in classes and "O" in classes  # same shape, different size: both stay


def test_no_clone_fonts_and_real_images(built):
    images = built["images"]
    assert images.shape[1:] == (32, 32) and images.dtype == np.uint8
    assert (images.reshape(len(images), -1).max(1) >= 64).all()  # no blank glyph
    # Each font draws its characters differently from every other kept font.
    fonts = built["font_index"]
    sigs = {bytes(images[(fonts == f) & (built["labels"] == 0)].tobytes()) for f in np.unique(fonts)}
    assert len(sigs) == len(np.unique(fonts[built["labels"] == 0]))


def test_test_families_never_seen_in_training(built):
    fams = built["families"]
    font_pos = {int(f): i for i, f in enumerate(sorted(set(built["font_index"].tolist())))}
    train_fams = {fams[font_pos[int(f)]] for f in built["font_index"][~built["is_test"]]}
    test_fams = {fams[font_pos[int(f)]] for f in built["font_index"][built["is_test"]]}
    assert test_fams and train_fams and not (train_fams & test_fams)


def test_cached_and_deterministic(tmp_path):
    a = load_glyphs([DEJAVU], min_fonts=3, cache=tmp_path / "g.npz", progress=False)
    b = load_glyphs([DEJAVU], min_fonts=3, cache=tmp_path / "g.npz", progress=False)
    c = load_glyphs([DEJAVU], min_fonts=3, cache=tmp_path / "h.npz", progress=False)
    assert (tmp_path / "g.npz").is_file()
    for x, y in ((a, b), (a, c)):
        assert x[2]["characters"] == y[2]["characters"]
        assert np.array_equal(x[0].tensors[0].numpy(), y[0].tensors[0].numpy())
    assert a[0].tensors[0].shape[1:] == (1, 32, 32)


def test_missing_fonts_name_the_packages(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-"):
        build_glyphs([tmp_path])
