from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import BaseMetricLossFunction

from ..reducers import DeviceAvgNonZeroReducer


class BatchHardTripletLoss(BaseMetricLossFunction):
    """Batch-hard triplet loss (Hermans et al. 2017) as one dense computation on the device.

    The value and gradients of PML's ``TripletMarginLoss(margin)`` on the triplets of
    ``BatchHardMiner()`` with its default ``AvgNonZeroReducer``: each anchor with a positive and a
    negative in the batch contributes relu(d(a, hardest positive) − d(a, hardest negative) + margin),
    and the mean is over the anchors whose loss is above zero. PML's pair is written for any batch
    and selects triplets with ``torch.where`` and boolean indexing; on a GPU each of those reads a
    size back to the host, 7 synchronisations per network per training step. Here the hardest pair
    of every row comes from a masked max/min over the batch's distance matrix and anchors without a
    positive or a negative get a zero loss (which the non-zero average ignores): no host read.

    Args:
        margin: of the triplet loss (PML's default 0.05).
        **kwargs: passed to PML's ``BaseMetricLossFunction`` (``distance``: default ``LpDistance``,
            L2 on normalised embeddings, as PML's; ``reducer``: default :class:`DeviceAvgNonZeroReducer`).

    Mines its own triplets: an ``indices_tuple`` is refused.
    """

    def __init__(self, margin: float = 0.05, **kwargs):
        super().__init__(**kwargs)
        self.margin = margin
        self.add_to_recordable_attributes(list_of_names=["margin"], is_stat=False)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if indices_tuple is not None:
            raise ValueError("BatchHardTripletLoss mines its own batch-hard triplets: use it without a miner")
        if labels is None:
            raise ValueError("BatchHardTripletLoss needs labels")
        mat = self.distance(embeddings, ref_emb)
        same = labels[:, None] == ref_labels[None, :]
        positive = same.clone()
        if ref_emb is embeddings:  # an anchor is not its own positive (as PML's get_all_pairs_indices)
            positive.fill_diagonal_(False)
        # the hardest positive is the farthest, the hardest negative the closest (for a similarity,
        # the reverse); masked entries get the value that can never be chosen
        far, near = (torch.min, torch.max) if self.distance.is_inverted else (torch.max, torch.min)
        fill = torch.finfo(mat.dtype).max
        far_fill, near_fill = (fill, -fill) if self.distance.is_inverted else (-fill, fill)
        hardest_positive = far(mat.masked_fill(~positive, far_fill), dim=1).values
        hardest_negative = near(mat.masked_fill(same, near_fill), dim=1).values
        has_both = positive.any(dim=1) & ~same.all(dim=1)
        violation = self.distance.margin(hardest_positive, hardest_negative) + self.margin
        losses = torch.where(has_both, F.relu(violation), torch.zeros((), dtype=mat.dtype, device=mat.device))
        return {
            "loss": {
                "losses": losses,
                "indices": torch.arange(len(losses), device=losses.device),
                "reduction_type": "element",
            }
        }

    def get_default_reducer(self):
        return DeviceAvgNonZeroReducer()
