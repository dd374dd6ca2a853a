from .batch_diffusion import OBDSD_DEFAULTS, BatchDiffusionSelfDistillationLoss, batch_diffusion_target
from .batch_hard_triplet_loss import BatchHardTripletLoss
from .gram_correlation_loss import GramCorrelationLoss
from .gram_distillation import gram_distillation_losses
from .multiple_losses_with_ref import MultipleLossesWithRef
from .mutual_gram_loss import MutualGramLoss
from .projected_distillation_loss import ProjectedDistillationLoss

__all__ = [
    "BatchHardTripletLoss",
    "GramCorrelationLoss",
    "MutualGramLoss",
    "MultipleLossesWithRef",
    "ProjectedDistillationLoss",
    "gram_distillation_losses",
    "BatchDiffusionSelfDistillationLoss",
    "batch_diffusion_target",
    "OBDSD_DEFAULTS",
]
