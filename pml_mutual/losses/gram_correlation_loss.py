from __future__ import annotations

import torch
from pytorch_metric_learning.utils import common_functions as c_f

from .gram import PairedGramLoss, check_choice, rowwise_kl
from .gram_distillation import gram_distillation_losses


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
                "losses": (kl * self.temperature**2).float(),  # computed in float64, reduced as PML does
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }

    def fusable(self) -> bool:
        """Whether :func:`~pml_mutual.losses.gram_distillation.gram_distillation_losses` may compute this
        loss in its stacked form (a subclass that changes the loss is called instead)."""
        return type(self).compute_loss is GramCorrelationLoss.compute_loss and self.has_default_math()

    def sum_over_teachers(self, embeddings: torch.Tensor, teachers) -> torch.Tensor:
        """Σ_t loss(embeddings, ref_emb=t): Eq. 6 over the real and the virtual teachers.

        ``teachers``: (B, D) tensors, a (T, B, D) stack, or a sequence mixing both. When ``fusable()``
        all teachers are one batched computation (see :func:`~pml_mutual.losses.gram_distillation_losses`);
        otherwise it is the plain sum of calls. Both give the same value.
        """
        return gram_distillation_losses(embeddings, teachers=teachers, correlation_loss=self)[
            "correlation_loss"
        ]
