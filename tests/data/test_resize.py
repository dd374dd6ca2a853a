import numpy as np
import pytest
import torch
from PIL import Image

from pml_mutual.data import ImageListDataset, ProtocolTransform, fixtures, load_cub
from pml_mutual.data.resize import main, write_resized_cub
from pml_mutual.data.transforms import resize_shorter
from pml_mutual.models.backbones import INPUT_SPACE


@pytest.fixture
def cub(tmp_path):
    """60×45 JPEGs; class 2 stored as PNG (lossless: the copy can be checked exactly); class 3 at 20×16,
    already below the short side (copied as it is)."""
    root = fixtures.write_cub_fixture(tmp_path / "src" / "CUB_200_2011", [4, 4, 4], size=(60, 45))
    listing = (root / "images.txt").read_text()
    for p in sorted((root / "images").glob("002.*/*.jpg")):
        Image.open(p).save(p.with_suffix(".png"))
        p.unlink()
        listing = listing.replace(p.name, p.with_suffix(".png").name)
    (root / "images.txt").write_text(listing)
    for p in sorted((root / "images").glob("003.*/*.jpg")):
        Image.open(p).resize((20, 16)).save(p, quality=90)
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_copy_holds_the_same_items_each_image_as_the_loader_resize_gives_it(cub, tmp_path, workers):
    src_before = {p: p.read_bytes() for p in cub.rglob("*") if p.is_file()}
    dst = write_resized_cub(cub, tmp_path / "dst", short_side=32, workers=workers)
    assert {p: p.read_bytes() for p in cub.rglob("*") if p.is_file()} == src_before  # the source only read
    for split in ("protocol", "official"):
        (a_train, a_test), (b_train, b_test) = load_cub(cub, split=split), load_cub(dst, split=split)
        assert a_train.paths == b_train.paths and a_test.paths == b_test.paths
        assert np.array_equal(a_train.labels, b_train.labels) and np.array_equal(a_test.labels, b_test.labels)
    kinds = set()
    for rel in a_train.paths + a_test.paths:
        original, stored = Image.open(cub / "images" / rel).convert("RGB"), Image.open(dst / "images" / rel)
        if min(original.size) <= 32:
            kinds.add("copied")
            assert (dst / "images" / rel).read_bytes() == (cub / "images" / rel).read_bytes()
            continue
        expected = np.asarray(resize_shorter(original, 32), dtype=np.int16)
        got = np.asarray(stored.convert("RGB"), dtype=np.int16)
        assert got.shape == expected.shape and min(stored.size) == 32
        if rel.endswith(".png"):
            kinds.add("exact")
            assert np.array_equal(got, expected)  # exactly the pixels the loader's Resize(32) gives
        else:
            # a JPEG re-encoding (quality 95, 4:2:0) of those pixels: the fixture's noise (σ = 18 levels)
            # is its worst case, a few levels on average
            kinds.add("jpeg")
            assert np.abs(got - expected).mean() < 8
    assert kinds == {"copied", "exact", "jpeg"}
    # the test transform's Resize(32) is then a no-op: for a lossless image the same tensor exactly
    tf = ProtocolTransform(False, INPUT_SPACE["resnet50"], 28, resize=32)
    src_test, dst_test = load_cub(cub)[1], load_cub(dst)[1]
    png = [i for i, p in enumerate(dst_test.paths) if p.endswith(".png")][0]
    a, b = ImageListDataset(src_test, tf)[png][0], ImageListDataset(dst_test, tf)[png][0]
    assert torch.equal(a, b)


def test_refuses_a_non_empty_or_overlapping_destination_and_a_non_cub_source(cub, tmp_path):
    with pytest.raises(ValueError, match="must not be, contain or lie inside"):
        write_resized_cub(cub, cub / "images" / "copy")
    with pytest.raises(ValueError, match="must not be, contain or lie inside"):
        write_resized_cub(cub, cub.parent)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="busy is not empty"):
        write_resized_cub(cub, tmp_path / "busy")
    assert (tmp_path / "busy" / "mine.txt").read_text() == "x"
    with pytest.raises(FileNotFoundError, match="images.txt"):
        write_resized_cub(tmp_path / "busy", tmp_path / "out")
    with pytest.raises(ValueError, match="short_side"):
        write_resized_cub(cub, tmp_path / "out", short_side=0)


def test_command_line(cub, tmp_path, capsys):
    main([str(cub), str(tmp_path / "cli"), "--short-side", "40", "--workers", "1"])
    assert "wrote" in capsys.readouterr().out
    assert load_cub(tmp_path / "cli")[0].paths == load_cub(cub)[0].paths


def test_the_copy_is_another_dataset_to_a_run_directory(cub, tmp_path):
    from pml_mutual.identity import dataset_fingerprint

    dst = write_resized_cub(cub, tmp_path / "dst", short_side=32)
    tf = ProtocolTransform(False, INPUT_SPACE["resnet50"], 28, resize=32)
    fingerprints = {dataset_fingerprint(ImageListDataset(load_cub(root)[0], tf)) for root in (cub, dst)}
    assert len(fingerprints) == 2
