"""Augmented views of a stage's training images, for drift measurement (beyond the paper).

Eq. 3's drift and the learned maps are fitted on F_old(x) and F_new(x) for the stage's images x; LDC
(Gomez-Villa et al., ECCV 2024) fits its projector on many augmented views of them instead, which covers
more of the space than the images themselves. :class:`AugmentedViews` draws ``views`` copies of every item
through the dataset's own (training) transform, each copy seeded by ``(seed, its position)``: the same
views whatever the loader, its workers or the order, so every old model embeds exactly the images the new
model embedded, and a resumed run measures the same drift. The transform must draw from torch's generator
(torchvision's transforms do).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


def view_seed(seed: Sequence[int], position: int) -> int:
    return int(np.random.SeedSequence([*seed, position]).generate_state(1, dtype=np.uint64)[0] >> 1)


class AugmentedViews(Dataset):
    """``views`` draws of every item of ``dataset``: position ``v·N + i`` is item ``i``'s view ``v``, drawn
    with torch's CPU generator seeded from ``(*seed, v·N + i)`` (restored afterwards)."""

    def __init__(self, dataset: Dataset, views: int, seed: Sequence[int] = (0,)):
        if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 1:
            raise ValueError(f"views must be an integer ≥ 1, got {views!r}")
        self.dataset, self.views, self.seed = dataset, int(views), tuple(int(s) for s in seed)

    def __len__(self) -> int:
        return self.views * len(self.dataset)

    def __getitem__(self, position: int):
        if not 0 <= position < len(self):
            raise IndexError(f"view {position} of {len(self)}")
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(view_seed(self.seed, position))
            return self.dataset[position % len(self.dataset)]


def check_views_differ(dataset: Dataset, name: str, items: int = 32) -> None:
    """ValueError unless ``dataset``'s transform is random: two seeded draws of its first ``items`` items
    that all come out equal mean that extra views would only repeat the images (a random flip alone passes
    with probability 1 − 2⁻³²)."""
    n = min(items, len(dataset))
    draws = [AugmentedViews(dataset, 1, seed=(s,)) for s in (0, 1)]
    for i in range(n):
        a, b = (d[i][0] for d in draws)
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape or not torch.equal(a, b):
            return
    raise ValueError(
        f"drift_views > 0 needs a random training transform, but {name} gave the same input twice for each "
        f"of its first {n} items: its views would repeat the images. Give the training datasets a random "
        "transform (drawing from torch's generator) or set drift_views=0"
    )
