"""Embedding passes decoded on the device (pml_mutual.data.device_decode) against decoding in the workers.

The bound: torch's antialiased bilinear is the algorithm of Pillow's BILINEAR, computed in float32 where
Pillow rounds to 8 bits between its horizontal and vertical pass (≤ 0.5 level carried into the second)
and at the end; so the two paths' rounded pixels differ by at most 1 level of 255. The JPEG decoder on
the CPU is libjpeg-turbo, as Pillow's: bit-equal pixels before the resize. A transform whose crop is larger
than its resize enlarges twice, one level each.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pml_mutual.data import ImageItems, ImageListDataset, ProtocolTransform
from pml_mutual.data.device_decode import (
    EncodedBatch,
    EncodedImageDataset,
    collate_encoded,
    decodable_on_device,
    decode_batch,
    resized_center_crop,
)
from pml_mutual.data.loaders import LoaderPool
from pml_mutual.data.transforms import (
    INPUT_SPACES,
    center_crop,
    resize_shorter,
    shorter_side_size,
    to_input_space,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def levels(x: torch.Tensor, input_space: str) -> torch.Tensor:
    """Input-space values back to 0–255 RGB levels (the inverse of to_input_space)."""
    order, value_range, mean, std = INPUT_SPACES[input_space]
    x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    x = x * (255.0 / value_range)
    return x.flip(-3) if order == "BGR" else x


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 90),
    height=st.integers(1, 90),
    size=st.integers(1, 40),
    extra=st.integers(-20, 30),
    seed=st.integers(0, 2**31 - 1),
)
def test_tensor_test_transform_is_pillows_within_one_level(width, height, size, extra, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    resize = max(1, size + extra)  # below size: the crop enlarges the image first
    expected = np.asarray(center_crop(resize_shorter(image, resize), size), dtype=np.float32)
    got = resized_center_crop(
        torch.from_numpy(pixels).permute(2, 0, 1)[None].float(),
        ProtocolTransform(False, size=size, resize=resize),
    )[0]
    assert got.shape == (3, size, size)
    assert torch.equal(got, got.round())  # whole levels, as Pillow's 8-bit output
    # one level per resize: a second one (the crop enlarging an image smaller than itself) carries the first's
    resizes = 1 if min(shorter_side_size(width, height, resize)) >= size else 2
    assert (got - torch.from_numpy(expected).permute(2, 0, 1)).abs().max() <= resizes


def test_no_resize_needed_gives_pillows_pixels_exactly():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    t = ProtocolTransform(False, size=32, resize=40)
    expected = t(Image.fromarray(pixels))
    got = to_input_space(
        resized_center_crop(torch.from_numpy(pixels).permute(2, 0, 1)[None].float(), t), "imagenet"
    )
    assert torch.equal(got[0], expected)


def write_images(root, specs, seed=0):
    """Image files of random pixels: (name, width, height, format, mode) each."""
    rng = np.random.default_rng(seed)
    paths = []
    for name, w, h, fmt, mode in specs:
        channels = {"RGB": 3, "L": None, "CMYK": 4}[mode]
        shape = (h, w) if channels is None else (h, w, channels)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
            root / name, fmt, **({"quality": 90} if fmt == "JPEG" else {})
        )
        paths.append(name)
    return paths


PNGS = [
    ("a.png", 120, 90, "PNG", "RGB"),
    ("b.png", 64, 80, "PNG", "L"),
    ("c.png", 120, 90, "PNG", "RGB"),
    ("d.png", 30, 20, "PNG", "RGB"),
    ("e.png", 200, 41, "PNG", "RGB"),
]
JPEGS = [
    ("a.jpg", 120, 90, "JPEG", "RGB"),
    ("b.jpg", 64, 80, "JPEG", "L"),
    ("c.jpg", 90, 120, "JPEG", "CMYK"),
    ("d.jpg", 30, 20, "JPEG", "RGB"),
] + PNGS[:2]


def dataset(root, specs, input_space="imagenet", boxes=False, train=False):
    paths = write_images(root, specs)
    box = np.array([[3, 2.4, 28.6, 19]] * len(paths)) if boxes else None
    items = ImageItems(root, paths, np.arange(len(paths)) % 2, box)
    return ImageListDataset(items, ProtocolTransform(train, input_space, size=24))


def worker_and_device(ds, num_workers=0):
    """Every item's tensor as the workers make it, and as the device-decoding loader makes it."""
    expected = torch.stack([ds[i][0] for i in range(len(ds))])
    pool = LoaderPool(4, 3, num_workers=num_workers, decode_on_device=True)
    try:
        batches = list(pool.embed(ds)())
    finally:
        pool.close()
    assert all(isinstance(x, EncodedBatch) for x, _ in batches)
    got = torch.cat([x.to("cpu") for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    return expected, got, labels


@pytest.mark.parametrize("input_space", ["imagenet", "bgr255"])
@pytest.mark.parametrize("boxes", [False, True])
def test_files_pillow_decodes_in_the_worker_are_resized_on_the_device_within_one_level(
    tmp_path, input_space, boxes
):
    ds = dataset(tmp_path, PNGS, input_space, boxes)
    expected, got, labels = worker_and_device(ds, num_workers=1)
    assert got.shape == expected.shape == (len(PNGS), 3, 24, 24)
    assert labels.tolist() == ds.labels.tolist()
    assert (levels(got, input_space) - levels(expected, input_space)).abs().max() <= 1 + 1e-3


def test_jpegs_decoded_by_torchvision_within_one_level_of_the_workers(tmp_path):
    pytest.importorskip("torchvision")
    for boxes in (False, True):
        ds = dataset(tmp_path, JPEGS, "bgr255", boxes)
        expected, got, _ = worker_and_device(ds)
        assert (got - expected).abs().max() <= 1 + 1e-3  # bgr255: one unit is one level


def test_a_damaged_jpeg_is_named(tmp_path):
    pytest.importorskip("torchvision")
    ds = dataset(tmp_path, JPEGS[:2])
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 3])
    enc = EncodedImageDataset(ds)
    batch, _ = collate_encoded([enc[0], enc[1]])
    with pytest.raises(OSError, match="a.jpg"):
        batch.to("cpu")


def test_only_test_transformed_image_files_can_be_decoded_on_the_device(tmp_path):
    train = dataset(tmp_path, PNGS[:1], train=True)
    assert not decodable_on_device(train)
    assert not decodable_on_device(torch.utils.data.TensorDataset(torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="test ProtocolTransform"):
        EncodedImageDataset(train)
    with pytest.raises(ValueError, match="test ProtocolTransform"):
        LoaderPool(4, 3, decode_on_device=True).embed(train)


def test_a_batch_mixing_transforms_is_refused(tmp_path):
    a = EncodedImageDataset(dataset(tmp_path, PNGS[:1]))
    b = ImageListDataset(a.dataset.items, ProtocolTransform(False, size=16))
    batch, _ = collate_encoded([a[0], EncodedImageDataset(b)[0]])
    with pytest.raises(ValueError, match="different transforms"):
        decode_batch(batch.images, torch.device("cpu"))


def test_other_items_keep_torchs_default_collate():
    x, y = collate_encoded([(torch.ones(2), 1), (torch.zeros(2), 0)])
    assert torch.equal(x, torch.tensor([[1.0, 1.0], [0.0, 0.0]])) and y.tolist() == [1, 0]
