"""Data of the CPU real-data benchmark (Fashion-MNIST and the glyph dataset), split into stages."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .stages import stage_assignment


def _take_per_class(ds: TensorDataset, per_class: int | None, rng) -> TensorDataset:
    if per_class is None:
        return ds
    y = ds.tensors[1].numpy()
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]))
    return TensorDataset(ds.tensors[0][idx], ds.tensors[1][idx])


def _validation_split(ds: TensorDataset, fraction: float, rng) -> tuple[TensorDataset, TensorDataset]:
    y = ds.tensors[1].numpy()
    val = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        val[idx[: max(2, int(fraction * len(idx)))]] = True
    t = lambda m: TensorDataset(ds.tensors[0][m], ds.tensors[1][m])  # noqa: E731
    return t(~val), t(val)


def load_cpu_benchmark(
    name: str, validation: bool = False, quick: bool = False, per_class_train: int | None = 1000
):
    """(train, test, {setting: class_to_stage}) of the CPU benchmark, labels 0..C−1.

    ``fashion-mnist``: ``per_class_train`` training images per class (all 10,000 test images);
    one-task 0–4 → 5–9, multi-task 5 stages of 2 classes. ``glyphs``: 200 character classes spread
    evenly over the built set; one-task 100 → 100, multi-task 100 + 4 × 25. ``quick`` shrinks both
    (200 images per class; 80 glyph classes). ``validation`` replaces the test set by 20 % of each
    class's training images (tuning never sees the test images).
    """
    rng = np.random.default_rng(0)
    if name == "fashion-mnist":
        from pml_mutual.data.fashion_mnist import load_fashion_mnist

        train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
        per_class = 200 if quick else per_class_train
        train = _take_per_class(train, per_class, rng)
        if quick:
            test = _take_per_class(test, 200, rng)
        stages = {"one-task": stage_assignment(range(10), 5), "multi-task": stage_assignment(range(10), 2, 2)}
    else:
        from pml_mutual.data.glyphs import load_glyphs

        train, test, meta = load_glyphs()
        n_total = meta["n_classes"]
        n_classes = 80 if quick else 200
        if n_total < n_classes:
            raise ValueError(
                f"the glyph dataset has {n_total} classes, {n_classes} are needed: install more fonts"
            )
        chosen = np.unique(np.linspace(0, n_total - 1, n_classes).round().astype(int))
        remap = np.full(n_total, -1)
        remap[chosen] = np.arange(len(chosen))

        def relabel(ds):
            y = remap[ds.tensors[1].numpy()]
            keep = y >= 0
            return TensorDataset(ds.tensors[0][keep], torch.from_numpy(y[keep]))

        train, test = relabel(train), relabel(test)
        half = n_classes // 2
        stages = {
            "one-task": stage_assignment(range(n_classes), half),
            "multi-task": stage_assignment(range(n_classes), half, half // 4),
        }
    if validation:
        train, test = _validation_split(train, 0.2, rng)
    return train, test, stages


class RandomAffine(Dataset):
    """A ``TensorDataset`` of (C, H, W) images through a random affine transform (rotation up to
    ``degrees``, scale in 1 ± ``scale``, shift up to ``shift`` of the side; bilinear, zero outside), drawn
    from torch's generator: the training augmentation of the CPU benchmark's ``--augment``."""

    def __init__(self, base: TensorDataset, degrees: float = 10.0, scale: float = 0.1, shift: float = 0.08):
        self.base, self.degrees, self.scale, self.shift = base, degrees, scale, shift
        self.targets = base.tensors[1]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        angle, zoom, dx, dy = (2 * torch.rand(4) - 1).tolist()
        angle, zoom = math.radians(self.degrees * angle), 1 + self.scale * zoom
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        theta = torch.tensor([[cos, -sin, 2 * self.shift * dx], [sin, cos, 2 * self.shift * dy]])
        grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
        return F.grid_sample(x[None], grid, align_corners=False)[0], y
