"""The loaders of CUB-200-2011, Cars196 and DeepFashion2 read tiny datasets written in the real formats."""

import json

import numpy as np
import pytest
import torch

from pml_mutual.data import cars196, cub, deepfashion2, fixtures
from pml_mutual.data.images import ImageListDataset, read_list_file, write_list_file
from pml_mutual.data.stages import scale_stage_ends, stages_from_ends


def _per_class(labels):
    return np.bincount(labels).tolist()


# ------------------------------------------------------------------ CUB
def test_cub_reads_classes_paths_and_the_protocol_split(tmp_path):
    counts = [5, 6, 7, 10]
    root = fixtures.write_cub_fixture(tmp_path / "CUB_200_2011", counts)
    items, official = cub.read_cub(root)
    assert _per_class(items.labels) == counts
    assert items.paths[0].startswith("001.Class_1/") and (items.root / items.paths[0]).is_file()
    train, test = cub.load_cub(root, seed=1)
    assert _per_class(train.labels) == [int(np.floor(0.6 * n)) for n in counts]
    assert _per_class(test.labels) == [n - int(np.floor(0.6 * n)) for n in counts]
    assert not set(train.paths) & set(test.paths)
    other, _ = cub.load_cub(root, seed=2)
    assert other.paths != train.paths  # the seed matters
    off_train, off_test = cub.load_cub(root, split="official")
    assert len(off_train) == official.sum() and len(off_test) == (~official).sum()


def test_cub_accepts_fecd_style_list_files_against_the_original_layout(tmp_path):
    root = fixtures.write_cub_fixture(tmp_path / "CUB_200_2011", [4, 4, 4])
    items, _ = cub.read_cub(root)
    # FECD's lists name train/<class dir>/<file>; the images live under images/<class dir>/<file>
    lists = {}
    for part, idx in (("train", [0, 1, 4, 5, 8, 9]), ("test", [2, 3, 6, 7, 10, 11])):
        sub = items.subset(idx)
        sub.paths = [f"{part}/{p}" for p in sub.paths]
        write_list_file(sub, tmp_path / f"{part}.txt")
        lists[part] = sub
    train, test = cub.load_cub(root, train_list=tmp_path / "train.txt", test_list=tmp_path / "test.txt")
    assert train.root == root / "images" and (train.root / train.paths[0]).is_file()
    assert train.labels.tolist() == lists["train"].labels.tolist() and len(test) == 6
    with pytest.raises(ValueError, match="both train_list and test_list"):
        cub.load_cub(root, train_list=tmp_path / "train.txt")


def test_cub_errors_name_the_missing_file(tmp_path):
    root = fixtures.write_cub_fixture(tmp_path / "c", [3, 3])
    (root / "image_class_labels.txt").unlink()
    with pytest.raises(FileNotFoundError, match="image_class_labels.txt"):
        cub.read_cub(root)
    with pytest.raises(FileNotFoundError, match="CUB-200-2011 directory"):
        cub.read_cub(tmp_path / "nowhere")


def test_paper_stage_ends():
    cub_stages = stages_from_ends(range(200), cub.STAGE_ENDS["multi-task"])
    assert np.bincount(list(cub_stages.values())).tolist() == [100, 25, 25, 25, 25]
    cars = stages_from_ends(range(196), cars196.STAGE_ENDS["multi-task"])
    assert np.bincount(list(cars.values())).tolist() == [98, 25, 25, 25, 23]  # 1–98, 99–123, …, 174–196
    df2 = stages_from_ends(range(21190), deepfashion2.STAGE_ENDS["multi-task"])
    assert np.bincount(list(df2.values())).tolist() == [10595, 2661, 2634, 2668, 2632]
    assert np.bincount(
        list(stages_from_ends(range(196), cars196.STAGE_ENDS["one-task"]).values())
    ).tolist() == [98, 98]
    assert scale_stage_ends((100, 125, 150, 175), 200, 200) == (100, 125, 150, 175)
    assert scale_stage_ends((100, 125, 150, 175), 200, 16) == (8, 10, 12, 14)
    with pytest.raises(ValueError, match="too few"):
        scale_stage_ends((100, 125, 150, 175), 200, 9)
    with pytest.raises(ValueError, match="increase"):
        stages_from_ends(range(10), (5, 5))


# ------------------------------------------------------------------ Cars196
@pytest.mark.parametrize("layout", ["annos", "devkit"])
def test_cars196_reads_both_layouts(tmp_path, layout):
    counts = [6, 5, 8]
    root = fixtures.write_cars196_fixture(tmp_path / "cars", counts, layout=layout)
    items = cars196.read_cars196(root)
    assert _per_class(items.labels) == counts and items.boxes is None
    assert all((root / p).is_file() for p in items.paths)
    boxed = cars196.read_cars196(root, crop=True)
    assert boxed.boxes.shape == (sum(counts), 4) and boxed.boxes[0].tolist() == [4.0, 3.0, 52.0, 41.0]
    x, y = ImageListDataset(boxed)[0]
    assert x.size == (48, 38) and y == boxed.labels[0]  # the crop, not the 56×44 picture
    train, test = cars196.load_cars196(root, seed=0)
    assert _per_class(train.labels) == [3, 3, 4]


def test_cars196_missing_annotations_are_named(tmp_path):
    (tmp_path / "cars").mkdir()
    with pytest.raises(FileNotFoundError, match="cars_annos.mat"):
        cars196.read_cars196(tmp_path / "cars")


# ------------------------------------------------------------------ DeepFashion2
def test_deepfashion2_identities_are_pair_and_style_items_cropped(tmp_path):
    root = fixtures.write_deepfashion2_fixture(
        tmp_path / "df2", n_pairs=3, images_per_pair=5, splits=("train", "validation")
    )
    items = deepfashion2.read_deepfashion2(root)
    # two styled items per image (style 0 ignored), 3 pairs × 2 styles = 6 identities of 5 crops each
    assert items.identities.tolist() == [[1, 1], [1, 2], [2, 1], [2, 2], [3, 1], [3, 2]]
    assert _per_class(items.labels) == [5] * 6
    assert {p.split("/")[0] for p in items.paths} == {"train", "validation"}
    x, y = ImageListDataset(items)[0]
    assert x.size == (40, 40)
    left = np.asarray(x, dtype=float).mean(axis=(0, 1))
    x2, y2 = ImageListDataset(items)[1]  # the other item of the same image: another identity
    assert y2 != y and not np.allclose(left, np.asarray(x2, dtype=float).mean(axis=(0, 1)), atol=5)
    train, test = deepfashion2.load_deepfashion2(root)
    assert _per_class(train.labels) == [3] * 6 and _per_class(test.labels) == [2] * 6


def test_deepfashion2_drops_single_item_identities_and_reports_bad_json(tmp_path):
    root = fixtures.write_deepfashion2_fixture(tmp_path / "df2", n_pairs=2, images_per_pair=3)
    anno = root / "train" / "annos" / "000001.json"
    doc = json.loads(anno.read_text())
    doc["item1"]["style"] = 7  # a (pair 1, style 7) identity with one item
    anno.write_text(json.dumps(doc))
    items = deepfashion2.read_deepfashion2(root)
    assert [1, 7] not in items.identities.tolist() and len(items.identities) == 4
    anno.write_text("{}")
    with pytest.raises(ValueError, match="000001.json"):
        deepfashion2.read_deepfashion2(root)
    with pytest.raises(FileNotFoundError, match="annos"):
        deepfashion2.read_deepfashion2(tmp_path)


def test_image_dataset_applies_the_transform_and_names_a_missing_image(tmp_path):
    from pml_mutual.data.transforms import ProtocolTransform

    root = fixtures.write_cub_fixture(tmp_path / "c", [3, 3])
    items, _ = cub.read_cub(root)
    ds = ImageListDataset(items, ProtocolTransform(False, "imagenet", size=24, resize=28))
    x, y = ds[4]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 24, 24) and y == 1
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    (items.root / items.paths[0]).unlink()
    with pytest.raises(FileNotFoundError, match="image file missing"):
        ds[0]


def test_annotation_files_with_bad_lines_are_refused_naming_the_file_and_line(tmp_path):
    import json as _json

    from pml_mutual.data.cars196 import read_cars196
    from pml_mutual.data.cub import read_cub
    from pml_mutual.data.deepfashion2 import read_deepfashion2
    from pml_mutual.data.fixtures import write_cars196_fixture, write_cub_fixture, write_deepfashion2_fixture
    from pml_mutual.data.images import ImageItems

    root = write_cub_fixture(tmp_path / "CUB", [3] * 2)
    lines = (root / "images.txt").read_text().splitlines()
    for bad, message in (
        ([lines[0].replace("1 ", "abc ", 1)] + lines[1:], r"images.txt:1: the image id 'abc'"),
        (lines + [lines[0]], r"images.txt:7: image id 1 given twice \(first on line 1\)"),
    ):
        (root / "images.txt").write_text("\n".join(bad) + "\n")
        with pytest.raises(ValueError, match=message):
            read_cub(root)
    (root / "images.txt").write_bytes(("\n".join(lines) + "\n").encode() + "7 café.jpg\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"images.txt:7: not UTF-8 text"):
        read_cub(root)
    listing = tmp_path / "list.txt"
    listing.write_bytes("a.jpg 0\n".encode() + "é.jpg 1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"list.txt:2: not UTF-8 text"):
        read_list_file(listing)
    with pytest.raises(ValueError, match=r"item 2 \(b.jpg\) has the box \(5.0, 0.0, 1.0, 4.0\)"):
        ImageItems(tmp_path, ["a.jpg", "b.jpg"], [0, 1], [[0, 0, 4, 4], [5, 0, 1, 4]])
    cars = write_cars196_fixture(tmp_path / "cars", [2, 2])
    mat = next(cars.rglob("*.mat"))
    mat.write_bytes(mat.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{mat.name} is not a readable \.mat file"):
        read_cars196(cars)
    df2 = write_deepfashion2_fixture(tmp_path / "df2", 2)
    anno = sorted(df2.rglob("annos/*.json"))[0]
    doc = _json.loads(anno.read_text())
    item = next(k for k in doc if k.startswith("item"))
    doc[item]["bounding_box"] = [0, "x", 3, 4]
    doc[item]["style"] = 1
    anno.write_text(_json.dumps(doc))
    with pytest.raises(ValueError, match=rf"{anno.name}: {item}'s bounding_box .* not a number"):
        read_deepfashion2(df2)
