"""OBD-SD: Online Batch Diffusion-based Self-Distillation (Zeng et al., arXiv 2211.07566), as a PML loss."""

from __future__ import annotations

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils import common_functions as c_f

from .gram import PairedGramLoss, check_embeddings, check_pair, check_temperature, log_softmax_gram

# Released defaults of the OBD-SD code per dataset (SPEC.md): α, λ, τ_d; τ = 1, base loss MS(2, 40, 0.5).
OBDSD_DEFAULTS = {
    "cub200": dict(alpha=0.3, weight=1000.0, temperature=1.0, diffusion_temperature=1.0),
    "cars196": dict(alpha=0.99, weight=100.0, temperature=1.0, diffusion_temperature=1.0),
    "sop": dict(alpha=0.5, weight=100.0, temperature=1.0, diffusion_temperature=0.005),
}


def check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
    return float(alpha)


@torch.no_grad()
def batch_diffusion_target(
    teacher_emb: torch.Tensor, alpha: float, temperature: float = 1.0, diffusion_temperature: float = 1.0
) -> torch.Tensor:
    """The diffused target of OBD-SD, (B, B), rows summing to 1; a constant (no gradient).

    σ_τ(S_t) is the row softmax of the teacher's cosine Gram (diagonal kept) over τ. OBDP diffuses it
    through the batch's own affinity graph P = row softmax((S_t − large·I) / τ_d):
    target = W σ_τ(S_t) with W = (1 − α)(I − αP)⁻¹, obtained with ``torch.linalg.solve`` in float64
    (never an explicit inverse). W is row-stochastic; α = 0 gives W = I, i.e. plain PSD.
    """
    check_embeddings(teacher_emb, "teacher_emb")
    alpha = check_alpha(alpha)
    temperature = check_temperature(temperature)
    if not diffusion_temperature > 0:
        raise ValueError(f"diffusion_temperature must be positive, got {diffusion_temperature!r}")
    distance = CosineSimilarity()
    base = log_softmax_gram(teacher_emb, distance, temperature).exp().double()
    if alpha == 0.0:
        return base.float()
    with torch.autocast(device_type=teacher_emb.device.type, enabled=False):
        gram = distance(teacher_emb.float()).double()
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    # A large negative diagonal keeps each item out of its own neighbourhood (the released code's −1e9·I).
    P = torch.softmax((gram - 1e9 * eye) / diffusion_temperature, dim=1)
    target = torch.linalg.solve(eye - alpha * P, (1.0 - alpha) * base)
    return target.float()


class BatchDiffusionSelfDistillationLoss(PairedGramLoss):
    """``base_loss(embeddings, labels) + weight · τ² · KL(target ‖ σ_τ(S_student))`` (batchmean).

    ``loss_fn(embeddings, labels, ref_emb=teacher_emb)``: the teacher is the same network's
    previous-epoch snapshot run on the same batch (see ``SelfDistillationTrainer``). The target is
    ``batch_diffusion_target(teacher_emb, alpha, temperature, diffusion_temperature)``; ``alpha=0`` is
    plain progressive self-distillation (PSD). Sub-losses: ``base`` (already reduced by the base loss)
    and ``distill`` (per row). ``weight_scale`` multiplies ``weight``; the trainer ramps it with the epoch.

    Args:
        base_loss: any PML loss (default ``MultiSimilarityLoss(2, 40, 0.5)``).
        miner: mines the base loss's tuples when none are passed (default ``MultiSimilarityMiner(0.1)``;
            ``None`` passes no tuples).
        alpha, temperature, diffusion_temperature, weight: α ∈ [0, 1), τ, τ_d, λ.
    """

    ref_name = "ref_emb (teacher embeddings)"

    def __init__(
        self,
        base_loss: torch.nn.Module | None = None,
        alpha: float = 0.3,
        temperature: float = 1.0,
        diffusion_temperature: float = 1.0,
        weight: float = 1.0,
        miner: torch.nn.Module | None | str = "default",
        **kwargs,
    ):
        super().__init__(temperature=temperature, **kwargs)
        self.base_loss = base_loss if base_loss is not None else pml_losses.MultiSimilarityLoss(2, 40, 0.5)
        self.miner = pml_miners.MultiSimilarityMiner(0.1) if miner == "default" else miner
        self.alpha = check_alpha(alpha)
        if not diffusion_temperature > 0:
            raise ValueError(f"diffusion_temperature must be positive, got {diffusion_temperature!r}")
        self.diffusion_temperature = float(diffusion_temperature)
        self.weight = float(weight)
        self.weight_scale = 1.0
        self.add_to_recordable_attributes(list_of_names=["alpha", "weight", "weight_scale"], is_stat=False)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        check_pair(embeddings, ref_emb, self.ref_name)
        if indices_tuple is None and self.miner is not None and labels is not None:
            indices_tuple = self.miner(embeddings, labels)
        base = self.base_loss(embeddings, labels, indices_tuple)
        self._base_value = base
        return super(PairedGramLoss, self).forward(
            embeddings.float(), labels, indices_tuple, ref_emb.float(), ref_labels
        )

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        target = batch_diffusion_target(ref_emb, self.alpha, self.temperature, self.diffusion_temperature)
        log_student = self.log_probs(embeddings)
        # KL(target ‖ student) per row; xlogy keeps rows with exact zeros in the target finite.
        kl = (torch.special.xlogy(target, target) - target * log_student).sum(dim=1)
        scale = self.weight * self.weight_scale * self.temperature**2
        return {
            "base": {"losses": self._base_value, "indices": None, "reduction_type": "already_reduced"},
            "distill": {
                "losses": scale * kl,
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            },
        }

    def _sub_loss_names(self):
        return ["base", "distill"]
