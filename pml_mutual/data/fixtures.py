"""Tiny datasets written in the real on-disk formats of CUB-200-2011, Cars196 and DeepFashion2.

Used by the tests (the loaders must read them back exactly) and by the benchmark scripts' ``--smoke``
runs. Each class gets its own colour and a bright square at its own place plus per-image noise and
jitter, so a network can learn them in a few steps. Needs Pillow (JPEGs) and, for Cars196, scipy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np


def class_image(label: int, rng: np.random.Generator, size: tuple[int, int] = (48, 40)):
    """A (width, height) RGB Pillow image whose colour and square position depend on ``label``."""
    from PIL import Image

    w, h = size
    colour = np.array(
        [(label * 53) % 256, (label * 101 + 40) % 256, (label * 197 + 90) % 256], dtype=np.float32
    )
    pixels = colour + rng.normal(0, 18, (h, w, 3))
    side = max(4, min(w, h) // 3)
    x = (label * 7) % max(1, w - side) + int(rng.integers(0, 3))
    y = (label * 11) % max(1, h - side) + int(rng.integers(0, 3))
    pixels[y : y + side, x : x + side] = 255 - colour
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)


def write_cub_fixture(
    root: str | os.PathLike,
    counts: Sequence[int],
    seed: int = 0,
    official_train_every: int = 2,
    size: tuple[int, int] = (48, 40),
    workers: int = 1,
) -> Path:
    """CUB-200-2011 layout with ``len(counts)`` classes holding ``counts[c]`` images each of ``size``
    (width, height; CUB's own are about 500 × 375); returns the directory.

    Every ``official_train_every``-th image of a class is in the official train split. ``workers`` > 1
    writes classes in forked processes (call it before CUDA starts), each class drawn from its own generator
    (seeded from
    ``seed`` and the class): other images than ``workers=1`` draws, equally deterministic."""
    root = Path(root)
    images, labels, split, classes, jobs = [], [], [], [], []
    image_id = 0
    for c, n in enumerate(counts):
        folder = f"{c + 1:03d}.Class_{c + 1}"
        classes.append(f"{c + 1} {folder}")
        files = []
        for j in range(n):
            image_id += 1
            rel = f"{folder}/Class_{c + 1}_{j:04d}_{image_id}.jpg"
            files.append(root / "images" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {int(j % official_train_every == 0)}")
        jobs.append((c, files))
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.starmap(_write_class, [(c, files, size, (seed, c)) for c, files in jobs])
    else:
        rng = np.random.default_rng(seed)  # one stream through every class, as this writer always drew
        for c, files in jobs:
            _write_class(c, files, size, rng)
    for name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("classes.txt", classes),
    ):
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def _write_class(label: int, files: Sequence[Path], size: tuple[int, int], seed) -> None:
    rng = np.random.default_rng(seed)  # a Generator passes through unchanged
    for path in files:
        _save(class_image(label, rng, size), path)


def _mat_struct(records: list[dict]) -> np.ndarray:
    fields = list(records[0])
    out = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, r in enumerate(records):
        for f in fields:
            out[0, i][f] = np.array([[r[f]]]) if not isinstance(r[f], str) else np.array([r[f]])
    return out


def write_cars196_fixture(
    root: str | os.PathLike, counts: Sequence[int], layout: str = "annos", seed: int = 0
) -> Path:
    """Cars196 with ``counts[c]`` images of class c+1, as ``cars_annos.mat`` (``layout="annos"``) or the
    devkit
    layout (``"devkit"``: devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, devkit/cars_meta.mat).
    Each image holds the car in a box (x1, y1, x2, y2) written to the annotations."""
    from scipy.io import savemat

    if layout not in ("annos", "devkit"):
        raise ValueError(f"layout must be 'annos' or 'devkit', got {layout!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    records = {"train": [], "test": [], "all": []}
    n = 0
    for c, count in enumerate(counts):
        for j in range(count):
            n += 1
            image = class_image(c, rng, size=(56, 44))
            box = (4.0, 3.0, 52.0, 41.0)
            part = "train" if j % 2 == 0 else "test"
            if layout == "annos":
                rel = f"car_ims/{n:06d}.jpg"
                records["all"].append(
                    dict(
                        relative_im_path=rel,
                        bbox_x1=box[0],
                        bbox_y1=box[1],
                        bbox_x2=box[2],
                        bbox_y2=box[3],
                        **{"class": c + 1},
                        test=int(part == "test"),
                    )
                )
            else:
                rel = f"cars_{part}/{len(records[part]) + 1:05d}.jpg"
                records[part].append(
                    dict(
                        bbox_x1=box[0],
                        bbox_y1=box[1],
                        bbox_x2=box[2],
                        bbox_y2=box[3],
                        **{"class": c + 1},
                        fname=Path(rel).name,
                    )
                )
            _save(image, root / rel)
    names = np.array([f"Car {c + 1}" for c in range(len(counts))], dtype=object)
    if layout == "annos":
        savemat(
            root / "cars_annos.mat", {"annotations": _mat_struct(records["all"]), "class_names": names[None]}
        )
    else:
        (root / "devkit").mkdir(parents=True, exist_ok=True)
        savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _mat_struct(records["train"])})
        savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _mat_struct(records["test"])})
        savemat(root / "devkit" / "cars_meta.mat", {"class_names": names[None]})
    return root


def write_deepfashion2_fixture(
    root: str | os.PathLike,
    n_pairs: int,
    images_per_pair: int = 4,
    seed: int = 0,
    splits: Sequence[str] = ("train",),
) -> Path:
    """DeepFashion2 layout (``<split>/annos/*.json``, ``<split>/image/*.jpg``) with ``n_pairs`` pair ids.

    Every image of pair p holds two items: style 1 (identity (p, 1)) on the left and style 2 on the right
    (identity (p, 2)), plus an unmatched style-0 item that loaders must ignore. Images are spread over
    ``splits`` round-robin, so identities span split directories as in the real data."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    n = 0
    for p in range(1, n_pairs + 1):
        for j in range(images_per_pair):
            n += 1
            split = root / splits[n % len(splits)]
            left, right = class_image(2 * p, rng, (40, 40)), class_image(2 * p + 1, rng, (40, 40))
            canvas = Image.new("RGB", (96, 48), (128, 128, 128))
            canvas.paste(left, (4, 4))
            canvas.paste(right, (52, 4))
            _save(canvas, split / "image" / f"{n:06d}.jpg")
            doc = {
                "source": "user" if j % 2 else "shop",
                "pair_id": p,
                "item1": {"style": 1, "category_id": 1, "bounding_box": [4, 4, 44, 44]},
                "item2": {"style": 2, "category_id": 8, "bounding_box": [52, 4, 92, 44]},
                "item3": {"style": 0, "category_id": 3, "bounding_box": [0, 0, 10, 10]},
            }
            (split / "annos").mkdir(parents=True, exist_ok=True)
            (split / "annos" / f"{n:06d}.json").write_text(json.dumps(doc))
    return root
