"""The stage loop's steps, in order: train, measure drift, evaluate, checkpoint.

Each step is a small object with ``name`` and ``run(learner, ctx)``: it reads the run's fixed parts from the
:class:`~pml_mutual.OnlineLearner` (config, datasets, run directory, drift state) and hands what the stage
produces over in the :class:`~pml_mutual.callbacks.StageContext` (student, teacher, epoch losses, results).
The learner runs ``learner.steps`` in order for every stage and fires the callbacks between them; a
subclass may replace a step (``steps = [MyTrainStep(), DriftStep(), EvalStep(), CheckpointStep()]``).
"""

from .checkpoint import CheckpointStep
from .drift import DriftStep
from .evaluate import EvalStep
from .train import TrainStep

STEPS = (TrainStep, DriftStep, EvalStep, CheckpointStep)

__all__ = ["TrainStep", "DriftStep", "EvalStep", "CheckpointStep", "STEPS"]
