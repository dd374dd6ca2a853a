"""A frozen teacher for any PML trainer: correlation distillation (paper Eq. 1, L_corr) added to its loss."""

from __future__ import annotations

import torch
from pytorch_metric_learning.trainers import MetricLossOnly, TrainWithClassifier

TEACHER_MODELS = ("teacher_trunk", "teacher_embedder")


class TeacherMixin:
    """Put before a PML trainer class: ``class MyTrainer(TeacherMixin, MetricLossOnly)``.

    ``models["teacher_trunk"]`` (and optionally ``"teacher_embedder"``) is the frozen teacher: kept in eval
    mode without gradients (it is added to ``freeze_these``). ``loss_funcs["correlation_loss"]`` (a
    :class:`~pml_mutual.GramCorrelationLoss`) is computed between the student's embeddings of the batch and
    the teacher's, and weighted by ``loss_weights["correlation_loss"]`` like any PML loss. The trainer's
    own losses are untouched: the student's embeddings are those its ``calculate_loss`` computed.
    """

    def custom_setup(self):
        super().custom_setup()
        if "teacher_trunk" not in self.models or "correlation_loss" not in self.loss_funcs:
            raise ValueError(
                f"{type(self).__name__} needs models['teacher_trunk'] and loss_funcs['correlation_loss']"
            )
        self.models.setdefault("teacher_embedder", torch.nn.Identity())
        self.freeze_these = tuple(set(self.freeze_these) | set(TEACHER_MODELS))
        self._student_batch = None

    def modify_schema(self):
        super().modify_schema()
        self.schema["models"].keys += list(TEACHER_MODELS)
        self.schema["loss_funcs"].keys += ["correlation_loss"]

    def get_trunk_output(self, data):
        if self._student_batch is not None and not self._student_batch:  # the first student pass of the step
            self._student_batch.append(data)
        return super().get_trunk_output(data)

    def get_final_embeddings(self, base_output):
        embeddings = super().get_final_embeddings(base_output)
        if self._student_batch is not None and len(self._student_batch) == 1:
            self._student_batch.append(embeddings)
        return embeddings

    def calculate_loss(self, curr_batch):
        self._student_batch = []
        try:
            super().calculate_loss(curr_batch)
            data, embeddings = self._student_batch
        finally:
            self._student_batch = None
        with torch.no_grad():
            teacher = self.models["teacher_embedder"](self.models["teacher_trunk"](data))
        self.losses["correlation_loss"] = self.loss_funcs["correlation_loss"](embeddings, ref_emb=teacher)


class MetricLossOnlyWithTeacher(TeacherMixin, MetricLossOnly):
    """PML's ``MetricLossOnly`` plus L_corr to a frozen teacher (see :class:`TeacherMixin`)."""


class TrainWithClassifierAndTeacher(TeacherMixin, TrainWithClassifier):
    """PML's ``TrainWithClassifier`` plus L_corr to a frozen teacher (see :class:`TeacherMixin`)."""
