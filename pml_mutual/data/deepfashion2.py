"""DeepFashion2 clothing identities from the per-image JSON annotations, cropped by bounding box.

    <root>/annos/000001.json   {"source": "user"|"shop", "pair_id": 1,
                                "item1": {"style": 1, "category_id": 7, "bounding_box": [x1, y1, x2, y2],
                                ...}, ...}
    <root>/image/000001.jpg
(``root`` may also hold several such splits, e.g. ``train/`` and ``validation/``: all are read.)

An identity is one (pair_id, style) with style > 0 (style 0 marks items without a matched counterpart);
each of its items is one cropped image. Labels follow sorted (pair_id, style). Identities with fewer than two
items cannot be in both train and test and are dropped. The paper's counts (Table 1): 21,190 identities,
110,430 train / 87,710 test crops; per identity floor(0.6·n) train, which predicts 110,408 from these totals.
Stages: identities 1–10,595 old; multi-task 10,596–13,256, 13,257–15,890, 15,891–18,558, 18,559–21,190.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .images import ImageItems, require, split_items

NUM_CLASSES = 21190
STAGE_ENDS = {"one-task": (10595,), "multi-task": (10595, 13256, 15890, 18558)}
TRAIN_FRACTION = 0.6


def _split_dirs(root: Path) -> list[Path]:
    if (root / "annos").is_dir():
        return [root]
    dirs = sorted(d for d in root.iterdir() if (d / "annos").is_dir()) if root.is_dir() else []
    if not dirs:
        raise FileNotFoundError(
            f"DeepFashion2 annotations not found: expected {root}/annos/*.json and {root}/image/*.jpg "
            "(or sub-directories such as train/ and validation/ laid out that way)"
        )
    return dirs


def read_deepfashion2(root: str | os.PathLike, min_items: int = 2) -> ImageItems:
    """Every (pair_id, style > 0) item crop under ``root``, labelled 0..C−1 by sorted identity."""
    root = Path(root)
    require(root, "DeepFashion2 directory")
    paths, keys, boxes = [], [], []
    for split in _split_dirs(root):
        for anno in sorted((split / "annos").glob("*.json")):
            try:
                doc = json.loads(anno.read_text(encoding="utf-8"))
                pair_id = int(doc["pair_id"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{anno}: not a DeepFashion2 annotation ({e!r})") from None
            image = (split / "image" / anno.stem).with_suffix(".jpg").relative_to(root).as_posix()
            for name, item in doc.items():
                if not (name.startswith("item") and isinstance(item, dict)):
                    continue
                try:
                    style = int(item.get("style", 0))
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{anno}: {name}'s style {item.get('style')!r} is not an integer"
                    ) from None
                if style <= 0:
                    continue
                box = item.get("bounding_box")
                if not isinstance(box, list) or len(box) != 4:
                    raise ValueError(f"{anno}: {name} has no [x1, y1, x2, y2] bounding_box")
                try:
                    box = [float(v) for v in box]
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{anno}: {name}'s bounding_box {item['bounding_box']!r} holds a value that is not a "
                        f"number"
                    ) from None
                paths.append(image)
                keys.append((pair_id, style))
                boxes.append(box)
    if not paths:
        raise ValueError(f"no items with style > 0 under {root}")
    identities, inverse, counts = np.unique(np.array(keys), axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    keep_ids = np.flatnonzero(counts >= min_items)
    relabel = np.full(len(identities), -1)
    relabel[keep_ids] = np.arange(len(keep_ids))
    keep = relabel[inverse] >= 0
    items = ImageItems(
        root, [p for p, k in zip(paths, keep) if k], relabel[inverse][keep], np.array(boxes)[keep]
    )
    items.identities = identities[keep_ids]  # (pair_id, style) of each label
    return items


def load_deepfashion2(
    root: str | os.PathLike, seed: int = 0, train_fraction: float = TRAIN_FRACTION
) -> tuple[ImageItems, ImageItems]:
    """(train, test) crops of DeepFashion2 identities under the paper's per-identity split."""
    items = read_deepfashion2(root)
    return split_items(items, train_fraction, seed)
