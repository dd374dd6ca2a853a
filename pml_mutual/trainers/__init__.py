from .incremental_trainer import IncrementalTrainer
from .self_distillation_trainer import SelfDistillationTrainer
from .teacher_mixin import MetricLossOnlyWithTeacher, TeacherMixin, TrainWithClassifierAndTeacher

__all__ = [
    "IncrementalTrainer",
    "SelfDistillationTrainer",
    "TeacherMixin",
    "MetricLossOnlyWithTeacher",
    "TrainWithClassifierAndTeacher",
]
