from .incremental_trainer import IncrementalTrainer
from .self_distillation_trainer import SelfDistillationTrainer

__all__ = ["IncrementalTrainer", "SelfDistillationTrainer"]
