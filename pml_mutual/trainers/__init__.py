from .incremental_trainer import IncrementalTrainer

__all__ = ["IncrementalTrainer"]
