from .gram_correlation_loss import GramCorrelationLoss
from .mutual_gram_loss import MutualGramLoss

__all__ = ["GramCorrelationLoss", "MutualGramLoss"]
