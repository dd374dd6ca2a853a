"""Fashion-MNIST from IDX files (Debian's ``dataset-fashion-mnist`` package, or any copy on disk).

    apt-get install dataset-fashion-mnist        # then: load_fashion_mnist()  (default directory below)

10 classes, 60,000 training and 10,000 test images of 28×28. The benchmark's protocol: one-task
old = classes 0–4, new = 5–9; multi-task 5 stages of 2 classes.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "PML_MUTUAL_FASHION_MNIST"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a NumPy array of its declared type and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = np.dtype(_DTYPES[data[2]]), data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes) but holds {len(data) - offset} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install Debian's package "
        f"(apt-get install dataset-fashion-mnist; `dpkg -L dataset-fashion-mnist` lists its files) or pass "
        f"root= / set {ENV_VAR} to a directory holding the four IDX files."
    )


def default_root() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return DEBIAN_DIR


def load_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> TensorDataset:
    """``split`` ∈ {"train", "test"} as a TensorDataset of float32 (1, 28, 28) images in [0, 1] and int64
    labels."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else default_root()
    images = read_idx(_find(root, FILES[split][0]))
    labels = read_idx(_find(root, FILES[split][1]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))
