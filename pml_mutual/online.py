"""The stage loop of online metric learning: the one place where stages are orchestrated.

For each stage i = 0, 1, ...: the steps of :mod:`pml_mutual.steps` run in order (train F_p from F_{i−1}
with F_s and the frozen teacher as the method needs; the stage's prototypes and the drift of every earlier
stage, Eq. 3, loading old checkpoints one at a time; evaluation on every class seen so far; an atomic
checkpoint), and the callbacks of :mod:`pml_mutual.callbacks` are fired between them. A killed run resumes
from its last epoch with the same command and ends with the same weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from . import distributed, identity
from .callbacks import ProgressPrinter, StageContext
from .callbacks.base import check_callbacks, fire
from .data.loaders import LoaderPool
from .data.stages import check_class_to_stage, split_by_stage
from .drift import DriftCompensator
from .evaluation import summarize_run, to_markdown
from .evaluation.results import with_int_keys
from .gallery import StoredGallery
from .losses.state import own_copy
from .online_config import EMBED_DECODES, METHODS, Method, OnlineConfig
from .optimization import (
    LR_SCHEDULER_STEPS,
    adam,
    default_optimizer,
    describe_optimization,
    epoch_checkpoint,
    optimization_settings,
    seed_everything,
)
from .run_checks import (
    check_decodable_on_device,
    check_drift_views,
    check_initial_state_dict,
    check_inputs_finite,
    check_model_factory,
    checked_labels,
    metric_loss_and_miner,
    named_bases,
    stages_like,
)
from .run_dir import RunDirectory, save_json, write_atomic
from .run_identity import content_records, image_file_sizes, run_identity
from .steps import STEPS
from .steps.checkpoint import resume
from .steps.train import start_loader_workers
from .trainers import IncrementalTrainer

LOGGER = logging.getLogger("pml_mutual")

__all__ = [
    "OnlineLearner",
    "OnlineConfig",
    "METHODS",
    "Method",
    "EMBED_DECODES",
    "seed_everything",
    "adam",
    "epoch_checkpoint",
    "default_optimizer",
    "describe_optimization",
    "LR_SCHEDULER_STEPS",
]


class OnlineLearner:
    """Runs every stage of an online (class-incremental) metric-learning experiment.

    Args:
        model_factory: returns a new embedding network (input → L2-normalised embedding). Called for
            every network the run holds, so old checkpoints are loaded into fresh instances.
        train_stages: one dataset of ``(x, label)`` per stage, classes disjoint across stages (or use
            :meth:`from_class_assignment`).
        test_dataset: test items of all classes; after stage i the classes of stages ≤ i are evaluated.
        config: :class:`OnlineConfig`.
        run_dir: where checkpoints and results go; an existing run there with the same config resumes.
        metric_loss: any PML loss. Default: :class:`~pml_mutual.losses.BatchHardTripletLoss` (PML's
            TripletMarginLoss on BatchHardMiner's triplets without host syncs). Its parameters (ArcFace's
            ``W``, proxies) are trained with F_p by the run's optimizer kind and carried from stage to stage;
            F_s trains its own copy.
        miner: any PML miner without parameters, or None (a loss given without a miner sees every tuple of
            the batch, as in PML).
        prototype_stages: the training stages with the deterministic test transform, for prototypes
            and drift (default: ``train_stages``).
        view_stages: the training stages through a random transform, for ``config.drift_views``'s views
            (default: ``train_stages``, i.e. the training transform).
        initial_state_dict: weights of an already trained F_0 (skips training stage 0), so several
            methods can share one initial model as in the paper.
        quiet: no progress bars.
        identity_tags: extra fields of the run's identity (e.g. command-line flags that change the data
            or the model, the weights file's SHA-256): a run_dir holding other tags is refused.
        fresh: a run_dir holding a run of another identity has its files moved aside (``<run_dir>.old-N``)
            instead of being refused; files of the user's own there stay.
        optimizer: ``params → torch.optim.Optimizer`` for every trained network and loss (e.g.
            ``functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)``). Default: the paper's Adam with
            ``config.lr`` and ``config.weight_decay`` (which are refused with an optimizer of one's own).
        lr_scheduler: ``optimizer → LR scheduler``, one per optimizer, fresh each stage, checkpointed.
        lr_scheduler_step: ``"epoch"`` or ``"iteration"``: when the schedulers step.
        callbacks: :class:`~pml_mutual.callbacks.Callback` instances, fired in order at each event
            (``before_stage`` … ``after_run``) with a :class:`~pml_mutual.callbacks.StageContext`.

    Each stage runs ``steps`` in order (:mod:`pml_mutual.steps`: train, drift, evaluate, checkpoint), handing
    a :class:`~pml_mutual.callbacks.StageContext` from one to the next, and fires the callbacks between
    them. ``trainer_hook(stage, trainer)`` (an attribute, default None) is the older form of a
    ``before_train`` callback and is kept for it.
    """

    trainer_hook: Callable[[int, IncrementalTrainer], None] | None = None

    def __init__(
        self,
        model_factory: Callable[[], torch.nn.Module],
        train_stages: Sequence[Dataset],
        test_dataset: Dataset,
        config: OnlineConfig | None = None,
        run_dir: str | os.PathLike | None = None,
        metric_loss: torch.nn.Module | None = None,
        miner: torch.nn.Module | None = None,
        prototype_stages: Sequence[Dataset] | None = None,
        view_stages: Sequence[Dataset] | None = None,
        initial_state_dict: dict | None = None,
        quiet: bool = False,
        identity_tags: dict | None = None,
        fresh: bool = False,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[[torch.optim.Optimizer], object] | None = None,
        lr_scheduler_step: str = "epoch",
        callbacks: Sequence = (),
    ):
        check_model_factory(model_factory)
        if config is not None and not isinstance(config, OnlineConfig):
            raise TypeError(f"config must be an OnlineConfig, got {type(config).__name__}")
        self.config = cfg = config or OnlineConfig()
        self.method = METHODS[cfg.method]
        self.model_factory = model_factory
        self.train_stages = list(train_stages)
        self.prototype_stages = stages_like(self.train_stages, prototype_stages, "prototype_stages")
        self.view_stages = stages_like(self.train_stages, view_stages, "view_stages")
        self.test_dataset = test_dataset
        if run_dir is None:  # under torchrun every rank must use rank 0's directory
            run_dir = distributed.broadcast_object(
                tempfile.mkdtemp(prefix="pml_mutual_run_") if distributed.is_main() else None
            )
        self.run_dir = Path(run_dir)
        self.directory = RunDirectory(run_dir)  # refuses "", "." and the like before anything else
        self.identity_tags = dict(identity_tags or {})
        self.fresh = fresh
        self.metric_loss, self.miner = metric_loss_and_miner(metric_loss, miner, cfg.triplet_margin)
        # F_s starts from the loss as given (support_init="fresh"): kept apart before any stage trains it
        self.initial_metric_loss = own_copy(self.metric_loss)
        self.optimizer_factory, self.optimization = optimization_settings(
            cfg, optimizer, lr_scheduler, lr_scheduler_step
        )
        self.lr_scheduler_factory, self.lr_scheduler_step = lr_scheduler, lr_scheduler_step
        self.quiet = quiet or not distributed.is_main()  # one process prints
        self.callbacks = check_callbacks(callbacks) + ([] if self.quiet else [ProgressPrinter()])
        self.steps = [step() for step in STEPS]
        check_initial_state_dict(initial_state_dict)
        self.initial_state_dict = initial_state_dict
        self.device = torch.device(cfg.device or distributed.default_device())
        self.phase = "setup"  # "train", "drift", "eval" or "checkpoint": which step of a stage is running
        self.stage_labels, self.class_to_stage, self.test_labels = checked_labels(
            cfg, self.train_stages, test_dataset, self.metric_loss, self.miner
        )
        check_drift_views(cfg, self.method, self.view_stages)
        self.image_file_sizes = image_file_sizes(self.named_bases())
        self.compensator = DriftCompensator(
            mode=cfg.drift_mode if self.method.drift else "none", similarity=cfg.drift_similarity
        )
        self.gallery = StoredGallery(cfg.drift_similarity) if cfg.gallery_report else None
        self.stage_results: list[dict] = []
        self.stage_logs: list[dict] = []
        self.deployed: torch.nn.Module | None = None  # F_i of the last stage run, the next stage's teacher
        self.context: StageContext | None = None
        self._meta_model: torch.nn.Module | None = None
        self.loaders = _loader_pool(cfg, self.device, self.prototype_stages, test_dataset)

    @classmethod
    def from_class_assignment(cls, model_factory, train_dataset, test_dataset, class_to_stage, **kwargs):
        """One training dataset and a class → stage mapping instead of a list of stage datasets."""
        stages = split_by_stage(train_dataset, check_class_to_stage(class_to_stage))
        for name in ("prototype", "view"):  # prototype_dataset= / view_dataset=: split like the training set
            if f"{name}_dataset" in kwargs:
                kwargs[f"{name}_stages"] = split_by_stage(kwargs.pop(f"{name}_dataset"), class_to_stage)
        return cls(model_factory, stages, test_dataset, **kwargs)

    def named_bases(self):
        """(name, base dataset) of the training, prototype and test datasets, each base once per name."""
        return named_bases(
            ("training", self.train_stages),
            ("prototype", self.prototype_stages),
            ("view", self.view_stages if self.view_stages is not self.train_stages else []),
            ("test", [self.test_dataset]),
        )

    # ----------------------------------------------------------------- the run
    def run(self) -> dict:
        """Train and evaluate every remaining stage; returns the results document (see evaluation.results)."""
        self.directory.lock()  # before the identity check: two launches at one instant must not both pass it
        try:
            return self._run()
        except BaseException:
            # the epoch checkpoint being written lands before the error surfaces
            self.directory.wait(raise_error=False)
            raise
        finally:
            self.loaders.close()  # the run's worker processes end here, once
            self.directory.unlock()

    def _run(self) -> dict:
        self.directory.check_identity(
            self.run_identity(), fresh=self.fresh, data_files=self.content_records()
        )
        self._meta_model = None  # a network held through the run would count against the memory guarantees
        self.check_inputs_finite()
        start = resume(self)
        start_loader_workers(self, start)
        for stage in range(start, len(self.train_stages)):
            ctx = self.context = self._new_context(stage)
            self.fire("before_stage")
            t_stage = time.perf_counter()
            for step in self.steps:
                self.phase = step.name
                t0 = time.perf_counter()
                step.run(self, ctx)
                ctx.seconds[step.name] = time.perf_counter() - t0
                if step.name in ("drift", "eval"):
                    self.fire(f"after_{step.name}")
            self.deployed = ctx.student  # F_i: the next stage's teacher, kept in memory
            ctx.seconds["total"] = time.perf_counter() - t_stage
            ctx.global_step = self.steps_before(stage + 1)
            self.fire("after_stage")
            ctx.student = None
        summary = summarize_run(self.stage_results, method=self.config.method, ks=self.config.ks)
        summary["stage_logs"] = self.stage_logs
        if distributed.is_main():
            save_json(summary, self.run_dir / "results.json")
            write_atomic((to_markdown(summary) + "\n").encode(), self.run_dir / "results.md")
        distributed.barrier()
        summary = with_int_keys(summary)
        last = len(self.train_stages) - 1
        self.context = dataclasses.replace(
            self._new_context(last),
            global_step=self.steps_before(last + 1),
            summary=summary,
            results=self.stage_results[-1],
        )
        self.fire("after_run")
        return summary

    # ----------------------------------------------------------------- callbacks and the stage plan
    def _new_context(self, stage: int) -> StageContext:
        return StageContext(
            learner=self,
            stage=stage,
            num_stages=len(self.train_stages),
            method=self.config.method,
            global_step=self.steps_before(stage),
        )

    def fire(self, event: str) -> None:
        """Call ``event`` on every callback, in order, with the current :class:`StageContext`."""
        fire(self.callbacks, event, self.context)

    def steps_before(self, stage: int) -> int:
        """Training iterations of stages before ``stage``: the global step at its start."""
        return sum(
            self.epochs_of(s) * self.config.iterations_per_epoch for s in range(stage) if self.trains(s)
        )

    def trains(self, stage: int) -> bool:
        """Whether ``stage`` trains (stage 0 unless initial weights are given; later stages unless
        `initial`)."""
        return (stage == 0 and self.initial_state_dict is None) or (stage > 0 and self.method.train)

    def epochs_of(self, stage: int) -> int:
        cfg = self.config
        return cfg.initial_epochs if stage == 0 and cfg.initial_epochs is not None else cfg.epochs

    def seen_test_positions(self, stage: int) -> np.ndarray:
        """Positions in the test set of the items whose classes arrived in stages ≤ ``stage``."""
        return np.flatnonzero([self.class_to_stage[int(c)] <= stage for c in self.test_labels])

    # ----------------------------------------------------------------- models, identity, inputs
    def new_model(self) -> torch.nn.Module:
        # built on the device: a ResNet-50's random initialisation costs ~0.3 s on the CPU and its copy
        # to the GPU as much again, for weights that are mostly overwritten by a checkpoint
        with self.device:
            return self.model_factory().to(self.device)

    def load_stage_model(self, stage: int) -> torch.nn.Module:
        """A fresh network holding the deployed weights of ``stage`` (F_p of that stage), checked against
        the SHA-256 recorded when it was written."""
        model = self.new_model()
        model.load_state_dict(self.directory.load_stage_file(stage, "model.pt", map_location=self.device))
        return model

    def fingerprint_model(self) -> torch.nn.Module:
        """One network from the factory, on the meta device where it builds there, for both fingerprints."""
        if self._meta_model is None:
            self._meta_model = identity.build_for_fingerprint(self.model_factory)
        return self._meta_model

    def run_identity(self) -> dict:
        """What determines this run's numbers (:func:`pml_mutual.run_identity.run_identity`)."""
        return run_identity(self)

    def content_records(self) -> dict:
        """What the identity cannot see (:func:`pml_mutual.run_identity.content_records`)."""
        return content_records(self)

    def check_inputs_finite(self) -> None:
        """Every item the run will train on or embed has finite inputs, checked before the first stage trains
        (:func:`pml_mutual.run_checks.check_inputs_finite`, in the run's workers)."""
        check_inputs_finite(self.named_bases(), self.config.num_workers)


def _loader_pool(cfg: OnlineConfig, device: torch.device, prototype_stages, test_dataset) -> LoaderPool:
    """The run's data loaders: one set of workers for training, one for every embedding pass."""
    cuda = device.type == "cuda"
    decode_on_device = cfg.embed_decode == "device"
    if decode_on_device:
        check_decodable_on_device(named_bases(("prototype", prototype_stages), ("test", [test_dataset])))
    # on a GPU, drift and evaluation wait on decoding: finer worker tasks keep every worker busy to the
    # end of a pass (the model still embeds eval_batch_size at a time; see EmbeddingLoader)
    loaders = LoaderPool(
        cfg.batch_size,
        cfg.eval_batch_size,
        cfg.num_workers,
        pin_memory=cuda,
        embed_tasks_per_worker=4 if cuda else None,
        decode_on_device=decode_on_device,
    )
    loaders.share_embedding(list(prototype_stages) + [test_dataset])  # one set of workers for both
    return loaders
