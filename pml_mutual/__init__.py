"""pml-mutual: online deep metric learning via mutual distillation, on pytorch-metric-learning."""

from .drift import DriftCompensator
from .losses import GramCorrelationLoss, MutualGramLoss
from .online import METHODS, OnlineConfig, OnlineLearner
from .trainers import IncrementalTrainer

__version__ = "0.1.0"
__all__ = [
    "GramCorrelationLoss",
    "MutualGramLoss",
    "DriftCompensator",
    "IncrementalTrainer",
    "OnlineLearner",
    "OnlineConfig",
    "METHODS",
]
