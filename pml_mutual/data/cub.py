"""CUB-200-2011 in its original layout, split by the protocol of the paper (FECD's, not the official one).

    CUB_200_2011/images.txt               <image id> <relative path under images/>
    CUB_200_2011/image_class_labels.txt   <image id> <class id 1..200>
    CUB_200_2011/classes.txt              <class id> <class name>
    CUB_200_2011/train_test_split.txt     <image id> <1 = official train | 0>
    CUB_200_2011/images/<NNN.Class_Name>/<file>.jpg

Protocol: per class, floor(0.6·n_c) random images train and the rest test (7,048 / 4,740 images), classes
0–99 old, 100–199 new (one-task), or 0–99 then 100–124, 125–149, 150–174, 175–199 (multi-task).
FECD's list files (``<train|test>/<NNN.Class_Name>/<file>.jpg <label>``) can be given instead of the seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .images import ImageItems, check_split, read_list_file, read_text_utf8, require, split_items

NUM_CLASSES = 200
STAGE_ENDS = {"one-task": (100,), "multi-task": (100, 125, 150, 175)}
TRAIN_FRACTION = 0.6


def _read_table(path: Path, what: str, integer_values: bool = False) -> list[list[str]]:
    """``<id> <value>`` rows of one of CUB's tables; a bad line (not two fields, an id or a class that is not
    an integer, an id given twice) or a file that is not UTF-8 is named with its line."""
    text = read_text_utf8(require(path, what))
    rows, seen = [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        r = line.split(maxsplit=1)
        if len(r) != 2:
            raise ValueError(f"{path}:{n}: expected '<id> <value>', got {line.strip()!r}")
        if not r[0].isdigit():
            raise ValueError(f"{path}:{n}: the image id {r[0]!r} is not a non-negative integer")
        if integer_values and not r[1].strip().lstrip("-").isdigit():
            raise ValueError(f"{path}:{n}: {r[1].strip()!r} is not an integer")
        if r[0] in seen:
            raise ValueError(
                f"{path}:{n}: image id {r[0]} given twice (first on line {seen[r[0]]}): one image would be "
                f"dropped"
            )
        seen[r[0]] = n
        rows.append(r)
    return rows


def read_cub(root: str | os.PathLike, allow_outside_root: bool = False) -> tuple[ImageItems, np.ndarray]:
    """Every image of a CUB-200-2011 directory (labels = class id − 1) and the official is-train flags;
    image paths must stay under ``images/`` unless ``allow_outside_root``."""
    root = Path(root)
    require(root, "CUB-200-2011 directory (the one holding images.txt)")
    paths = dict(_read_table(root / "images.txt", "CUB images.txt"))
    labels = {
        i: int(c) - 1
        for i, c in _read_table(
            root / "image_class_labels.txt", "CUB image_class_labels.txt", integer_values=True
        )
    }
    official = {
        i: v.strip() == "1" for i, v in _read_table(root / "train_test_split.txt", "CUB train_test_split.txt")
    }
    missing = set(paths) - set(labels)
    if missing:
        raise ValueError(
            f"image ids {sorted(missing, key=int)[:5]} of images.txt have no class in image_class_labels.txt"
        )
    ids = sorted(paths, key=int)
    items = ImageItems(root / "images", [paths[i].strip() for i in ids], np.array([labels[i] for i in ids]))
    if items.labels.min() < 0:
        raise ValueError("CUB class ids are 1-based: found class id 0 in image_class_labels.txt")
    items.check_inside_root(root / "images.txt", allow_outside_root)
    return items, np.array([official.get(i, False) for i in ids])


def _resolve_list_items(items: ImageItems, root: Path) -> ImageItems:
    """Point FECD-style ``train/<class dir>/<file>`` paths at ``images/<class dir>/<file>`` when the list's
    own
    layout is not on disk, so FECD's list files work with an untouched CUB directory."""
    if all((items.root / p).is_file() for p in items.paths[:20]):
        return items
    images = root / "images"
    paths = ["/".join(Path(p).parts[-2:]) for p in items.paths]
    for p in paths[:20]:
        require(images / p, f"image of the list file (looked in {images})")
    return ImageItems(images, paths, items.labels, items.boxes)


def load_cub(
    root: str | os.PathLike,
    split: str = "protocol",
    seed: int = 0,
    train_fraction: float = TRAIN_FRACTION,
    train_list: str | os.PathLike | None = None,
    test_list: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> tuple[ImageItems, ImageItems]:
    """(train, test) items of CUB-200-2011.

    ``split="protocol"``: floor(``train_fraction``·n_c) random images per class with ``seed`` (the paper's
    7,048 / 4,740); ``"official"``: CUB's own train_test_split.txt; ``"lists"``: ``train_list`` and
    ``test_list`` in the ``<path> <label>`` format (e.g. FECD's data/train.txt and data/test.txt).
    Image paths must stay inside the dataset (or list file's) directory unless ``allow_outside_root``.
    """
    root = Path(root)
    if split == "lists" or train_list is not None or test_list is not None:
        if train_list is None or test_list is None:
            raise ValueError("a list-file split needs both train_list and test_list")
        train = _resolve_list_items(read_list_file(train_list, allow_outside_root=allow_outside_root), root)
        test = _resolve_list_items(read_list_file(test_list, allow_outside_root=allow_outside_root), root)
    else:
        items, official = read_cub(root, allow_outside_root)
        if split == "protocol":
            return split_items(items, train_fraction, seed)
        if split != "official":
            raise ValueError(f"split must be 'protocol', 'official' or 'lists', got {split!r}")
        train, test = items.subset(np.flatnonzero(official)), items.subset(np.flatnonzero(~official))
    check_split(train, test)
    return train, test
