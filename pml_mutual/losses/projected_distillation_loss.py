"""A compatibility term for model updates: distillation through a learnable linear map (beyond the paper).

Backward feature projection (BFP, Gomez-Villa et al., CVPR 2023): the new model's features, mapped by a
learnable linear P, should equal the old model's, ‖P·F_p(x) − F_{i−1}(x)‖². The new space may change, but
only so that it stays a linear image of the old one — which is what a stored gallery's update by a linear
map (:meth:`~pml_mutual.drift.DriftCompensator.update_gallery`, ``method="learned"``) needs to hold for
the old classes too, though it is fitted on the new stage's images alone.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import MeanReducer
from pytorch_metric_learning.utils import common_functions as c_f

from .gram import check_pair


class ProjectedDistillationLoss(BaseMetricLossFunction):
    """``loss_fn(student_emb, ref_emb=teacher_emb)`` = mean over the batch of ‖P·s + b − t‖² (per-row
    "element" losses, ``MeanReducer`` by default), in float32 whatever the autocast. P (``projection``, a
    ``torch.nn.Linear`` of ``embedding_size``) starts as the identity, so at the start of a stage, where F_p
    equals its teacher, the term is zero; P trains with the student (it needs an optimizer, as any PML loss
    with parameters). The teacher is a constant target. Labels are accepted and ignored.

    Args:
        embedding_size: D of the student's and the teacher's embeddings.
        **kwargs: passed to PML's ``BaseMetricLossFunction`` (``reducer``, ``embedding_regularizer``, ...).
    """

    def __init__(self, embedding_size: int, **kwargs):
        super().__init__(**kwargs)
        if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}")
        self.projection = torch.nn.Linear(embedding_size, embedding_size)
        with torch.no_grad():
            self.projection.weight.copy_(torch.eye(embedding_size))
            self.projection.bias.zero_()

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if indices_tuple is not None or ref_labels is not None:
            raise ValueError(
                "ProjectedDistillationLoss compares each row with the teacher's row of the same item: a "
                "miner's indices_tuple or ref_labels have no meaning for it"
            )
        check_pair(embeddings, ref_emb, "ref_emb (teacher embeddings)")
        if (
            embeddings.shape[1] != self.projection.in_features
            or ref_emb.shape[1] != self.projection.out_features
        ):
            raise ValueError(
                f"ProjectedDistillationLoss(embedding_size={self.projection.in_features}) got embeddings of "
                f"{embeddings.shape[1]} and ref_emb of {ref_emb.shape[1]} columns"
            )
        return super().forward(embeddings, labels, None, ref_emb, None)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            projected = self.projection(embeddings.float())
            diff = projected - ref_emb.detach().float()
        return {
            "loss": {
                "losses": diff.pow(2).sum(dim=1),
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }

    def get_default_reducer(self):
        return MeanReducer()
