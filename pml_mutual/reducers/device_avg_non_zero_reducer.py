from __future__ import annotations

import torch
from pytorch_metric_learning.reducers import BaseReducer


class DeviceAvgNonZeroReducer(BaseReducer):
    """PML's ``AvgNonZeroReducer`` (the mean of the losses above zero, zero if there are none) without a
    host synchronisation: PML's selects the positive losses by boolean indexing and branches in Python
    on how many there are, which reads a count back from the GPU on every call. Here the sum of the
    positive losses is divided by their count clamped to one, on the device. Same value; element,
    pair and triplet losses alike.

    One deliberate difference: a NaN loss counts (PML's ``losses > 0`` drops it), so a batch that went
    non-finite gives a NaN mean that the trainer's finiteness check stops, instead of a finite loss
    whose backward writes NaN into the weights.
    """

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        positive = ~(losses <= 0)  # NaN included
        total = torch.where(positive, losses, torch.zeros((), dtype=losses.dtype, device=losses.device)).sum()
        return total / positive.sum().clamp_min(1).to(losses.dtype)

    def pos_pair_reduction(self, losses, *args):
        return self.element_reduction(losses, *args)

    def neg_pair_reduction(self, losses, *args):
        return self.element_reduction(losses, *args)

    def triplet_reduction(self, losses, *args):
        return self.element_reduction(losses, *args)
