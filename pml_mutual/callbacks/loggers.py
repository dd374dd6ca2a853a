"""Loggers as callbacks: per-epoch loss terms and learning rates, per-stage Recall@K, with one global step.

Values are read once per epoch (the epoch means the trainer computes anyway), never per iteration, so
logging adds no host synchronisation to a GPU step. A resumed run logs again the epochs it trains
again, with the same steps.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from .base import Callback, StageContext


def scalars(ctx: StageContext, event: str) -> dict[str, float]:
    """The scalars an event reports: ``loss/<term>`` and ``lr/<optimizer>`` after an epoch,
    ``recall_at_<K>/<old|new|all>`` (fractions in [0, 1]) after a stage."""
    if event == "after_epoch":
        out = {f"loss/{k}": float(v) for k, v in (ctx.epoch_losses or {}).items() if k != "epoch"}
        out.update({f"lr/{k}": float(v) for k, v in (ctx.learning_rates or {}).items()})
        return out
    out = {}
    for part in ("old", "new", "all"):
        rec = (ctx.results or {}).get(part)
        for k, v in (rec or {}).items():
            out[f"recall_at_{k}/{part}"] = float(v)
    return out


class _ScalarLogger(Callback):
    def write(self, ctx: StageContext, values: dict[str, float]) -> None:
        raise NotImplementedError

    def after_epoch(self, ctx: StageContext) -> None:
        self.write(ctx, scalars(ctx, "after_epoch"))

    def after_stage(self, ctx: StageContext) -> None:
        self.write(ctx, scalars(ctx, "after_stage"))


class CSVLogger(_ScalarLogger):
    """Rows ``step,stage,epoch,name,value`` appended to ``path`` and flushed at every event (nothing waits
    for a final save). ``epoch`` is empty for a stage's Recall@K rows."""

    FIELDS = ("step", "stage", "epoch", "name", "value")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"CSVLogger path {self.path} is a directory: name a file")

    def write(self, ctx: StageContext, values: dict[str, float]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.FIELDS)
            epoch = "" if ctx.epoch is None else ctx.epoch
            for name, value in values.items():
                writer.writerow((ctx.global_step, ctx.stage, epoch, name, repr(value)))


class TensorBoardLogger(_ScalarLogger):
    """Scalars to TensorBoard (``torch.utils.tensorboard``; needs the ``tensorboard`` package), one step
    count across stages. Pass ``log_dir`` or a ``SummaryWriter`` of your own."""

    def __init__(self, log_dir: str | os.PathLike | None = None, writer=None):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "TensorBoardLogger needs the tensorboard package: pip install tensorboard"
                ) from e
            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        self.writer = writer

    def write(self, ctx: StageContext, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, ctx.global_step)
        self.writer.flush()

    def after_run(self, ctx: StageContext) -> None:
        self.writer.flush()


class RecordKeeperLogger(_ScalarLogger):
    """To PML's ``record_keeper.RecordKeeper`` (``pip install record-keeper``; its TensorBoard writer and/or
    CSV/SQLite record writer): each ``group/series`` scalar appended at the global step, and the records
    saved at every event, so its files are complete whenever the run stops."""

    def __init__(self, record_keeper):
        if not (hasattr(record_keeper, "append_primitive") and hasattr(record_keeper, "save_records")):
            raise TypeError(
                f"record_keeper must be a record_keeper.RecordKeeper, got {type(record_keeper).__name__}"
            )
        self.record_keeper = record_keeper

    def write(self, ctx: StageContext, values: dict[str, float]) -> None:
        for name, value in values.items():
            group, series = name.split("/", 1)
            self.record_keeper.append_primitive(group, series, value, ctx.global_step)
        self.record_keeper.save_records()


class TextLogger(_ScalarLogger):
    """One line per epoch and per stage to a :mod:`logging` logger (default ``"pml_mutual"``, level INFO)."""

    def __init__(self, logger: logging.Logger | str = "pml_mutual", level: int = logging.INFO):
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.level = level

    def write(self, ctx: StageContext, values: dict[str, float]) -> None:
        where = f"stage {ctx.stage}" + ("" if ctx.epoch is None else f" epoch {ctx.epoch}")
        text = " ".join(f"{k}={v:.6g}" for k, v in values.items())
        self.logger.log(self.level, "[%s] step %d, %s: %s", ctx.method, ctx.global_step, where, text)


class ProgressPrinter(Callback):
    """The run's own progress lines on stdout: each stage's Recall@1 (percent) and seconds. The learner
    adds one unless ``quiet``."""

    def after_stage(self, ctx: StageContext) -> None:
        fmt = lambda r: "  –  " if r is None else f"{100 * r[1]:5.1f}"  # noqa: E731
        res = ctx.results
        print(
            f"[{ctx.method}] stage {ctx.stage}: R@1 (%) old {fmt(res['old'])} new {fmt(res['new'])} all "
            f"{fmt(res['all'])}  ({ctx.seconds.get('total', 0.0):.1f}s)",
            flush=True,
        )

    def after_run(self, ctx: StageContext) -> None:
        s = ctx.summary
        if len(s["stages"]) > 1:
            print(
                f"[{ctx.method}] average forgetting {100 * s['average_forgetting']:.2f} pp, backward "
                f"transfer {100 * s['backward_transfer']:+.2f} pp (Recall@1, percentage points)",
                flush=True,
            )
