"""scikit-learn's bundled 8×8 digits (1,797 real images, 10 classes): the embedded default, no download."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset


def load_digits_splits(
    train_fraction: float = 0.5, seed: int = 0, validation: bool = False
) -> tuple[TensorDataset, TensorDataset]:
    """Per class, a fixed random ``train_fraction`` of the images for training and the rest for testing.

    ``validation=True`` returns (train, validation) carved from the *training* part only (70 / 30 per
    class), for tuning hyper-parameters without touching the test images.
    Inputs are float32 (64,) scaled to [0, 1]; labels int64 0–9. Needs scikit-learn (extra ``demo``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data ships with scikit-learn: pip install 'pml-mutual[demo]'") from e
    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cut = int(np.floor(train_fraction * len(idx)))
        if validation:
            idx = idx[:cut]
            cut = int(np.floor(0.7 * len(idx)))
        train_idx.extend(idx[:cut].tolist())
        test_idx.extend(idx[cut:].tolist())
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    make = lambda idx: TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))  # noqa: E731
    return make(train_idx), make(test_idx)
