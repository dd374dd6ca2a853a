"""Image datasets on disk: a list of (path, label[, box]) items, list files, and per-class splits.

The three datasets of the paper (CUB-200-2011, Cars196, DeepFashion2) are read from their original
formats into :class:`ImageItems` by :mod:`.cub`, :mod:`.cars196` and :mod:`.deepfashion2`; this module
holds what they share. Pillow is needed only to open images (``pip install pml-mutual[vision]``).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset


@dataclasses.dataclass
class ImageItems:
    """Image paths relative to ``root``, integer labels 0..C−1, optional (x1, y1, x2, y2) crop boxes."""

    root: Path
    paths: list[str]
    labels: np.ndarray
    boxes: np.ndarray | None = None  # (N, 4) pixel boxes, or None: whole images

    def __post_init__(self):
        self.root = Path(self.root)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        if self.boxes is not None:
            self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
            if len(self.boxes) != len(self.paths):
                raise ValueError(f"{len(self.paths)} paths but {len(self.boxes)} boxes")
            # known now, not when the image is decoded mid-run: an inverted or non-finite box, named
            bad = (
                ~np.isfinite(self.boxes).all(1)
                | (self.boxes[:, 2] <= self.boxes[:, 0])
                | (self.boxes[:, 3] <= self.boxes[:, 1])
            )
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"item {i + 1} ({self.paths[i]}) has the box {tuple(self.boxes[i].tolist())}: a box is "
                    f"(x1, y1, x2, y2) with x2 > x1 and y2 > y1 ({int(bad.sum())} such box(es))"
                )

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index) -> "ImageItems":
        index = np.asarray(index, dtype=np.int64)
        return ImageItems(
            self.root,
            [self.paths[i] for i in index],
            self.labels[index],
            None if self.boxes is None else self.boxes[index],
        )

    def classes(self) -> np.ndarray:
        return np.unique(self.labels)

    def check_inside_root(self, source: str | os.PathLike, allow_outside_root: bool = False) -> "ImageItems":
        """Refuse absolute paths and paths whose ``..`` leave ``root`` (read from ``source``), unless
        ``allow_outside_root``: an annotation file must not make the loader open files elsewhere."""
        if allow_outside_root:
            return self
        for i, p in enumerate(self.paths):
            parts = Path(os.path.normpath(p)).parts
            if os.path.isabs(p) or (parts and parts[0] == ".."):
                raise ValueError(
                    f"{source}: image path {p!r} (item {i + 1}) lies outside the dataset root {self.root}; "
                    "refused (pass allow_outside_root=True, or --allow-outside-root on the command line, "
                    "if that is intended)"
                )
        return self

    def check_files_exist(self, what: str = "the dataset") -> None:
        """One ``stat`` per listed image: a missing file is an error now, not hours into training."""
        self.file_sizes(what)

    def file_sizes(self, what: str = "the dataset") -> np.ndarray:
        """Each listed image file's size in bytes, in item order (one ``stat`` each); a missing file is
        a FileNotFoundError naming how many and which. Images replaced under the same paths (re-encoded,
        resized in place) almost always change size: a run directory compares them (see
        :meth:`~pml_mutual.run_dir.RunDirectory.check_identity`)."""
        sizes = np.zeros(len(self.paths), dtype=np.int64)
        missing = []
        for i, p in enumerate(self.paths):
            try:
                st = os.stat(self.root / p)
            except OSError:
                missing.append(p)
                continue
            if not stat.S_ISREG(st.st_mode):
                missing.append(p)
                continue
            sizes[i] = st.st_size
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(self.paths)} image files of {what} do not exist under "
                f"{self.root}, e.g. {', '.join(missing[:3])}"
            )
        return sizes


class ImageListDataset(Dataset):
    """``(transform(image), label)`` for each item of :class:`ImageItems`; boxes crop before the transform.

    ``labels`` is exposed so samplers and :func:`~pml_mutual.data.dataset_labels` never open an image.
    """

    def __init__(self, items: ImageItems, transform: Callable | None = None):
        self.items = items
        self.transform = transform
        self.labels = items.labels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        image = open_image(self.items.root / self.items.paths[i])
        if self.items.boxes is not None:
            image = crop_box(image, self.items.boxes[i])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])


def open_image(path: Path):
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is in the vision and test extras
        raise ImportError("reading images needs Pillow: pip install 'pml-mutual[vision]'") from e
    if not path.is_file():
        raise FileNotFoundError(f"image file missing: {path}")
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit (or 32-bit integer) grey levels: Pillow's convert("RGB") clips them at 255 (a
                # white image); scaled to 8 bits instead (65535 → 255)
                pixels = np.asarray(im, dtype=np.float64)
                scale = (
                    257.0
                    if im.mode.startswith("I;16") or pixels.max(initial=0) <= 65535
                    else pixels.max() / 255.0
                )
                return Image.fromarray(np.clip(np.round(pixels / scale), 0, 255).astype(np.uint8)).convert(
                    "RGB"
                )
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # truncated, corrupt or not an image: say which file
        raise OSError(f"cannot decode image {path}: {e}") from e


def crop_box(image, box: Sequence[float]):
    """Crop (x1, y1, x2, y2), clipped to the image; a box that is empty after clipping is an error."""
    return image.crop(box_pixels(*image.size, box))


def box_pixels(width: int, height: int, box: Sequence[float]) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of ``box`` rounded to pixels and clipped to a ``width`` × ``height`` image."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(
            f"bounding box {tuple(float(v) for v in box)} is empty inside an image of size {width}×{height}"
        )
    return x1, y1, x2, y2


def read_text_utf8(path: Path) -> str:
    """A text file as UTF-8, or a ValueError naming its first undecodable line."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); re-save the file as UTF-8"
        ) from None


def require(path: Path, what: str) -> Path:
    """``path`` if it exists, else a FileNotFoundError saying which file of which dataset was expected."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: expected {path}")
    return path


# ----------------------------------------------------------------------------- list files
def read_list_file(
    path: str | os.PathLike, root: str | os.PathLike | None = None, allow_outside_root: bool = False
) -> ImageItems:
    """Read a ``<relative path> <label>[ x1 y1 x2 y2]`` list file (one item per line, labels 0-based).

    This is the format of the FECD reference split files for CUB (``train/<class dir>/<file>.jpg 12``).
    Paths are relative to ``root`` (default: the list file's directory) and must stay inside it unless
    ``allow_outside_root``. Boxes are all-or-none.
    """
    path = require(Path(path), "list file")
    paths, labels, boxes = [], [], []
    for n, line in enumerate(read_text_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        tokens = line.split()
        # '<path> <label> x1 y1 x2 y2' when the last five tokens are numbers (paths end in a file name)
        n_tail = 5 if len(tokens) >= 6 and all(_is_number(t) for t in tokens[-5:]) else 1
        parts = line.rsplit(None, n_tail)
        if len(parts) < 2:
            raise ValueError(
                f"{path}:{n}: expected '<path> <label>' or '<path> <label> x1 y1 x2 y2', got {line!r}"
            )
        try:
            labels.append(int(parts[1]))
            if n_tail == 5:
                boxes.append([float(v) for v in parts[2:]])
        except ValueError:
            raise ValueError(f"{path}:{n}: the label must be an integer: {line!r}") from None
        paths.append(parts[0])
    if not paths:
        raise ValueError(f"{path} lists no images")
    if boxes and len(boxes) != len(paths):
        raise ValueError(f"{path}: either every line has a box or none does")
    if min(labels) < 0:
        raise ValueError(f"{path}: labels must be ≥ 0, got {min(labels)}")
    items = ImageItems(
        Path(root) if root is not None else path.parent,
        paths,
        np.array(labels),
        np.array(boxes) if boxes else None,
    )
    return items.check_inside_root(path, allow_outside_root)


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def write_list_file(items: ImageItems, path: str | os.PathLike) -> None:
    """Write ``items`` in the :func:`read_list_file` format (so a split can be saved and shared)."""
    lines = []
    for i, (p, c) in enumerate(zip(items.paths, items.labels.tolist())):
        if p != p.strip() or "\n" in p:
            raise ValueError(f"path {p!r} cannot be written to a list file")
        box = "" if items.boxes is None else " " + " ".join(f"{v:g}" for v in items.boxes[i])
        lines.append(f"{p} {c}{box}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- splits
def per_class_split(
    labels: np.ndarray, train_fraction: float = 0.6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): per class, floor(train_fraction · n_c) random images train, the rest test.

    The FECD protocol for CUB (7,048 / 4,740 images at 0.6). Classes with fewer than two images, or
    whose split would leave train or test empty, are an error: every class must be in both.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_train = int(np.floor(train_fraction * len(idx)))
        if n_train < 1 or n_train >= len(idx):
            raise ValueError(
                f"class {c} has {len(idx)} image(s): a {train_fraction:g} split leaves its train or test "
                "part empty"
            )
        idx = rng.permutation(idx)
        train.append(idx[:n_train])
        test.append(idx[n_train:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def split_items(
    items: ImageItems, train_fraction: float = 0.6, seed: int = 0
) -> tuple[ImageItems, ImageItems]:
    """(train, test) items under :func:`per_class_split`, checked by :func:`check_split`."""
    tr, te = per_class_split(items.labels, train_fraction, seed)
    train, test = items.subset(tr), items.subset(te)
    check_split(train, test)
    return train, test


def check_split(train: ImageItems, test: ImageItems) -> None:
    """Refuse a split where an image is in both parts or a class is missing from one of them."""
    overlap = set(
        zip(train.paths, map(tuple, train.boxes.tolist()) if train.boxes is not None else [None] * len(train))
    )
    overlap &= set(
        zip(test.paths, map(tuple, test.boxes.tolist()) if test.boxes is not None else [None] * len(test))
    )
    if overlap:
        raise ValueError(
            f"{len(overlap)} item(s) are in both train and test, e.g. {sorted(overlap, key=str)[0][0]}"
        )
    only_train = np.setdiff1d(train.classes(), test.classes())
    only_test = np.setdiff1d(test.classes(), train.classes())
    if len(only_train) or len(only_test):
        raise ValueError(
            f"classes must be in both parts: train-only {only_train[:10].tolist()}, test-only "
            f"{only_test[:10].tolist()}"
        )
