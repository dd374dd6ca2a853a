"""Observers of an online run: the stage loop fires events, callbacks read an explicit context.

Events, in order, for each stage a run carries out (stages completed before a resume fire nothing)::

    before_stage → [before_train → after_epoch × epochs → after_train] → after_drift → after_eval →
    after_stage
    ... after_run (once, with the summary)

``before_train`` / ``after_epoch`` / ``after_train`` fire only for stages that train (``initial`` after
stage 0, or stage 0 with ``initial_state_dict``, trains nothing). A resumed stage fires ``after_epoch`` only
for the epochs it trains again. Callbacks observe; what they change in the networks is on them.
"""

from .base import Callback, StageContext
from .loggers import CSVLogger, ProgressPrinter, RecordKeeperLogger, TensorBoardLogger, TextLogger

__all__ = [
    "Callback",
    "StageContext",
    "CSVLogger",
    "TensorBoardLogger",
    "TextLogger",
    "ProgressPrinter",
    "RecordKeeperLogger",
]
