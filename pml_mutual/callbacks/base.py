"""The callback interface of :class:`~pml_mutual.OnlineLearner` and the context it hands over."""

from __future__ import annotations

import dataclasses
from typing import Any

EVENTS = (
    "before_stage",
    "before_train",
    "after_epoch",
    "after_train",
    "after_drift",
    "after_eval",
    "after_stage",
    "after_run",
)


@dataclasses.dataclass
class StageContext:
    """What the stage's steps hand each other and a callback may read at an event. Fields not yet known
    at that event are ``None``.

    ``student``: F_i once the train step has built it (trained from ``after_train`` on); ``teacher``: F_{i−1}
    as training held it, until the drift step releases it.

    ``global_step``: training iterations of the whole run up to this point (one step count across
    stages, so a logger's curves continue from stage to stage; equal after a resume).
    ``epoch_losses``: the last epoch's mean of each loss term (``total_loss`` included).
    ``learning_rates``: the last epoch's final learning rate of each optimizer's first parameter group.
    ``results``: the stage's Recall@K (:func:`~pml_mutual.evaluation.stage_recalls`, integer K keys).
    ``summary``: the run's results document (``after_run`` only).
    """

    learner: Any
    stage: int
    num_stages: int
    method: str
    global_step: int = 0
    trainer: Any = None
    student: Any = None
    teacher: Any = None
    epoch: int | None = None
    epochs: int | None = None
    epoch_losses: dict | None = None
    learning_rates: dict | None = None
    results: dict | None = None
    seconds: dict = dataclasses.field(default_factory=dict)
    summary: dict | None = None


class Callback:
    """Base class: override the events you need; each receives the :class:`StageContext`."""

    def before_stage(self, ctx: StageContext) -> None: ...

    def before_train(self, ctx: StageContext) -> None:
        """``ctx.trainer`` is the stage's :class:`~pml_mutual.IncrementalTrainer`, built, not yet trained."""

    def after_epoch(self, ctx: StageContext) -> None: ...

    def after_train(self, ctx: StageContext) -> None: ...

    def after_drift(self, ctx: StageContext) -> None: ...

    def after_eval(self, ctx: StageContext) -> None: ...

    def after_stage(self, ctx: StageContext) -> None:
        """The stage's checkpoint is written: ``ctx.results`` and ``ctx.seconds`` are final."""

    def after_run(self, ctx: StageContext) -> None:
        """``ctx.summary`` is the results document ``run()`` returns."""


def fire(callbacks, event: str, ctx: StageContext) -> None:
    for callback in callbacks:
        getattr(callback, event)(ctx)


def check_callbacks(callbacks) -> list:
    """The callbacks as a list, each with every event of :class:`Callback` (a TypeError names one without)."""
    callbacks = list(callbacks)
    for c in callbacks:
        if not all(callable(getattr(c, e, None)) for e in EVENTS):
            raise TypeError(
                f"callbacks must be pml_mutual.callbacks.Callback instances, got {type(c).__name__}"
            )
    return callbacks
