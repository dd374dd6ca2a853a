"""How right are the virtual features? Eq. 4's estimate of an earlier model's features against that model's
real features of the same held-out images.

For an earlier stage b and the latest model F_i: ``cosine`` is the mean cosine between each image's virtual
feature f̂^b (estimated from F_i's feature alone) and its real F_b feature; ``recall@1`` is the Recall@1 of
the real F_b features as queries against the virtual features as gallery (each query's own item
excluded), i.e. whether the virtual features sit where F_b would put them *relative to F_b's own
features*. The same two numbers for the teacher feature itself (what ``drift_mode="none"`` distils from)
and for the real F_b features (the ceiling: cosine 1, F_b's own Recall@1) bracket every estimate.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .recall import cross_recall_at_k


def fidelity_rows(
    teacher: torch.Tensor,
    virtual: Mapping[str, torch.Tensor],
    real: Sequence[torch.Tensor],
    labels,
) -> list[dict]:
    """One row per earlier stage b (``real[b]`` = F_b's features of the held-out images, ``teacher`` =
    the latest model's, ``virtual[mode]`` = (stages − 1, N, D) virtual features of each drift mode):
    ``{"stage": b, "<mode>": {"cosine", "recall@1"}, ..., "teacher": {...}, "real": {...}}``."""
    labels = np.asarray(labels)
    rows = []
    for b, real_b in enumerate(real):
        target = F.normalize(real_b.float(), dim=1)

        def score(estimate: torch.Tensor) -> dict:
            estimate = F.normalize(estimate.float(), dim=1)
            return {"cosine": float((estimate * target).sum(1).mean()),
                    "recall@1": cross_recall_at_k(target, estimate, labels, (1,))[1]}

        row = {"stage": b, "teacher": score(teacher), "real": score(real_b)}
        for mode, stack in virtual.items():
            row[mode] = score(stack[b])
        rows.append(row)
    return rows


def gap_closed(row: dict, mode: str, metric: str = "cosine") -> float:
    """Fraction of the teacher → real gap that ``mode``'s virtual features close (1 = the ceiling)."""
    gap = row["real"][metric] - row["teacher"][metric]
    return float("nan") if abs(gap) < 1e-12 else (row[mode][metric] - row["teacher"][metric]) / gap
