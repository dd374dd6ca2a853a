"""Stages of classes: splitting a dataset by class, and checking stages before any training starts."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Integer labels of a ``(x, label)`` dataset without loading its inputs where possible.

    Understands ``TensorDataset``, ``Subset``, ``ConcatDataset`` and datasets with a ``targets`` or
    ``labels`` attribute (torchvision style); otherwise iterates once.
    """
    if isinstance(dataset, Subset):
        labels = dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    elif isinstance(dataset, ConcatDataset):
        labels = np.concatenate([dataset_labels(d) for d in dataset.datasets])
    elif isinstance(dataset, TensorDataset):
        labels = dataset.tensors[1].numpy() if len(dataset.tensors) > 1 else None
    elif hasattr(dataset, "targets"):
        labels = np.asarray(dataset.targets)
    elif hasattr(dataset, "labels"):
        labels = np.asarray(dataset.labels)
    else:
        labels = np.asarray([_label_of(dataset, i) for i in range(len(dataset))])
    if labels is None:
        raise ValueError("the dataset yields no labels: each item must be (input, label)")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be 1-D integers, got dtype {labels.dtype} and shape {labels.shape}")
    return labels.astype(np.int64, copy=False)


def _label_of(dataset: Dataset, i: int):
    item = dataset[i]
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(
            f"{type(dataset).__name__}[{i}] is a {type(item).__name__}, not an (input, label) pair: the "
            "stage loop reads items as PML's trainers do; make __getitem__ return (input, label), or give "
            "the dataset a `targets` / `labels` attribute and wrap it so that items are pairs"
        )
    return item[1]


def check_class_to_stage(class_to_stage) -> Mapping[int, int]:
    if not isinstance(class_to_stage, Mapping):
        raise TypeError(
            "class_to_stage must be a mapping class → stage, e.g. stage_assignment(classes, first=50, "
            f"per_stage=10) or {{0: 0, 1: 0, 2: 1}}; got a {type(class_to_stage).__name__}"
        )
    if not class_to_stage:
        raise ValueError("class_to_stage is empty: map every training class to its stage")
    return class_to_stage


def split_by_stage(dataset: Dataset, class_to_stage: Mapping[int, int]) -> list[Subset]:
    """One ``Subset`` per stage (0, 1, ...) holding the items whose class ``class_to_stage`` maps to it.

    Items of classes missing from ``class_to_stage`` are left out.
    """
    check_class_to_stage(class_to_stage)
    labels = dataset_labels(dataset)
    n_stages = max(class_to_stage.values()) + 1
    stage_of = np.array([class_to_stage.get(int(c), -1) for c in labels])
    return [Subset(dataset, np.flatnonzero(stage_of == s).tolist()) for s in range(n_stages)]


def stage_assignment(classes: Sequence[int], first: int, per_stage: int | None = None) -> dict[int, int]:
    """class → stage for ``classes`` in order: the first ``first`` classes are stage 0, then
    ``per_stage`` classes per stage (all remaining in stage 1 if ``per_stage`` is None: one-task).
    The last stage takes the remainder."""
    classes = [int(c) for c in classes]
    if not 0 < first < len(classes):
        raise ValueError(
            f"first must leave classes for later stages: 0 < first < {len(classes)}, got {first}"
        )
    rest = classes[first:]
    per_stage = len(rest) if per_stage is None else per_stage
    if per_stage <= 0:
        raise ValueError(f"per_stage must be positive, got {per_stage}")
    mapping = {c: 0 for c in classes[:first]}
    n_later = max(1, len(rest) // per_stage)
    for i, c in enumerate(rest):
        mapping[c] = 1 + min(i // per_stage, n_later - 1)
    return mapping


def class_to_stage_of(stage_labels: Sequence[np.ndarray]) -> dict[int, int]:
    """class → stage from each stage's labels; raises if a class appears in two stages."""
    mapping: dict[int, int] = {}
    for s, labels in enumerate(stage_labels):
        for c in np.unique(labels).tolist():
            if c in mapping:
                raise ValueError(
                    f"class {c} appears in stage {mapping[c]} and in stage {s}: stages must be disjoint"
                )
            mapping[c] = s
    return mapping


def check_stages(
    stage_labels: Sequence[np.ndarray],
    batch_size: int,
    m_per_class: int,
    min_images_per_class: int | None = None,
) -> dict[int, int]:
    """Everything that would make a stage untrainable, as one clear error before training starts.

    Returns class → stage.
    """
    if len(stage_labels) == 0:
        raise ValueError("no stages given")
    if m_per_class < 1 or batch_size % m_per_class != 0:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of m_per_class ({m_per_class})")
    min_images = m_per_class if min_images_per_class is None else min_images_per_class
    mapping = class_to_stage_of(stage_labels)
    for s, labels in enumerate(stage_labels):
        classes, counts = np.unique(labels, return_counts=True)
        if len(classes) < 2:
            raise ValueError(
                f"stage {s} has {len(classes)} class(es): metric learning needs at least 2 per stage"
            )
        if len(classes) * m_per_class < batch_size:
            raise ValueError(
                f"stage {s} has {len(classes)} classes: a batch of {batch_size} with {m_per_class} images "
                f"per class needs at least {batch_size // m_per_class}"
            )
        few = classes[counts < min_images]
        if len(few):
            raise ValueError(
                f"stage {s}: classes {few[:10].tolist()} have fewer than {min_images} training images (the "
                f"sampler draws {m_per_class} per class; lower min_images_per_class to accept repeats)"
            )
    return mapping


def stages_from_ends(classes: Sequence[int], ends: Sequence[int]) -> dict[int, int]:
    """class → stage where stage s holds the sorted ``classes[ends[s-1]:ends[s]]`` (the last stage takes the
    rest).

    ``ends`` are the paper's stage boundaries as class counts, e.g. CUB multi-task (100, 125, 150, 175):
    classes 1–100, 101–125, 126–150, 151–175, 176–200.
    """
    classes = sorted(int(c) for c in classes)
    ends = [int(e) for e in ends]
    if not ends or any(b <= a for a, b in zip([0] + ends, ends + [len(classes)])):
        raise ValueError(f"stage ends must increase strictly within (0, {len(classes)}), got {ends}")
    stage = np.searchsorted(np.asarray(ends), np.arange(len(classes)), side="right")
    return {c: int(s) for c, s in zip(classes, stage)}


def scale_stage_ends(ends: Sequence[int], paper_classes: int, n_classes: int) -> tuple[int, ...]:
    """The paper's stage ends for ``paper_classes`` classes moved proportionally to ``n_classes`` classes
    (a subset of the dataset, or the tiny data of a smoke run); unchanged when the counts agree."""
    if n_classes == paper_classes:
        return tuple(int(e) for e in ends)
    scaled = [int(round(e * n_classes / paper_classes)) for e in ends]
    for i in range(len(scaled)):  # keep ≥ 2 classes per stage where possible
        low = (scaled[i - 1] if i else 0) + 2
        scaled[i] = max(scaled[i], low)
    if scaled[-1] > n_classes - 2:
        raise ValueError(f"{n_classes} classes are too few for {len(ends) + 1} stages of at least 2 classes")
    return tuple(scaled)
