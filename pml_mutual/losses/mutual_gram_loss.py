from __future__ import annotations

from pytorch_metric_learning.utils import common_functions as c_f

from .gram import PairedGramLoss, check_choice, rowwise_kl


class MutualGramLoss(PairedGramLoss):
    """Mutual distillation between two students (paper Eq. 2).

    ``loss_fn(emb_p, ref_emb=emb_s)`` returns ``½ (KL(σ_T(G_p) ‖ σ_T(G_s)) + KL(σ_T(G_s) ‖ σ_T(G_p)))``
    (× T², batchmean). The two directions are separate sub-losses, ``kl_p_s`` = ½T²·KL(σ(G_p) ‖ σ(G_s))
    and ``kl_s_p``, so PML's record-keeper and reducers see each.

    Args:
        temperature: T of the softmax.
        mode: ``"symmetric"`` (default, the authors' code): nothing is detached and both students
            get gradients from both terms. ``"dml"`` (Deep Mutual Learning, Zhang et al. 2018): the
            target (first argument) of each KL is detached, so each student learns only toward its
            peer and never pulls the peer toward itself.
        **kwargs: passed to PML's ``BaseMetricLossFunction``.
    """

    ref_name = "ref_emb (peer embeddings)"

    def __init__(self, temperature: float = 4.0, mode: str = "symmetric", **kwargs):
        super().__init__(temperature=temperature, **kwargs)
        self.mode = check_choice("mode", mode, ("symmetric", "dml"))

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        log_p, log_s = self.log_probs(embeddings), self.log_probs(ref_emb)
        target_p, target_s = (log_p, log_s) if self.mode == "symmetric" else (log_p.detach(), log_s.detach())
        scale = 0.5 * self.temperature**2
        indices = c_f.torch_arange_from_size(embeddings)
        return {
            "kl_p_s": {
                "losses": (scale * rowwise_kl(target_p, log_s)).float(),
                "indices": indices,
                "reduction_type": "element",
            },
            "kl_s_p": {
                "losses": (scale * rowwise_kl(target_s, log_p)).float(),
                "indices": indices,
                "reduction_type": "element",
            },
        }

    def fusable(self) -> bool:
        """Whether :func:`~pml_mutual.losses.gram_distillation.gram_distillation_losses` may compute this
        loss in its stacked form: symmetric mode, default math, not changed by a subclass."""
        return (
            type(self).compute_loss is MutualGramLoss.compute_loss
            and self.mode == "symmetric"
            and self.has_default_math()
        )

    def _sub_loss_names(self):
        return ["kl_p_s", "kl_s_p"]
