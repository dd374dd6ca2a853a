"""The image transforms of the paper's protocol, on Pillow images, with no torchvision dependency.

Train: Resize(256) → RandomResizedCrop(224, scale=(0.16, 1)) → horizontal flip.
Test: Resize(256) → CenterCrop(224).
Then a tensor in the backbone's input space: BN-Inception takes BGR in 0–255 minus the Caffe mean
[104, 117, 128] (no std); ResNet-50 and ViT take RGB in 0–1 with ImageNet mean and std.

Randomness comes from torch's global generator, so a run seeded by
:func:`pml_mutual.online.seed_everything` replays its crops exactly (an interrupted run resumes
bit-identically).
"""

from __future__ import annotations

import math

import numpy as np
import torch

INPUT_SPACES = {
    # channel order, value range, mean, std (per channel, in that order and range)
    "bgr255": ("BGR", 255.0, (104.0, 117.0, 128.0), (1.0, 1.0, 1.0)),
    "imagenet": ("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _bilinear():
    from PIL import Image

    return Image.Resampling.BILINEAR


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``size``, the aspect kept (rounded)."""
    if min(width, height) == size:
        return width, height
    if width <= height:
        return size, max(1, round(height * size / width))
    return max(1, round(width * size / height)), size


def resize_shorter(image, size: int):
    w, h = image.size
    new = shorter_side_size(w, h, size)
    return image if new == (w, h) else image.resize(new, _bilinear())


def center_crop(image, size: int):
    w, h = image.size
    if w < size or h < size:  # pad-free: upscale a too small image first
        image = resize_shorter(image, size)
        w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    width: int, height: int, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop covering ``scale`` of the area with aspect ``ratio`` (the
    Inception crop: 10 tries, then the largest centred crop of an allowed aspect)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1]))
        aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,)))
            left = int(torch.randint(0, width - w + 1, (1,)))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_tensor(image, input_space: str) -> torch.Tensor:
    return to_input_space(
        torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1), input_space
    )


def to_input_space(pixels: torch.Tensor, input_space: str) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) float RGB pixels in 0–255 → the backbone's input space, on their device."""
    if input_space not in INPUT_SPACES:
        raise ValueError(f"input_space must be one of {sorted(INPUT_SPACES)}, got {input_space!r}")
    order, value_range, mean, std = INPUT_SPACES[input_space]
    x = pixels.flip(-3) if order == "BGR" else pixels
    x = x * (value_range / 255.0)
    mean = torch.tensor(mean, device=x.device).view(3, 1, 1)
    std = torch.tensor(std, device=x.device).view(3, 1, 1)
    return (x - mean) / std


class ProtocolTransform:
    """The paper's train (``train=True``) or test transform, ending in a (3, size, size) float tensor."""

    def __init__(
        self,
        train: bool,
        input_space: str = "imagenet",
        size: int = 224,
        resize: int | None = None,
        scale=(0.16, 1.0),
    ):
        if input_space not in INPUT_SPACES:
            raise ValueError(f"input_space must be one of {sorted(INPUT_SPACES)}, got {input_space!r}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min ≤ max ≤ 1, got {scale}")
        # the protocol's 256 → 224, kept at any size
        resize = round(size * 256 / 224) if resize is None else resize
        self.train, self.input_space, self.size, self.resize, self.scale = (
            train,
            input_space,
            size,
            resize,
            tuple(scale),
        )

    def __call__(self, image) -> torch.Tensor:
        image = resize_shorter(image.convert("RGB"), self.resize)
        if self.train:
            left, top, w, h = random_resized_crop_box(*image.size, scale=self.scale)
            image = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), _bilinear())
            if bool(torch.rand(1) < 0.5):
                from PIL import Image

                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            image = center_crop(image, self.size)
        return to_tensor(image, self.input_space)

    def __repr__(self) -> str:
        kind = "train" if self.train else "test"
        return (
            f"ProtocolTransform({kind}, {self.input_space}, resize={self.resize}, size={self.size}, "
            f"scale={self.scale})"
        )
