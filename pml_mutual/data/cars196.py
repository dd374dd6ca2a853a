"""Cars196 (Stanford Cars) from ``cars_annos.mat`` or the devkit layout, split by the paper's protocol.

    <root>/cars_annos.mat        annotations: relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class,
    test
    <root>/car_ims/000001.jpg ...
or the devkit layout:
    <root>/devkit/cars_train_annos.mat, <root>/cars_test_annos_withlabels.mat (or under devkit/),
    <root>/devkit/cars_meta.mat, <root>/cars_train/*.jpg, <root>/cars_test/*.jpg

Protocol (paper Table 1: 9,638 train / 6,547 test over 196 classes): per class floor(0.6·n_c) random images
train, the rest test — the rule of the CUB split, which predicts the paper's counts within a few dozen images
(the authors' split files are unpublished). Classes 0–97 old, 98–195 new; multi-task 0–97, then 98–122,
123–147, 148–172, 173–195 (the paper's 1–98, 99–123, 124–148, 149–173, 174–196). Images are whole
pictures by default (``crop=False``, as in the DML literature); ``crop=True`` uses the boxes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .images import ImageItems, require, split_items

NUM_CLASSES = 196
STAGE_ENDS = {"one-task": (98,), "multi-task": (98, 123, 148, 173)}
TRAIN_FRACTION = 0.6
_BOX = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError as e:  # pragma: no cover - scipy is in the vision and test extras
        raise ImportError("reading Cars196 .mat files needs scipy: pip install 'pml-mutual[vision]'") from e
    try:
        return loadmat(require(path, "Cars196 annotation file"), squeeze_me=True, struct_as_record=True)
    except (
        ValueError,
        TypeError,
        OSError,
        EOFError,
        IndexError,
        KeyError,
    ) as e:  # scipy's messages name no file
        raise ValueError(
            f"{path} is not a readable .mat file ({type(e).__name__}: {e}); replace it with the "
            "dataset's own cars_annos.mat"
        ) from None


def _records(mat: dict, path: Path) -> np.ndarray:
    if "annotations" not in mat:
        raise ValueError(
            f"{path} has no 'annotations' struct (keys: {sorted(k for k in mat if not k.startswith('__'))})"
        )
    return np.atleast_1d(mat["annotations"])


def _field(record, name: str, path: Path):
    try:
        return record[name]
    except (KeyError, ValueError, IndexError):
        raise ValueError(f"{path}: annotations lack the field {name!r}") from None


def read_cars196(root: str | os.PathLike, crop: bool = False, allow_outside_root: bool = False) -> ImageItems:
    """Every image of a Cars196 directory (labels = class − 1), from cars_annos.mat or the devkit layout;
    image paths must stay inside ``root`` unless ``allow_outside_root``."""
    root = Path(root)
    require(root, "Cars196 directory")
    paths, labels, boxes, sources = [], [], [], []
    if (root / "cars_annos.mat").is_file():
        path = root / "cars_annos.mat"
        sources.append(path)
        for a in _records(_loadmat(path), path):
            paths.append(str(_field(a, "relative_im_path", path)))
            labels.append(int(_field(a, "class", path)) - 1)
            boxes.append([float(_field(a, k, path)) for k in _BOX])
    else:
        test_annos = next(
            (
                p
                for p in (
                    root / "cars_test_annos_withlabels.mat",
                    root / "devkit" / "cars_test_annos_withlabels.mat",
                )
                if p.is_file()
            ),
            None,
        )
        train_annos = root / "devkit" / "cars_train_annos.mat"
        if test_annos is None or not train_annos.is_file():
            raise FileNotFoundError(
                f"Cars196 annotations not found under {root}: expected cars_annos.mat, or the devkit layout "
                "(devkit/cars_train_annos.mat and cars_test_annos_withlabels.mat)"
            )
        for path, folder in ((train_annos, "cars_train"), (test_annos, "cars_test")):
            sources.append(path)
            for a in _records(_loadmat(path), path):
                paths.append(f"{folder}/{_field(a, 'fname', path)}")
                labels.append(int(_field(a, "class", path)) - 1)
                boxes.append([float(_field(a, k, path)) for k in _BOX])
    items = ImageItems(root, paths, np.array(labels), np.array(boxes) if crop else None)
    if items.labels.min() < 0:
        raise ValueError("Cars196 class ids are 1-based: found class 0")
    return items.check_inside_root(" / ".join(map(str, sources)), allow_outside_root)


def load_cars196(
    root: str | os.PathLike,
    seed: int = 0,
    train_fraction: float = TRAIN_FRACTION,
    crop: bool = False,
    allow_outside_root: bool = False,
) -> tuple[ImageItems, ImageItems]:
    """(train, test) items of Cars196 under the paper's per-class split (see the module docstring)."""
    items = read_cars196(root, crop=crop, allow_outside_root=allow_outside_root)
    return split_items(items, train_fraction, seed)
