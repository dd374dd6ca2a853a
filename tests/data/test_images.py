"""List files, per-class splits and the protocol transforms."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_mutual.data.images import ImageItems, check_split, per_class_split, read_list_file, write_list_file
from pml_mutual.data.transforms import INPUT_SPACES, ProtocolTransform, random_resized_crop_box

# Images per class of CUB-200-2011 (11,788 in all), in class order.
CUB_COUNTS = [
    60,
    60,
    58,
    60,
    44,
    41,
    53,
    48,
    59,
    60,
    60,
    56,
    60,
    60,
    58,
    58,
    57,
    45,
    59,
    59,
    60,
    56,
    59,
    52,
    60,
    60,
    60,
    59,
    60,
    60,
    60,
    53,
    59,
    59,
    60,
    60,
    59,
    60,
    59,
    60,
    60,
    60,
    59,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    58,
    60,
    59,
    60,
    60,
    60,
    60,
    50,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    57,
    60,
    60,
    59,
    60,
    60,
    60,
    60,
    60,
    53,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    59,
    60,
    60,
    60,
    50,
    60,
    60,
    60,
    49,
    60,
    59,
    60,
    60,
    60,
    60,
    60,
    50,
    60,
    59,
    60,
    59,
    60,
    59,
    60,
    60,
    60,
    60,
    59,
    59,
    59,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    59,
    60,
    60,
    60,
    60,
    60,
    58,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    59,
    60,
    51,
    60,
    59,
    60,
    60,
    60,
    59,
    60,
    60,
    59,
    60,
    60,
    60,
    60,
    60,
    59,
    60,
    59,
    59,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    60,
    56,
    59,
    60,
    59,
    60,
    60,
    60,
    60,
    60,
    50,
    60,
    60,
    58,
    60,
    60,
    60,
    60,
    60,
    59,
    60,
    60,
    60,
    60,
]


def test_protocol_split_of_cub_gives_the_papers_counts():
    labels = np.repeat(np.arange(200), CUB_COUNTS)
    assert len(labels) == 11788
    train, test = per_class_split(labels, 0.6, seed=0)
    assert (len(train), len(test)) == (7048, 4740)
    # paper Table 1: old task (classes 0–99) 3,504 train / 2,360 test
    assert (labels[train] < 100).sum() == 3504 and (labels[test] < 100).sum() == 2360


@settings(deadline=None)
@given(st.lists(st.integers(2, 30), min_size=1, max_size=12), st.floats(0.3, 0.7), st.integers(0, 2**16))
def test_per_class_split_partitions_every_class(counts, fraction, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    if any(int(np.floor(fraction * n)) in (0, n) for n in counts):
        with pytest.raises(ValueError, match="class"):
            per_class_split(labels, fraction, seed)
        return
    train, test = per_class_split(labels, fraction, seed)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(labels)
    for c, n in enumerate(counts):
        assert (labels[train] == c).sum() == int(np.floor(fraction * n))
    again = per_class_split(labels, fraction, seed)
    assert np.array_equal(again[0], train)


def test_list_file_round_trip_with_and_without_boxes(tmp_path):
    items = ImageItems(tmp_path, ["train/001.A b/x 1.jpg", "train/002.B/y.jpg"], np.array([0, 1]))
    write_list_file(items, tmp_path / "l.txt")
    back = read_list_file(tmp_path / "l.txt")
    assert back.paths == items.paths and back.labels.tolist() == [0, 1] and back.boxes is None
    assert back.root == tmp_path
    boxed = ImageItems(
        tmp_path, ["a.jpg", "b c.jpg"], np.array([3, 4]), np.array([[1, 2, 30, 40], [0, 0, 5.5, 6]])
    )
    write_list_file(boxed, tmp_path / "b.txt")
    back = read_list_file(tmp_path / "b.txt", root="/data")
    assert back.paths == boxed.paths and np.allclose(back.boxes, boxed.boxes) and str(back.root) == "/data"


@pytest.mark.parametrize(
    "line, message", [("justapath", "expected"), ("a.jpg x", "integer"), ("a.jpg -1", "≥ 0")]
)
def test_list_file_errors_name_the_line(tmp_path, line, message):
    (tmp_path / "l.txt").write_text(f"ok.jpg 0\n{line}\n")
    with pytest.raises(ValueError, match=message):
        read_list_file(tmp_path / "l.txt")


def test_missing_list_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="list file"):
        read_list_file(tmp_path / "nope.txt")


def test_check_split_refuses_overlap_and_missing_classes(tmp_path):
    a = ImageItems(tmp_path, ["x.jpg", "y.jpg"], np.array([0, 1]))
    with pytest.raises(ValueError, match="both train and test"):
        check_split(a, ImageItems(tmp_path, ["x.jpg", "z.jpg"], np.array([0, 1])))
    with pytest.raises(ValueError, match="train-only \\[1\\]"):
        check_split(a, ImageItems(tmp_path, ["z.jpg"], np.array([0])))


def _image(w=80, h=60):
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_test_transform_is_resize_then_center_crop_in_each_input_space():
    from PIL import Image

    image = Image.new("RGB", (80, 60), (200, 100, 50))
    for space, (order, scale, mean, std) in INPUT_SPACES.items():
        x = ProtocolTransform(False, space, size=32, resize=36)(image)
        assert x.shape == (3, 32, 32)
        rgb = torch.tensor([200.0, 100.0, 50.0]) * scale / 255.0
        expected = rgb.flip(0) if order == "BGR" else rgb
        expected = (expected - torch.tensor(mean)) / torch.tensor(std)
        assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-3)


def test_bgr255_is_bgr_minus_caffe_mean():
    from PIL import Image

    x = ProtocolTransform(False, "bgr255", size=8, resize=8)(Image.new("RGB", (8, 8), (10, 20, 30)))
    assert torch.allclose(x[:, 0, 0], torch.tensor([30.0 - 104, 20 - 117, 10 - 128]))


def test_train_transform_replays_under_the_same_seed():
    t = ProtocolTransform(True, "imagenet", size=32, resize=36)
    torch.manual_seed(3)
    a = t(_image())
    torch.manual_seed(3)
    b = t(_image())
    torch.manual_seed(4)
    c = t(_image())
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


@settings(deadline=None, max_examples=50)
@given(st.integers(8, 300), st.integers(8, 300), st.floats(0.05, 1.0), st.integers(0, 1000))
def test_random_resized_crop_stays_inside_the_image(w, h, low, seed):
    torch.manual_seed(seed)
    left, top, cw, ch = random_resized_crop_box(w, h, scale=(low, 1.0))
    assert 0 <= left and 0 <= top and 0 < cw and 0 < ch and left + cw <= w and top + ch <= h


def test_bad_transform_arguments():
    with pytest.raises(ValueError, match="input_space"):
        ProtocolTransform(True, "yuv")
    with pytest.raises(ValueError, match="scale"):
        ProtocolTransform(True, scale=(0.5, 0.2))
