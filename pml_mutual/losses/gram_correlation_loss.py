from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.reducers import MeanReducer
from pytorch_metric_learning.utils import common_functions as c_f

from .gram import PairedGramLoss, check_choice, check_pair, rowwise_kl


class GramCorrelationLoss(PairedGramLoss):
    """Correlation distillation from a frozen teacher (paper Eq. 1, third term, and Eq. 5).

    ``loss_fn(student_emb, ref_emb=teacher_emb)`` returns
    ``T² / B · Σ_rows KL(σ_T(G_teacher) ‖ σ_T(G_student))``: each row's KL is one "element"
    loss, so the default ``MeanReducer`` gives PyTorch's ``batchmean``. The teacher is a
    constant target (detached). Labels are accepted and ignored.

    Args:
        temperature: T of the softmax (default 4, as FECD); the T² factor keeps gradient size
            comparable across T.
        direction: ``"forward"`` (the paper's KL(teacher ‖ student), default) or ``"reverse"``
            (KL(student ‖ teacher), what the FECD / authors' code computes).
        **kwargs: passed to PML's ``BaseMetricLossFunction`` (``distance``, ``reducer``, ...);
            the default distance is cosine similarity, i.e. a cosine Gram with its diagonal.
    """

    ref_name = "ref_emb (teacher embeddings)"

    def __init__(self, temperature: float = 4.0, direction: str = "forward", **kwargs):
        super().__init__(temperature=temperature, **kwargs)
        self.direction = check_choice("direction", direction, ("forward", "reverse"))

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        log_student = self.log_probs(embeddings)
        log_teacher = self.log_probs(ref_emb.detach())
        if self.direction == "forward":
            kl = rowwise_kl(log_teacher, log_student)
        else:
            kl = rowwise_kl(log_student, log_teacher)
        return {
            "loss": {
                "losses": kl * self.temperature**2,
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }

    def sum_over_teachers(self, embeddings: torch.Tensor, teachers) -> torch.Tensor:
        """Σ_t loss(embeddings, ref_emb=t): Eq. 6 over the real and the virtual teachers.

        ``teachers``: a sequence of (B, D) tensors or one (T, B, D) tensor. With the default cosine
        distance and ``MeanReducer`` (the usual case) the student's Gram and softmax are computed once
        and all teachers' Grams in one batched matmul; otherwise it is the plain sum of calls. Both
        give the same value.
        """
        if torch.is_tensor(teachers) and teachers.ndim == 3:
            stacked = teachers
            teachers = list(teachers.unbind(0))
        else:
            teachers = list(teachers)
            stacked = None
        if not teachers:
            raise ValueError("sum_over_teachers needs at least one teacher")
        fused = (
            type(self.reducer) is MeanReducer
            and type(self.distance) is CosineSimilarity
            and len({tuple(t.shape) for t in teachers}) == 1
        )
        if not fused:
            return sum(self(embeddings, ref_emb=t) for t in teachers)
        for t in teachers:
            check_pair(embeddings, t, self.ref_name)
        log_student = self.log_probs(embeddings.float())
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            stacked = torch.stack([t.detach().float() for t in teachers]) if stacked is None else stacked.detach().float()
            stacked = F.normalize(stacked, dim=2)
            log_teachers = F.log_softmax(stacked @ stacked.transpose(1, 2) / self.temperature, dim=2)
            log_student = log_student.expand_as(log_teachers)
            if self.direction == "forward":
                kl = F.kl_div(log_student, log_teachers, reduction="none", log_target=True).sum(2)
            else:
                kl = F.kl_div(log_teachers, log_student, reduction="none", log_target=True).sum(2)
        return kl.mean(1).sum() * self.temperature**2
