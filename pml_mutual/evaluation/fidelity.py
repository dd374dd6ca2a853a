"""How right are the virtual features? Eq. 4's estimate of an earlier model's features against that model's
real features of the same held-out images.

For an earlier stage b and the latest model F_i: ``cosine`` is the mean cosine between each image's virtual
feature f̂^b (estimated from F_i's feature alone) and its real F_b feature; ``recall@1`` is the Recall@1 of
the real F_b features as queries against the virtual features as gallery (each query's own item
excluded), i.e. whether the virtual features sit where F_b would put them *relative to F_b's own
features*. The same two numbers for the teacher feature itself (what ``drift_mode="none"`` distils from)
and for the real F_b features (the ceiling: cosine 1, F_b's own Recall@1) bracket every estimate.

``gram_kl`` is what an estimate changes in Eq. 6: the mean over fixed batches of the held-out images of
KL(σ_T(G_estimate) ‖ σ_T(G_teacher)) · T² (``GramCorrelationLoss``), the distance between the Gram target
the estimate gives and the teacher's own. For the real F_b it is what a perfect estimate would add; for
the teacher itself it is 0.
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
    temperature: float = 4.0,
    batch_size: int = 80,
) -> list[dict]:
    """One row per earlier stage b (``real[b]`` = F_b's features of the held-out images, ``teacher`` =
    the latest model's, ``virtual[mode]`` = (stages − 1, N, D) virtual features of each drift mode):
    ``{"stage": b, "<mode>": {"cosine", "recall@1", "gram_kl"}, ..., "teacher": {...}, "real": {...}}``;
    ``gram_kl`` over batches of ``batch_size`` held-out images (a fixed permutation) at ``temperature``."""
    from ..losses import GramCorrelationLoss

    labels = np.asarray(labels)
    corr = GramCorrelationLoss(temperature=temperature)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)] or [
        order
    ]
    teacher = teacher.float()

    def gram_kl(estimate: torch.Tensor) -> float:
        return float(np.mean([corr(teacher[b], ref_emb=estimate[b]).item() for b in batches]))

    rows = []
    for b, real_b in enumerate(real):
        target = F.normalize(real_b.float(), dim=1)

        def score(estimate: torch.Tensor) -> dict:
            estimate = F.normalize(estimate.float(), dim=1)
            return {
                "cosine": float((estimate * target).sum(1).mean()),
                "recall@1": cross_recall_at_k(target, estimate, labels, (1,))[1],
                "gram_kl": gram_kl(estimate),
            }

        row = {"stage": b, "teacher": score(teacher), "real": score(real_b)}
        for mode, stack in virtual.items():
            row[mode] = score(stack[b])
        rows.append(row)
    return rows


def gap_closed(row: dict, mode: str, metric: str = "cosine") -> float:
    """Fraction of the teacher → real gap that ``mode``'s virtual features close (1 = the ceiling)."""
    gap = row["real"][metric] - row["teacher"][metric]
    return float("nan") if abs(gap) < 1e-12 else (row[mode][metric] - row["teacher"][metric]) / gap
