"""Embedding passes decoded on the model's device: the workers read JPEG files as bytes, torchvision
decodes a whole batch on the device (nvJPEG on CUDA) and the test transform (Resize → CenterCrop → the
backbone's input space) runs there too.

On a GPU, drift measurement and evaluation were bound by JPEG decoding in the DataLoader workers: 14
workers delivered 2,200–3,100 images/s of CUB's 500×375 JPEGs, a ResNet-50 embedded ~8,800/s (README,
"Performance"). Here a worker only reads a file, so the pass is bound by the device's decoder instead.

What changes against decoding with Pillow in the workers: the pixels, slightly. The JPEG decoder is
another implementation, and the resize is torch's antialiased bilinear in float32 (the algorithm of
Pillow's ``BILINEAR``, which rounds to 8 bits between its horizontal and vertical passes): pixels differ by
at most one level of 255 per resize (tested against Pillow; libjpeg-turbo, torchvision's CPU decoder, is
Pillow's too and bit-equal; nvJPEG is not measured here). A run's identity therefore records
``embed_decode``. Files that are
not JPEG (PNG, 16-bit TIFF, ...) and JPEGs the device's decoder refuses are decoded by Pillow, exactly as
before, and only resized on the device. Training keeps decoding in the workers: its random augmentations
are drawn there per batch (bit-identical resume), and a training step needs far fewer images per second
than the workers deliver.

On CUDA, torchvision's decoder is called through :func:`decode_off_queued_memory`: as it stands upstream
it can overwrite memory that queued kernels still read (pytorch/vision#9606), which in an embedding pass
means the previous batch's input, read by a forward not yet run.

Use it through ``OnlineConfig(embed_decode="device")`` (or :class:`~pml_mutual.data.loaders.LoaderPool`'s
``decode_on_device``); it needs torchvision (``pip install pml-mutual[vision]``).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from .images import ImageListDataset, box_pixels, open_image
from .transforms import ProtocolTransform, shorter_side_size, to_input_space

JPEG_MAGIC = b"\xff\xd8\xff"


def require_torchvision_decoder() -> None:
    """An ImportError saying what to install, now rather than at the first embedding pass."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "embed_decode='device' decodes JPEGs with torchvision: pip install 'pml-mutual[vision]'"
        ) from e


def decodable_on_device(dataset: Dataset) -> bool:
    """Whether :class:`EncodedImageDataset` can stand in for ``dataset``: image files read through
    the protocol's deterministic test transform."""
    transform = getattr(dataset, "transform", None)
    return (
        isinstance(dataset, ImageListDataset)
        and isinstance(transform, ProtocolTransform)
        and not transform.train
    )


@dataclasses.dataclass
class EncodedImage:
    """One item as a worker hands it over: a JPEG file's bytes (``jpeg=True``) or (3, H, W) uint8 pixels
    that Pillow decoded; the box (x1, y1, x2, y2) is cropped on the device."""

    data: torch.Tensor
    jpeg: bool
    path: str
    box: tuple[float, float, float, float] | None
    transform: ProtocolTransform


class EncodedImageDataset(Dataset):
    """``dataset`` (an :class:`ImageListDataset` with a test :class:`ProtocolTransform`) read as
    ``(EncodedImage, label)``; :func:`collate_encoded` batches them, the batch's ``.to(device)`` decodes."""

    def __init__(self, dataset: ImageListDataset):
        if not decodable_on_device(dataset):
            raise ValueError(
                "decoding on the device needs an ImageListDataset with a test ProtocolTransform "
                "(train=False), "
                f"got {type(dataset).__name__} with transform {getattr(dataset, 'transform', None)!r}"
            )
        self.dataset = dataset
        self.labels = dataset.labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        items = self.dataset.items
        path = items.root / items.paths[i]
        box = None if items.boxes is None else tuple(float(v) for v in items.boxes[i])
        if not path.is_file():
            raise FileNotFoundError(f"image file missing: {path}")
        raw = np.fromfile(path, dtype=np.uint8)
        if raw[:3].tobytes() == JPEG_MAGIC:
            return EncodedImage(torch.from_numpy(raw), True, str(path), box, self.dataset.transform), int(
                self.labels[i]
            )
        return EncodedImage(pillow_pixels(path), False, str(path), box, self.dataset.transform), int(
            self.labels[i]
        )


def pillow_pixels(path) -> torch.Tensor:
    """(3, H, W) uint8 RGB pixels of an image file, decoded as the workers decode it (16-bit scaled, ...)."""
    return (
        torch.from_numpy(np.asarray(open_image(Path(path)), dtype=np.uint8).copy())
        .permute(2, 0, 1)
        .contiguous()
    )


class EncodedBatch:
    """The items of one worker task; ``.to(device)`` decodes and transforms them into a (B, 3, S, S)
    float32 batch there, so :func:`~pml_mutual.evaluation.stages.extract_embeddings` takes it as it
    takes a tensor."""

    def __init__(self, images: list[EncodedImage]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def pin_memory(self) -> "EncodedBatch":  # the DataLoader's pinning thread: bytes stay pageable
        return self

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        return decode_batch(self.images, torch.device(device))


def collate_encoded(batch: list):
    """``(EncodedBatch, labels)`` for items of an :class:`EncodedImageDataset`, torch's default collate
    for anything else (a loader may serve both kinds of dataset; a task never mixes them)."""
    if batch and isinstance(batch[0][0], EncodedImage):
        return EncodedBatch([x for x, _ in batch]), torch.tensor([y for _, y in batch], dtype=torch.int64)
    return default_collate(batch)


def decode_jpegs(images: list[EncodedImage], device: torch.device) -> list[torch.Tensor]:
    """(3, H, W) uint8 RGB pixels on ``device``; one batched call to torchvision's decoder, and, if it
    fails, one call per file, so that a file it refuses is decoded by Pillow or named in the error."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data):
        if device.type != "cuda":
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return decode_off_queued_memory(
            lambda: decode_jpeg(data, mode=ImageReadMode.RGB, device=device), device
        )

    try:
        return list(decode([im.data for im in images]))
    except RuntimeError:
        pass
    out = []
    for im in images:
        try:
            out.append(decode(im.data))
        except RuntimeError:  # e.g. CMYK on nvJPEG; a damaged file raises in Pillow, naming it
            out.append(pillow_pixels(im.path).to(device))
    return out


_decoder_streams: dict[int, torch.cuda.Stream] = {}


def decode_off_queued_memory(decode, device: torch.device):
    """``decode()`` (torchvision's CUDA decoder) run so that it cannot write into memory that kernels
    queued on the caller's stream still read.

    torchvision's ``decode_jpeg(device="cuda")`` allocates its outputs on the current stream, then nvJPEG
    writes them from a private stream that never waits for the current one (pytorch/vision#9606,
    reproduced on H100s: corrupted results in 199 of 200 tries). The caching allocator hands out a block as
    soon as it is freed on its stream, so in an embedding pass the decoder gets the previous model batch's
    input, which that batch's forward, still queued, has yet to read: silently wrong embeddings. Here the
    outputs are allocated on a stream of their own, whose pool holds only earlier decoder outputs; each
    output is recorded on the caller's stream, so its block is reused only once the caller's kernels that
    read it have run. No host sync is added: the next decode still overlaps the queued forward.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _decoder_streams.get(index)
    if stream is None:
        stream = _decoder_streams[index] = torch.cuda.Stream(device=index)
    caller = torch.cuda.current_stream(index)
    with torch.cuda.stream(stream):
        out = decode()
    caller.wait_stream(stream)
    for t in [out] if isinstance(out, torch.Tensor) else out:
        t.record_stream(caller)
    return out


def resize_pixels(pixels: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(B, 3, H, W) float pixels in 0–255 resized as Pillow's ``BILINEAR`` resizes (antialiased when
    shrinking), rounded to whole levels as Pillow's 8-bit output is."""
    if width == 1 and height > 1 and height != pixels.shape[-2]:
        # torch's CPU kernel (2.13, 2.14) gives every row of a one-pixel-wide output the same value when
        # the height changes (found by the property test against Pillow); the transposed resize is right
        return resize_pixels(pixels.transpose(-1, -2), height, 1).transpose(-1, -2)
    out = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255)


def resized_center_crop(pixels: torch.Tensor, transform: ProtocolTransform) -> torch.Tensor:
    """(B, 3, H, W) float RGB pixels in 0–255, all of one size → (B, 3, S, S): the test transform's
    Resize(shorter side) → CenterCrop (an image too small for the crop is enlarged first), as
    :class:`~pml_mutual.data.transforms.ProtocolTransform` does with Pillow."""
    size = transform.size
    h, w = pixels.shape[-2:]
    nw, nh = shorter_side_size(w, h, transform.resize)
    if (nw, nh) != (w, h):
        pixels = resize_pixels(pixels, nw, nh)
    if nw < size or nh < size:
        nw, nh = shorter_side_size(nw, nh, size)
        pixels = resize_pixels(pixels, nw, nh)
    left, top = (nw - size) // 2, (nh - size) // 2
    return pixels[..., top : top + size, left : left + size]


def decode_batch(images: list[EncodedImage], device: torch.device) -> torch.Tensor:
    """(B, 3, S, S) float32 in the backbone's input space on ``device``, in the order of ``images``."""
    if not images:
        raise ValueError("an empty batch has nothing to decode")
    transform = images[0].transform
    if any(repr(im.transform) != repr(transform) for im in images):
        raise ValueError("one batch must come from one dataset: its images have different transforms")
    pixels: list[torch.Tensor | None] = [None] * len(images)
    jpegs = [i for i, im in enumerate(images) if im.jpeg]
    if jpegs:
        for i, x in zip(jpegs, decode_jpegs([images[i] for i in jpegs], device)):
            pixels[i] = x
    for i, im in enumerate(images):
        if not im.jpeg:
            pixels[i] = im.data.to(device, non_blocking=True)
    for i, im in enumerate(images):
        if im.box is not None:
            h, w = pixels[i].shape[-2:]
            x1, y1, x2, y2 = box_pixels(w, h, im.box)
            pixels[i] = pixels[i][:, y1:y2, x1:x2]
    # images of one size are resized together: one interpolation call per size, not per image
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, x in enumerate(pixels):
        by_size[tuple(x.shape[-2:])].append(i)
    out = torch.empty(len(images), 3, transform.size, transform.size, device=device)
    for positions in by_size.values():
        group = torch.stack([pixels[i] for i in positions]).float()
        index = torch.tensor(positions, device=device) if len(positions) < len(images) else None
        result = resized_center_crop(group, transform)
        if index is None:
            out.copy_(result)
        else:
            out.index_copy_(0, index, result)
    return to_input_space(out, transform.input_space)
