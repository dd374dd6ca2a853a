from __future__ import annotations

import copy

import torch
from pytorch_metric_learning.trainers import MetricLossOnly
from pytorch_metric_learning.utils import common_functions as c_f

from .. import distributed


class SelfDistillationTrainer(MetricLossOnly):
    """OBD-SD / PSD training on PML's trainer: the teacher is the network's own previous-epoch snapshot.

    ``loss_funcs["metric_loss"]`` is a :class:`~pml_mutual.losses.BatchDiffusionSelfDistillationLoss`
    (any PML base loss inside). At the start of each epoch the current ``trunk`` + ``embedder`` are copied
    into a frozen teacher (eval mode, no gradient); each batch goes through both, and the distillation
    weight is ramped λ · epoch / ``num_epochs`` (set ``num_epochs``, the length of the whole run).
    In the first epoch the teacher is the starting network (e.g. the pretrained one).

    Under ``torchrun`` wrap ``trunk`` in ``DistributedDataParallel`` (the snapshot copies the bare network)
    and
    use a :class:`~pml_mutual.distributed.DistributedMPerClassSampler`; with ``gram_scope="global"`` the loss
    (base loss and diffused Gram target) is computed on the batch gathered from every rank.
    """

    def __init__(self, *args, num_epochs: int = 1, gram_scope: str = "global", **kwargs):
        if num_epochs < 1:
            raise ValueError(f"num_epochs must be at least 1, got {num_epochs}")
        self.gram_scope = distributed.check_gram_scope(gram_scope)
        self.num_epochs = num_epochs
        self.teacher = None
        self._teacher_epoch = None
        super().__init__(*args, **kwargs)

    def snapshot_teacher(self):
        bare = lambda m: getattr(m, "module", m)  # noqa: E731  (DistributedDataParallel → the network)
        teacher = torch.nn.Sequential(
            copy.deepcopy(bare(self.models["trunk"])), copy.deepcopy(bare(self.models["embedder"]))
        )
        teacher.eval()
        c_f.set_requires_grad(teacher, requires_grad=False)
        self.teacher = teacher
        self._teacher_epoch = self.epoch

    def set_to_train(self):
        super().set_to_train()
        if getattr(self, "epoch", None) is not None and self._teacher_epoch != self.epoch:
            self.snapshot_teacher()

    def update_loss_weights(self):
        self.loss_funcs["metric_loss"].weight_scale = min(1.0, self.epoch / self.num_epochs)

    def calculate_loss(self, curr_batch):
        data, labels = curr_batch
        embeddings = self.compute_embeddings(data)
        with torch.no_grad():
            teacher_emb = self.teacher(c_f.to_device(data, device=self.data_device, dtype=self.dtype))
        if self.gram_scope == "global" and distributed.world_size() > 1:
            embeddings = distributed.gather_with_grad(embeddings)
            teacher_emb = distributed.gather(teacher_emb)
            labels = distributed.gather(c_f.to_device(labels, device=self.data_device))
        indices_tuple = self.maybe_mine_embeddings(embeddings, labels)
        self.losses["metric_loss"] = self.loss_funcs["metric_loss"](
            embeddings, labels, indices_tuple, ref_emb=teacher_emb
        )
