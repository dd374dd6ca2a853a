"""The stage loop of online metric learning: the one place where stages are orchestrated.

For each stage i = 0, 1, ...: build the networks the method needs (F_p from F_{i−1}, a fresh F_s,
the frozen teacher F_{i−1}), train one :class:`~pml_mutual.trainers.IncrementalTrainer` run, then
offline: prototypes of the stage and the drift of every earlier stage (Eq. 3, loading old checkpoints
one at a time), evaluation on every class seen so far, and an atomic checkpoint. A killed run resumes
from its last epoch with the same command and ends with the same weights.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from . import distributed, identity
from .callbacks import ProgressPrinter, StageContext
from .callbacks.base import fire
from .checks import nonfinite_tensors
from .data.device_decode import decodable_on_device, require_torchvision_decoder
from .data.images import ImageItems
from .data.loaders import EmbeddingView, LoaderPool, base_indices
from .data.stages import check_class_to_stage, check_stages, dataset_labels, split_by_stage
from .drift import DRIFT_MODES, SIMILARITIES, DriftCompensator
from .evaluation import extract_embeddings, stage_recalls, summarize_run, to_markdown
from .evaluation.results import stage_result_from_json, stage_result_to_json, with_int_keys
from .gallery import StoredGallery
from .losses import BatchHardTripletLoss, GramCorrelationLoss, MutualGramLoss
from .losses.state import load_training_state, own_copy, trainable_parameters, training_state
from .run_dir import RunDirectory, RunDirectoryError, save_json, write_atomic
from .trainers import IncrementalTrainer

LOGGER = logging.getLogger("pml_mutual")
EMBED_DECODES = ("workers", "device")  # where embedding passes decode JPEGs (OnlineConfig.embed_decode)


@dataclasses.dataclass(frozen=True)
class Method:
    """Which parts of Eq. 1 / 6 a method uses after the first stage."""

    train: bool = True  # False: keep F_0 (the "initial" reference)
    joint: bool = False  # train on every stage's data so far (replay: the upper bound)
    support: bool = False  # F_s and L_mutual
    teacher: bool = False  # F_{i-1} and L_corr
    virtual: bool = False  # virtual features of earlier stages in L_corr (Eq. 6)
    drift: bool = True  # estimate them with Eq. 3–4; False: f̂ = the teacher feature (an ablation)


METHODS: dict[str, Method] = {
    "initial": Method(train=False),
    "finetune": Method(),
    "joint": Method(joint=True),
    "fecd": Method(teacher=True),
    "mutual_only": Method(support=True),
    "fecd_mutual": Method(support=True, teacher=True),
    "ours": Method(support=True, teacher=True, virtual=True),
    # Eq. 6's one term per earlier stage, without the drift estimate: separates what the virtual
    # features add from the larger total distillation weight (i terms at stage i)
    "ours_no_drift": Method(support=True, teacher=True, virtual=True, drift=False),
}


@dataclasses.dataclass
class OnlineConfig:
    """Hyper-parameters of an online run; defaults are the paper's (Adam 1e-5, wd 5e-4, λ = 1/10/8, T = 4)."""

    method: str = "ours"
    epochs: int = 10
    initial_epochs: int | None = None  # stage 0 (None: same as ``epochs``)
    iterations_per_epoch: int = 100
    batch_size: int = 80
    m_per_class: int = 5
    min_images_per_class: int | None = None  # None: m_per_class
    lr: float = 1e-5
    weight_decay: float = 5e-4
    lambda_metric: float = 1.0
    lambda_corr: float = 10.0
    lambda_mutual: float = 8.0
    temperature: float = 4.0
    corr_direction: str = "forward"
    mutual_mode: str = "symmetric"
    # How the virtual features of earlier stages are estimated: "direct" (the paper, Eq. 3-4: prototype
    # drift measured with every earlier checkpoint), "chained" (SDC: from the previous model only),
    # "learned" (beyond the paper, LDC-style: per earlier stage a ridge-fitted linear map from the latest
    # model's space back to it, on the same images as "direct"; one D×D solve per earlier stage, O(stages·D²)
    # state; see measure_fidelity for how close each estimate comes), "learned_chained" (the same maps from
    # the previous model only, composed stage to stage) or "none" (zero drift)
    drift_mode: str = "direct"
    drift_similarity: str = "cosine_relu"
    support_init: str = "fresh"  # "fresh": model_factory() (random, or pretrained trunk + new head); "teacher"
    # BatchNorm layers kept in eval mode while training: True (the paper: every trained network, right for
    # pretrained backbones), "inherited" (only networks that start from a trained model: F_p after the
    # first stage, F_s when support_init="teacher"; right for networks trained from scratch) or False.
    freeze_batchnorm: bool | str = True
    triplet_margin: float = 0.1
    ks: tuple[int, ...] = (1, 2, 4, 8)
    seed: int = 0
    device: str | None = None
    eval_batch_size: int = 256
    amp: bool = False  # autocast (bf16; fp16 + GradScaler on GPUs without bf16) for training and evaluation
    num_workers: int = 0  # DataLoader worker processes (image datasets decode JPEGs: use several)
    # Under torchrun: batch_size and m_per_class are per rank; "global" computes the losses on the batch of
    # all ranks (N ranks × B = one process with N·B), "local" on each rank's own batch.
    gram_scope: str = "global"
    # After every stage, also Recall@1 of a test gallery that is not re-embedded (pml_mutual.gallery): as
    # stored (each item embedded by the model of its class's stage), moved by translation, moved by the
    # learned maps, re-embedded. Costs direct-mode drift measurement (every earlier checkpoint embeds the
    # stage's images once) for every method, and the test set's embeddings once in the checkpoints.
    gallery_report: bool = False
    # Where embedding passes (drift measurement, evaluation) decode JPEGs: "workers" (Pillow in the
    # DataLoader workers, as training does) or "device" (the workers read files, torchvision decodes the
    # batch on the run's device, nvJPEG on CUDA, and resizes it there: pml_mutual.data.device_decode).
    # "device" moves pixels by up to a level of 255 per resize, so it is part of the run's identity.
    embed_decode: str = "workers"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.drift_mode not in DRIFT_MODES:
            raise ValueError(f"drift_mode must be one of {DRIFT_MODES}, got {self.drift_mode!r}")
        if self.drift_similarity not in SIMILARITIES:
            raise ValueError(f"drift_similarity must be one of {SIMILARITIES}, got {self.drift_similarity!r}")
        if self.freeze_batchnorm not in (True, False, "inherited"):
            raise ValueError(f"freeze_batchnorm must be True, False or 'inherited', got {self.freeze_batchnorm!r}")
        distributed.check_gram_scope(self.gram_scope)
        if self.embed_decode not in EMBED_DECODES:
            raise ValueError(f"embed_decode must be one of {EMBED_DECODES}, got {self.embed_decode!r}")
        if self.support_init not in ("fresh", "teacher"):
            raise ValueError(f"support_init must be 'fresh' or 'teacher', got {self.support_init!r}")
        for name in ("epochs", "iterations_per_epoch", "batch_size", "m_per_class", "eval_batch_size", "num_workers",
                     "seed", "initial_epochs", "min_images_per_class"):
            value = getattr(self, name)
            if value is None and name in ("initial_epochs", "min_images_per_class"):
                continue
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))  # numpy integers accepted, kept as Python ints (JSON, identity)
        if self.seed < 0:
            raise ValueError(f"seed must be ≥ 0 (NumPy's SeedSequence takes no negatives), got {self.seed}")
        for name in ("epochs", "iterations_per_epoch", "batch_size", "m_per_class", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.initial_epochs is not None and (isinstance(self.initial_epochs, bool) or self.initial_epochs < 1):
            raise ValueError(f"initial_epochs must be at least 1 (or None: same as epochs), got {self.initial_epochs!r}; "
                             "to start from weights you have, pass OnlineLearner(..., initial_state_dict=...)")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be at least 0, got {self.num_workers}")
        for name in ("lr", "weight_decay", "lambda_metric", "lambda_corr", "lambda_mutual", "triplet_margin"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
            setattr(self, name, float(value) if isinstance(value, (float, np.floating)) else int(value))
        from .losses.gram import check_temperature

        self.temperature = check_temperature(self.temperature)
        from .evaluation.recall import check_ks

        self.ks = check_ks(self.ks)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ks"] = list(self.ks)
        return d


def _tensors_of(x, out: list) -> None:
    if torch.is_tensor(x):
        out.append(x)
    elif isinstance(x, np.ndarray) and x.dtype.kind == "f":
        out.append(torch.from_numpy(x))
    elif isinstance(x, float):
        out.append(torch.tensor(x))
    elif isinstance(x, (list, tuple)):
        for v in x:
            _tensors_of(v, out)
    elif isinstance(x, dict):
        for v in x.values():
            _tensors_of(v, out)


def _finite_flags(items: list) -> list[bool]:
    """Collate function of the finite-input check: whether each item's floating-point values are finite."""
    flags = []
    for item in items:
        parts: list = []
        _tensors_of(item, parts)
        flags.append(all(bool(torch.isfinite(p).all()) for p in parts if p.is_floating_point()))
    return flags


def check_model_factory(model_factory) -> None:
    """A factory, not a network: the run builds several networks (F_p, F_s, the teacher, old checkpoints)."""
    if isinstance(model_factory, torch.nn.Module):
        raise TypeError(f"model_factory must build a new network on each call, got a {type(model_factory).__name__} "
                        "instance: pass its class or a function, e.g. model_factory=lambda: MyNet(...)")
    if not callable(model_factory):
        raise TypeError(f"model_factory must be callable (a class or a function returning a torch.nn.Module), "
                        f"got {type(model_factory).__name__}")


def classifier_classes(metric_loss) -> int | None:
    """The number of classes a classification-style loss holds weights for, or None for pair/triplet losses.
    PML's ``num_classes`` attribute where it is set (ProxyNCA and NormalizedSoftmax leave it 0: there the
    width of ``W`` or the rows of ``proxies``)."""
    num_classes = getattr(metric_loss, "num_classes", None)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes > 0:
        return num_classes
    params = dict(metric_loss.named_parameters(recurse=False)) if isinstance(metric_loss, torch.nn.Module) else {}
    if isinstance(num_classes, int) and params.get("W") is not None and params["W"].ndim == 2:
        return int(params["W"].shape[1])
    if isinstance(num_classes, int) and params.get("proxies") is not None and params["proxies"].ndim == 2:
        return int(params["proxies"].shape[0])
    return None


def check_label_range(metric_loss, class_to_stage) -> None:
    """Classification-style losses (ArcFace, CosFace, ProxyAnchor, SoftTriple, NormalizedSoftmax, ...) hold
    one weight row per class, indexed by label: every label must lie in [0, num_classes)."""
    num_classes = classifier_classes(metric_loss)
    if num_classes is None:
        return
    labels = sorted(class_to_stage)
    out = [c for c in labels if not 0 <= c < num_classes]
    if out:
        raise ValueError(f"{type(metric_loss).__name__}(num_classes={num_classes}) indexes its weights by label, but "
                         f"labels {out[:10]} lie outside [0, {num_classes}): build it with num_classes={labels[-1] + 1} "
                         "or map the labels to 0…C−1")


def check_batch_layout(metric_loss, miner, batch_size: int, m_per_class: int) -> None:
    """A pair or triplet loss needs a positive and a negative in every batch: MPerClassSampler's batch holds
    batch_size / m_per_class classes of m_per_class items each. Classification-style losses (a ``num_classes``
    attribute: ArcFace, ProxyAnchor, ...) compare rows with class weights and need neither."""
    if classifier_classes(metric_loss) is not None:
        return
    what = type(metric_loss).__name__ + (f" with {type(miner).__name__}" if miner is not None else "")
    if m_per_class < 2:
        raise ValueError(f"m_per_class={m_per_class}: a batch holds one item per class, so {what} sees no positive "
                         "pair and trains nothing; use m_per_class ≥ 2")
    if batch_size // m_per_class < 2:
        raise ValueError(f"batch_size={batch_size} with m_per_class={m_per_class}: a batch holds one class, so {what} "
                         f"sees no negative and trains nothing; use batch_size ≥ {2 * m_per_class}")


def seed_everything(*keys: int) -> None:
    """Seed Python, NumPy (PML's samplers use the global NumPy RNG) and torch from a tuple of keys."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def adam(params, lr: float, weight_decay: float) -> torch.optim.Adam:
    """The paper's Adam, with torch's fused kernel where it has one (CPU and CUDA): one pass over each
    parameter instead of a dozen small ops per tensor. On the CPU a BN-Inception update takes ~8 ms
    instead of ~36 ms: two of those were ~40 % of a small-image `ours` step."""
    params = list(params)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)


def epoch_checkpoint(stage: int, epoch: int, models: dict, optimizers: dict, epoch_losses: list[dict],
                     last: bool = False, losses: dict | None = None, schedulers: dict | None = None) -> dict:
    """What the stage loop checkpoints after an epoch (``in_progress.pt``): the trained networks' and the
    optimisers' states, the metric losses' trained state (weights, memory queues) and the LR schedulers',
    and the loss log so far. After the stage's ``last`` epoch no step follows, so a resume from it needs
    only the networks and losses: Adam's two moments would triple what is copied and written."""
    state = {"stage": stage, "epoch": epoch, "models": {k: m.state_dict() for k, m in models.items()},
             "epoch_losses": epoch_losses}
    kept = {k: training_state(m) for k, m in (losses or {}).items()}
    if any(kept.values()):  # absent for stateless losses: checkpoints of earlier versions look the same
        state["losses"] = kept
    if not last:
        state["optimizers"] = {k: o.state_dict() for k, o in optimizers.items()}
        if schedulers:
            state["lr_schedulers"] = {k: sch.state_dict() for k, sch in schedulers.items()}
    return state


LR_SCHEDULER_STEPS = ("epoch", "iteration")


def default_optimizer(config: OnlineConfig) -> Callable:
    """The paper's optimiser: :func:`adam` with ``config.lr`` and ``config.weight_decay``."""
    return functools.partial(adam, lr=config.lr, weight_decay=config.weight_decay)


def _json_safe(d: dict) -> dict:
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v) for k, v in sorted(d.items())}


def describe_optimization(optimizer: Callable, lr_scheduler: Callable | None) -> dict:
    """Build the optimizer (and scheduler) on a probe parameter: a factory that does not return a torch
    optimizer (or scheduler) fails here, before training, and the settings they hold (class, defaults,
    scheduler state) describe them in the run's identity."""
    probe = torch.nn.Parameter(torch.zeros(1))
    opt = optimizer([probe])
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a callable params → torch.optim.Optimizer (e.g. "
                        f"functools.partial(torch.optim.SGD, lr=0.01)); it returned {type(opt).__name__}")
    out = {"optimizer": {"class": type(opt).__qualname__, "defaults": _json_safe(opt.defaults)}}
    if lr_scheduler is not None:
        sch = lr_scheduler(opt)
        if not (hasattr(sch, "step") and hasattr(sch, "state_dict") and hasattr(sch, "load_state_dict")):
            raise TypeError(f"lr_scheduler must be a callable optimizer → torch.optim.lr_scheduler.LRScheduler (e.g. "
                            f"functools.partial(CosineAnnealingLR, T_max=10)); it returned {type(sch).__name__}")
        out["lr_scheduler"] = {"class": type(sch).__qualname__, "state": _json_safe(sch.state_dict())}
    return out


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

    Hook: ``trainer_hook(stage, trainer)``, if set (an attribute, default None), is called with each
    stage's :class:`IncrementalTrainer` once it is built, before it trains (e.g. to time the stage's
    own training step after the run, as ``benchmarks/perf_e2e.py`` does).
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
        self.config = config or OnlineConfig()
        self.method = METHODS[self.config.method]
        self.model_factory = model_factory
        self.train_stages = list(train_stages)
        self.prototype_stages = list(prototype_stages) if prototype_stages is not None else self.train_stages
        self.test_dataset = test_dataset
        if run_dir is None:  # under torchrun every rank must use rank 0's directory
            run_dir = distributed.broadcast_object(tempfile.mkdtemp(prefix="pml_mutual_run_") if distributed.is_main() else None)
        self.run_dir = Path(run_dir)
        self.directory = RunDirectory(run_dir)  # refuses "", "." and the like before anything else
        self.identity_tags = dict(identity_tags or {})
        self.fresh = fresh
        if metric_loss is None and miner is None:
            # PML's TripletMarginLoss on BatchHardMiner's triplets, computed densely: no host sync per step
            metric_loss = BatchHardTripletLoss(margin=self.config.triplet_margin)
        elif metric_loss is None:
            metric_loss = pml_losses.TripletMarginLoss(margin=self.config.triplet_margin)
        if isinstance(metric_loss, BatchHardTripletLoss) and miner is not None:
            raise ValueError("BatchHardTripletLoss mines its own triplets: pass miner=None with it")
        if trainable_parameters(miner):
            raise ValueError(f"the miner ({type(miner).__name__}) has trainable parameters; the stage loop trains "
                             "networks and the metric loss only: pass a miner without parameters")
        # PML's semantics: a loss given without a miner sees every tuple of the batch
        self.metric_loss, self.miner = metric_loss, miner
        # F_s starts from the loss as given (support_init="fresh"): kept apart before any stage trains it
        self._initial_metric_loss = own_copy(metric_loss)
        lr_defaults = OnlineConfig()
        if optimizer is not None and (self.config.lr, self.config.weight_decay) != (lr_defaults.lr, lr_defaults.weight_decay):
            raise ValueError("OnlineConfig.lr and weight_decay configure the default Adam; with optimizer= set them in "
                             "the optimizer factory (e.g. functools.partial(torch.optim.SGD, lr=0.01, weight_decay=5e-4))")
        if lr_scheduler_step not in LR_SCHEDULER_STEPS:
            raise ValueError(f"lr_scheduler_step must be one of {LR_SCHEDULER_STEPS}, got {lr_scheduler_step!r}")
        self.optimizer_factory = optimizer if optimizer is not None else default_optimizer(self.config)
        self.lr_scheduler_factory, self.lr_scheduler_step = lr_scheduler, lr_scheduler_step
        self.optimization = describe_optimization(self.optimizer_factory, lr_scheduler) if optimizer or lr_scheduler else None
        self.callbacks = list(callbacks) + ([] if quiet or not distributed.is_main() else [ProgressPrinter()])
        for c in self.callbacks:
            if not all(callable(getattr(c, e, None)) for e in ("before_stage", "after_stage", "after_run")):
                raise TypeError(f"callbacks must be pml_mutual.callbacks.Callback instances, got {type(c).__name__}")
        if initial_state_dict is not None and not (
                isinstance(initial_state_dict, Mapping) and all(torch.is_tensor(v) for v in initial_state_dict.values())):
            raise TypeError(f"initial_state_dict must be a state dict (name → tensor, e.g. model.state_dict() or "
                            f"torch.load(path, weights_only=True)), got a {type(initial_state_dict).__name__}")
        self.initial_state_dict = initial_state_dict
        bad = nonfinite_tensors(initial_state_dict) if initial_state_dict is not None else []
        if bad:
            raise ValueError(f"initial_state_dict holds NaN or inf values in {', '.join(bad[:5])}")
        default_device = "cpu"
        if torch.cuda.is_available():
            default_device = f"cuda:{torch.cuda.current_device()}" if distributed.is_active() else "cuda"
        self.device = torch.device(self.config.device or default_device)
        self.quiet = quiet or not distributed.is_main()  # one process prints
        self.phase = "setup"  # "train", "drift" or "eval": which part of a stage is running
        if len(self.prototype_stages) != len(self.train_stages):
            raise ValueError("prototype_stages must have one dataset per training stage")
        self.stage_labels = [dataset_labels(d) for d in self.train_stages]
        self.class_to_stage = check_stages(  # under torchrun a step draws world_size × batch_size images
            self.stage_labels, self.config.batch_size * distributed.world_size(), self.config.m_per_class,
            self.config.min_images_per_class,
        )
        test_labels = dataset_labels(test_dataset)
        unknown = sorted(set(np.unique(test_labels).tolist()) - set(self.class_to_stage))
        if unknown:
            raise ValueError(f"test classes {unknown[:10]} belong to no training stage")
        missing = sorted(set(range(len(self.train_stages))) - {self.class_to_stage[int(c)] for c in np.unique(test_labels)})
        if missing:
            raise ValueError(f"the test set has no item of stage(s) {missing}: every stage must be evaluated")
        unseen = sorted(set(self.class_to_stage) - set(np.unique(test_labels).tolist()))
        if unseen:
            raise ValueError(f"training classes {unseen[:10]}{' …' if len(unseen) > 10 else ''} have no item in the test "
                             "set: they would be trained on and never evaluated; add their test items, or leave them "
                             "out of the training stages (of the class assignment)")
        check_label_range(self.metric_loss, self.class_to_stage)
        # under torchrun with gram_scope="global" every loss sees the batch of all ranks
        seen_rows = self.config.batch_size * (distributed.world_size() if self.config.gram_scope == "global" else 1)
        check_batch_layout(self.metric_loss, self.miner, seen_rows, self.config.m_per_class)
        self.test_labels = test_labels
        # one stat per listed image, now: a missing file must not surface hours into training; the sizes
        # tell a run directory whether its images were replaced under the same paths
        self.image_file_sizes: dict[str, list[str]] = {}
        digests: dict[int, str] = {}  # id(items) → digest: training and prototype datasets share their items
        for name, base in self._named_bases(("training", self.train_stages), ("prototype", self.prototype_stages),
                                            ("test", [test_dataset])):
            items = getattr(base, "items", None)
            if isinstance(items, ImageItems):
                if id(items) not in digests:
                    digests[id(items)] = identity.image_files_fingerprint(items, f"the {name} dataset")
                self.image_file_sizes.setdefault(name, []).append(digests[id(items)])
        self.compensator = DriftCompensator(mode=self.config.drift_mode if self.method.drift else "none",
                                            similarity=self.config.drift_similarity)
        self.gallery = StoredGallery(self.config.drift_similarity) if self.config.gallery_report else None
        self.stage_results: list[dict] = []
        self.stage_logs: list[dict] = []
        self._student: torch.nn.Module | None = None  # F_i of the stage being run, until the next one starts
        self._teacher: torch.nn.Module | None = None  # F_{i-1} as training held it, until drift measurement
        cuda = self.device.type == "cuda"
        decode_on_device = self.config.embed_decode == "device"
        if decode_on_device:
            self._check_decodable_on_device()
        # on a GPU, drift and evaluation wait on decoding: finer worker tasks keep every worker busy to the
        # end of a pass (the model still embeds eval_batch_size at a time; see EmbeddingLoader)
        self.loaders = LoaderPool(self.config.batch_size, self.config.eval_batch_size, self.config.num_workers,
                                  pin_memory=cuda, embed_tasks_per_worker=4 if cuda else None,
                                  decode_on_device=decode_on_device)
        self.loaders.share_embedding(list(self.prototype_stages) + [test_dataset])  # one set of workers for both

    @classmethod
    def from_class_assignment(cls, model_factory, train_dataset, test_dataset, class_to_stage, **kwargs):
        """One training dataset and a class → stage mapping instead of a list of stage datasets."""
        stages = split_by_stage(train_dataset, check_class_to_stage(class_to_stage))
        if "prototype_dataset" in kwargs:
            kwargs["prototype_stages"] = split_by_stage(kwargs.pop("prototype_dataset"), class_to_stage)
        return cls(model_factory, stages, test_dataset, **kwargs)

    @staticmethod
    def _named_bases(*groups: tuple[str, Sequence[Dataset]]):
        """(name, base dataset) of each group's stage datasets, each base once per group."""
        for name, datasets in groups:
            seen = set()
            for d in datasets:
                base, _ = base_indices(d)
                if id(base) not in seen:
                    seen.add(id(base))
                    yield name, base

    def _check_decodable_on_device(self) -> None:
        """embed_decode="device": torchvision present and every embedded dataset made of image files read
        through the test transform, or an error now, before any training."""
        for name, base in self._named_bases(("prototype", self.prototype_stages), ("test", [self.test_dataset])):
            if not decodable_on_device(base):
                raise ValueError(
                    f"embed_decode='device' needs the {name} dataset to be an ImageListDataset with a test "
                    f"ProtocolTransform (train=False); got {type(base).__name__} with transform "
                    f"{getattr(base, 'transform', None)!r}. Use embed_decode='workers' for it"
                )
        require_torchvision_decoder()

    # ----------------------------------------------------------------- the run
    def run(self) -> dict:
        """Train and evaluate every remaining stage; returns the results document (see evaluation.results)."""
        self.directory.lock()  # before the identity check: two launches at one instant must not both pass it
        try:
            return self._run()
        except BaseException:
            self.directory.wait(raise_error=False)  # the epoch checkpoint being written lands before the error surfaces
            raise
        finally:
            self.loaders.close()  # the run's worker processes end here, once
            self.directory.unlock()

    def _run(self) -> dict:
        start = self._resume()
        self._start_loader_workers(start)
        for stage in range(start, len(self.train_stages)):
            ctx = self.context = self._new_context(stage)
            self._fire("before_stage")
            t0 = time.perf_counter()
            epoch_losses = self._train_stage(stage)
            t_train = time.perf_counter()
            self._measure_drift(stage)
            t_drift = time.perf_counter()
            self._fire("after_drift")
            self.phase = "eval"
            results = ctx.results = self._evaluate(stage)
            t_eval = time.perf_counter()
            self.phase_seconds = {"train": t_train - t0, "drift": t_drift - t_train, "eval": t_eval - t_drift}
            self._fire("after_eval")
            self._save_stage(stage, results, epoch_losses, t_eval - t0)
            self.phase_seconds["save"] = time.perf_counter() - t_eval
            ctx.seconds = dict(self.phase_seconds, total=time.perf_counter() - t0)
            ctx.global_step = self._steps_before(stage + 1)
            self._fire("after_stage")
        summary = summarize_run(self.stage_results, method=self.config.method, ks=self.config.ks)
        summary["stage_logs"] = self.stage_logs
        if distributed.is_main():
            save_json(summary, self.run_dir / "results.json")
            write_atomic((to_markdown(summary) + "\n").encode(), self.run_dir / "results.md")
        distributed.barrier()
        summary = with_int_keys(summary)
        last = len(self.train_stages) - 1
        self.context = dataclasses.replace(self._new_context(last), global_step=self._steps_before(last + 1),
                                           summary=summary, results=self.stage_results[-1])
        self._fire("after_run")
        return summary

    # ----------------------------------------------------------------- callbacks
    def _new_context(self, stage: int) -> StageContext:
        return StageContext(learner=self, stage=stage, num_stages=len(self.train_stages), method=self.config.method,
                            global_step=self._steps_before(stage))

    def _fire(self, event: str) -> None:
        fire(self.callbacks, event, self.context)

    def _steps_before(self, stage: int) -> int:
        """Training iterations of stages before ``stage``: the global step at its start."""
        return sum(self._epochs(s) * self.config.iterations_per_epoch for s in range(stage) if self._trains(s))

    # ----------------------------------------------------------------- one stage
    def _train_stage(self, stage: int) -> list[dict]:
        cfg, method = self.config, self.method
        self.phase = "train"
        # F_{i-1}: the previous stage's deployed model, still in memory when that stage ran in this process
        # (its checkpoint was written from it: the same bits), else loaded from the checkpoint (a resume)
        previous, self._student, self._teacher = self._student, None, None
        teacher = None
        if stage > 0:
            teacher = previous if previous is not None else self.load_stage_model(stage - 1)
        del previous
        # seeded once F_{i-1} is at hand: loading it builds a network, whose random initialisation draws
        # from the generator, and reusing it does not; the networks built below must not depend on which
        seed_everything(cfg.seed, stage, 0)
        trains = self._trains(stage)
        student = self.new_model()
        if stage == 0 and self.initial_state_dict is not None:
            student.load_state_dict(self.initial_state_dict)
        elif teacher is not None:
            student.load_state_dict(teacher.state_dict())  # F_p starts as F_{i-1}
        if not trains:
            del teacher
            self._student = student
            return []
        models = {"trunk": student}
        loss_funcs = {"metric_loss": self.metric_loss.to(self.device)}
        weights = {"metric_loss": cfg.lambda_metric}
        if stage > 0 and method.support:
            support = self.new_model()
            if cfg.support_init == "teacher":
                support.load_state_dict(teacher.state_dict())
            models["support_trunk"] = support
            # F_s's own metric loss (and miner): from the loss as given when F_s starts fresh, from F_p's
            # when it starts as the teacher
            start_loss = self.metric_loss if cfg.support_init == "teacher" else self._initial_metric_loss
            loss_funcs["support_metric_loss"] = own_copy(start_loss).to(self.device)
            loss_funcs["mutual_loss"] = MutualGramLoss(temperature=cfg.temperature, mode=cfg.mutual_mode)
            weights.update(support_metric_loss=cfg.lambda_metric, mutual_loss=cfg.lambda_mutual)
        if stage > 0 and method.teacher:
            models["teacher_trunk"] = teacher
            loss_funcs["correlation_loss"] = GramCorrelationLoss(temperature=cfg.temperature, direction=cfg.corr_direction)
            weights["correlation_loss"] = cfg.lambda_corr
        del teacher  # held by ``models`` only if the method distils from it
        trained = [k for k in models if k != "teacher_trunk"]
        trained_losses = [k for k in ("metric_loss", "support_metric_loss") if k in loss_funcs]
        optimizers = {f"{k}_optimizer": self.optimizer_factory(models[k].parameters()) for k in trained}
        # a loss's parameters (ArcFace's W, proxies) are trained with their network, by the same optimiser
        optimizers.update({f"{k}_optimizer": self.optimizer_factory(trainable_parameters(loss_funcs[k]))
                           for k in trained_losses if trainable_parameters(loss_funcs[k])})
        suffix = f"_scheduler_by_{self.lr_scheduler_step}"  # PML's key for a scheduler stepped per epoch / iteration
        schedulers = {} if self.lr_scheduler_factory is None else {
            k.removesuffix("_optimizer") + suffix: self.lr_scheduler_factory(o) for k, o in optimizers.items()}
        mining = {}
        if self.miner is not None:
            mining["tuple_miner"] = self.miner
            if "support_trunk" in models:
                mining["support_tuple_miner"] = own_copy(self.miner)
        dataset = self._training_dataset(stage)
        labels = dataset_labels(dataset)

        def new_sampler():
            length = cfg.batch_size * cfg.iterations_per_epoch
            if distributed.is_active():  # one global class-balanced batch per step, split across ranks
                return distributed.DistributedMPerClassSampler(labels, cfg.m_per_class, cfg.batch_size, length)
            return MPerClassSampler(labels, cfg.m_per_class, cfg.batch_size, length_before_new_iter=length)
        epochs = self._epochs(stage)
        done_epochs, epoch_losses = self._load_epoch_checkpoint(stage, models, optimizers,
                                                                {k: loss_funcs[k] for k in trained_losses}, schedulers)
        start_epoch = done_epochs + 1
        use_virtual = method.virtual and self.compensator.num_stages >= 2

        def epoch_start(trainer):
            seed_everything(cfg.seed, stage, trainer.epoch)
            # MPerClassSampler shuffles its class list in place: a fresh one per epoch keeps every
            # epoch a function of (seed, stage, epoch) alone, so a resumed epoch replays exactly.
            trainer.sampler = new_sampler()

        def epoch_end(trainer):
            epoch_losses.append(dict(trainer.epoch_losses, epoch=trainer.epoch))
            state = epoch_checkpoint(stage, trainer.epoch, {k: models[k] for k in trained}, optimizers, epoch_losses,
                                     last=trainer.epoch == epochs, losses={k: loss_funcs[k] for k in trained_losses},
                                     schedulers=schedulers)
            # written by a background thread from a CPU snapshot: the next epoch does not wait for the disk
            self.directory.save_in_background(state)
            ctx = self.context
            ctx.epoch, ctx.epochs, ctx.epoch_losses = trainer.epoch, epochs, dict(trainer.epoch_losses)
            ctx.learning_rates = {k: o.param_groups[0]["lr"] for k, o in optimizers.items()}
            ctx.global_step = self._steps_before(stage) + trainer.epoch * cfg.iterations_per_epoch
            self._fire("after_epoch")

        trainer = IncrementalTrainer(
            models=self._wrap_for_ranks(models, trained),
            optimizers=optimizers,
            lr_schedulers=schedulers,
            batch_size=cfg.batch_size,
            loss_funcs=loss_funcs,
            dataset=dataset,
            mining_funcs=mining,
            iterations_per_epoch=cfg.iterations_per_epoch,
            sampler=new_sampler(),
            dataloader_num_workers=cfg.num_workers,
            data_device=self.device,
            loss_weights=weights,
            freeze_batchnorm_in=self._batchnorm_frozen(stage, models),
            drift_compensator=self.compensator if use_virtual else None,
            epoch_start_hook=epoch_start,
            end_of_epoch_hook=epoch_end,
            quiet=self.quiet,
            amp=cfg.amp,
            gram_scope=cfg.gram_scope,
            loader_pool=self.loaders,
            context=f"[{cfg.method}] stage {stage}, ",
        )
        if self.trainer_hook is not None:
            self.trainer_hook(stage, trainer)
        self.context.trainer = trainer
        self._fire("before_train")
        if start_epoch <= epochs:
            trainer.train(start_epoch, epochs)
        self._fire("after_train")
        self.context.trainer = None
        # the last epoch's checkpoint goes on writing during drift and evaluation; save_stage waits for it
        self._student = student
        self._teacher = models.get("teacher_trunk")  # drift measurement embeds with it instead of reloading it
        support = models.get("support_trunk")
        if support is not None:  # snapshotted now so that drift measurement holds two networks, not three;
            # written in the background while drift is measured (save_stage waits for it)
            self.directory.save_stage_file_in_background(stage, "support.pt", support.state_dict())
        # F_s and the teacher are freed here, by reference counting (no cycles hold models; tested without
        # the garbage collector), before drift measurement loads old models
        del trainer, models, optimizers, support
        return epoch_losses

    def _trains(self, stage: int) -> bool:
        return (stage == 0 and self.initial_state_dict is None) or (stage > 0 and self.method.train)

    def _epochs(self, stage: int) -> int:
        cfg = self.config
        return cfg.initial_epochs if stage == 0 and cfg.initial_epochs is not None else cfg.epochs

    def _training_dataset(self, stage: int) -> Dataset:
        joint = stage > 0 and self.method.joint
        return ConcatDataset(self.train_stages[: stage + 1]) if joint else self.train_stages[stage]

    def _start_loader_workers(self, start: int) -> None:
        """Fork every worker process the run will use now, before the first network is built: memory
        written later (weights, gradients, optimiser state) is then never shared with a worker, so the
        training process does not copy it page by page on its first write (see LoaderPool.start_workers)."""
        if start >= len(self.train_stages):
            return
        first = next((s for s in range(start, len(self.train_stages)) if self._trains(s)), None)
        embedded = [self.test_dataset] + ([self.prototype_stages[start]] if self._drift_users() else [])
        self.loaders.start_workers(train=self._training_dataset(first) if first is not None else None, embed=embedded)

    def _wrap_for_ranks(self, models: dict, trained: list[str]) -> dict:
        """Under torchrun, the trained networks in DistributedDataParallel (the teacher stays bare: it is
        frozen and never synchronised). Checkpoints keep the bare networks' state dicts. One rank has
        nothing to synchronise: no wrapper."""
        if distributed.world_size() == 1:
            return models
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return {k: DDP(m, device_ids=ids) if k in trained else m for k, m in models.items()}

    def _batchnorm_frozen(self, stage: int, models: dict) -> list[str]:
        mode = self.config.freeze_batchnorm
        if mode is True:
            return [k for k in ("trunk", "support_trunk") if k in models]
        if mode == "inherited":
            inherited = ["trunk"] if stage > 0 else []
            if stage > 0 and self.config.support_init == "teacher":
                inherited.append("support_trunk")
            return [k for k in inherited if k in models]
        return []

    def _drift_users(self) -> list:
        """What measures drift after a stage: the training compensator (methods with virtual features) and
        the gallery report; both take the same calls, and each old model's features are extracted once."""
        return ([self.compensator] if self.method.virtual else []) + ([self.gallery] if self.gallery is not None else [])

    def _measure_drift(self, stage: int) -> None:
        """Offline, after stage ``stage``: its prototypes, and the drift of earlier stages up to F_stage (Eq. 3)."""
        kept, self._teacher = self._teacher, None  # F_{stage-1}, if training distilled from it
        users = self._drift_users()
        if not users:
            return
        self.phase = "drift"
        loader = self._embedding_loader(self.prototype_stages[stage])  # its workers serve every model below
        earlier = sorted(set().union(*(u.stages_to_measure(after_adding=1) for u in users)))
        if stage - 1 not in earlier:
            kept = None
        # the new model and one old model embed each decoded batch together (one decoding pass fewer):
        # F_{stage-1} if it is still held, else the oldest; the others after it, one at a time
        first = stage - 1 if kept is not None else (earlier[0] if earlier else None)
        first_model = kept if kept is not None else (self.load_stage_model(first) if first is not None else None)
        del kept
        (new_feats, *first_feats), labels = self._extract([self._student] + ([first_model] if first_model is not None else []), loader)
        del first_model
        for user in users:
            user.add_stage(new_feats, labels)
        for t in earlier:
            if t == first:
                old = first_feats[0]
            else:
                old_model = self.load_stage_model(t)
                (old,), _ = self._extract([old_model], loader)
                del old_model
            for user in users:
                if t in user.stages_to_measure():
                    user.update_drift(old, new_feats, stage=t)

    def _embedding_loader(self, dataset: Dataset) -> EmbeddingView:
        return self.loaders.embed(dataset)

    def _extract(self, model, loader: EmbeddingView, indices=None):
        """Embeddings of ``loader``'s items (``indices``, default all) in order by ``model`` (or a list of
        models, each batch decoded once); under torchrun each rank embeds a shard and all get the whole."""
        cfg = self.config
        if indices is None:
            indices = np.arange(len(loader.dataset))
        if not distributed.is_active():
            return extract_embeddings(model, loader(indices), cfg.eval_batch_size, device=self.device, amp=cfg.amp)
        n = len(indices)
        emb, labels = extract_embeddings(model, loader(np.asarray(indices)[distributed.shard(n)]), cfg.eval_batch_size,
                                         device=self.device, amp=cfg.amp)
        comm = self.device if self.device.type == "cuda" else torch.device("cpu")  # NCCL moves CUDA tensors only
        gather = lambda x: distributed.gather_rows(x.to(comm), n).cpu()  # noqa: E731
        emb = gather(emb) if torch.is_tensor(emb) else [gather(e) for e in emb]
        return emb, gather(labels)

    def seen_test_positions(self, stage: int) -> np.ndarray:
        """Positions in the test set of the items whose classes arrived in stages ≤ ``stage``."""
        return np.flatnonzero([self.class_to_stage[int(c)] <= stage for c in self.test_labels])

    def _evaluate(self, stage: int) -> dict:
        seen = self.seen_test_positions(stage)
        t0 = time.perf_counter()
        emb, labels = self._extract(self._student, self._embedding_loader(self.test_dataset), seen)
        embed_seconds = time.perf_counter() - t0
        if self.gallery is not None:  # every rank keeps the stored gallery; rank 0 reports
            new = np.array([self.class_to_stage[int(c)] == stage for c in labels])
            self.gallery.store(emb[torch.from_numpy(new)], seen[new])
        results = None
        if distributed.is_main():  # one search, its result sent to every rank
            results = stage_recalls(emb, labels, self.class_to_stage, stage, self.config.ks)
            if self.gallery is not None:
                # every column, (d) included, by one kernel: the run's own search above may be FAISS's
                results["gallery"] = self.gallery.report(emb, seen, labels, self.class_to_stage, stage, ks=(1,),
                                                         reembed_seconds=embed_seconds, device=self.device)
        return distributed.broadcast_object(results)

    # ----------------------------------------------------------------- models and checkpoints
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

    def _stage_dir(self, stage: int) -> Path:
        return self.directory.stage_dir(stage)

    def run_identity(self) -> dict:
        """What determines this run's numbers; a run_dir holding another identity is refused."""
        ident = {
            "config": {k: v for k, v in self.config.to_dict().items() if k not in self._not_identity()},
            "class_to_stage": {str(k): v for k, v in sorted(self.class_to_stage.items())},
            "data": {
                "train": [identity.dataset_fingerprint(d) for d in self.train_stages],
                "prototype": [identity.dataset_fingerprint(d) for d in self.prototype_stages],
                "test": identity.dataset_fingerprint(self.test_dataset),
            },
            "model": identity.model_fingerprint(self._fingerprint_model()),
            "metric_loss": identity.describe(self.metric_loss),
            "miner": identity.describe(self.miner),
            "initial_weights": identity.state_dict_sha256(self.initial_state_dict),
            "tags": self.identity_tags,
        }
        # added later, only where not the default: run directories of earlier versions stay resumable
        if self.optimization is not None:
            ident["optimization"] = dict(self.optimization, lr_scheduler_step=self.lr_scheduler_step)
        if training_state(self._initial_metric_loss):
            ident["metric_loss_state"] = identity.state_dict_sha256(
                {k: v for k, v in training_state(self._initial_metric_loss).items() if torch.is_tensor(v)})
        if distributed.world_size() > 1:
            ident["world_size"] = distributed.world_size()
        return ident

    def _fingerprint_model(self) -> torch.nn.Module:
        """One network from the factory, on the meta device where it builds there, for both fingerprints."""
        if getattr(self, "_meta_model", None) is None:
            self._meta_model = identity.build_for_fingerprint(self.model_factory)
        return self._meta_model

    def check_inputs_finite(self) -> None:
        """Every item the run will train on or embed has finite inputs, checked before the first stage trains
        (a NaN in the test set, in a class the sampler never draws or in the prototype dataset would
        otherwise surface stages later, without the dataset's name). A ``TensorDataset`` is checked whole
        at once; an ``ImageListDataset`` decodes pixels, finite by construction; any other dataset is read
        once through ``__getitem__`` (one pass of its items, as one evaluation decodes them)."""
        checked: set[int] = set()
        for name, base in self._named_bases(("training", self.train_stages), ("prototype", self.prototype_stages),
                                            ("test", [self.test_dataset])):
            if id(base) in checked or isinstance(getattr(base, "items", None), ImageItems):
                continue
            checked.add(id(base))
            if isinstance(base, TensorDataset):
                for t in base.tensors:
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        bad = int(torch.nonzero(~torch.isfinite(t.reshape(len(t), -1)).all(1))[0, 0])
                        raise ValueError(f"the {name} dataset holds NaN or inf inputs (item {bad} first): nothing "
                                         "non-finite is trained on or embedded; clean or drop those items")
                continue
            # in the run's worker processes when it has them: the pass decodes what an evaluation decodes
            loader = torch.utils.data.DataLoader(base, batch_size=64, num_workers=self.config.num_workers,
                                                 collate_fn=_finite_flags)
            start = 0
            for flags in loader:
                if not all(flags):
                    i = start + flags.index(False)
                    raise ValueError(f"the {name} dataset ({type(base).__name__}) yields NaN or inf at item {i}: "
                                     "nothing non-finite is trained on or embedded; clean or drop those items")
                start += len(flags)

    def content_records(self) -> dict:
        """What the identity's descriptions cannot see, compared with the run directory's records
        (``data_files.json``): the image files' sizes, the model's code, and a seeded sample of each
        dataset's items as ``__getitem__`` returns them (a ``TensorDataset`` is in the identity whole)."""
        records = dict(self.image_file_sizes)
        records["model_code"] = identity.model_code_fingerprint(self._fingerprint_model(), self.model_factory)
        samples: dict[int, str] = {}  # training and prototype datasets may share a base
        for name, base in self._named_bases(("training", self.train_stages), ("prototype", self.prototype_stages),
                                            ("test", [self.test_dataset])):
            if isinstance(base, TensorDataset):
                continue
            if id(base) not in samples:
                samples[id(base)] = identity.item_sample_fingerprint(base)
            records.setdefault(f"items:{name}", []).append(samples[id(base)])
        return records

    def _not_identity(self) -> tuple[str, ...]:
        # settings that do not change what is trained; gram_scope matters only with several ranks; a run
        # with the gallery report keeps files a run without it lacks (run directories of earlier versions,
        # which had no such setting, stay resumable)
        skip = ("device", "eval_batch_size", "num_workers")
        skip += ("gram_scope",) if distributed.world_size() == 1 else ()
        # likewise the defaults of settings added later: run directories of earlier versions stay resumable
        skip += () if self.config.gallery_report else ("gallery_report",)
        return skip + (("embed_decode",) if self.config.embed_decode == "workers" else ())

    def _save_stage(self, stage: int, results: dict, epoch_losses: list[dict], seconds: float) -> None:
        files = {"model.pt": self._student.state_dict(), "drift.pt": self.compensator.state_dict()}
        loss_state = training_state(self.metric_loss)
        if loss_state:  # F_p's metric loss goes on training with it in the next stage
            files["metric_loss.pt"] = loss_state
        if self.gallery is not None:
            files["gallery.pt"] = self.gallery.stage_state(stage)
        log = {"stage": stage, "epoch_losses": epoch_losses, "seconds": seconds, "phase_seconds": dict(self.phase_seconds)}
        # stage.json is written last, with each file's SHA-256: its presence marks the stage complete
        self.directory.save_stage(stage, files, {"results": stage_result_to_json(results), "log": log})
        self.stage_results.append(results)
        self.stage_logs.append(log)

    def _resume(self) -> int:
        """Check the run directory against this run's identity and return the first stage still to train."""
        self.directory.check_identity(self.run_identity(), fresh=self.fresh, data_files=self.content_records())
        self._meta_model = None  # a network held through the run would count against the memory guarantees
        self.check_inputs_finite()
        done = self.directory.completed_stages(len(self.train_stages))
        for doc in done:
            try:
                self.stage_results.append(stage_result_from_json(doc["results"]))
            except (KeyError, TypeError, ValueError) as e:
                path = self._stage_dir(len(self.stage_results)) / "stage.json"
                raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); delete its stage directory to retrain it") from e
            self.stage_logs.append(doc["log"])
        stage = len(done)
        if stage > 0:
            self.compensator.load_state_dict(self.directory.load_stage_file(stage - 1, "drift.pt"))
            if training_state(self.metric_loss):
                load_training_state(self.metric_loss, self.directory.load_stage_file(stage - 1, "metric_loss.pt"))
            if self.gallery is not None:
                self.gallery.load_stage_states([self.directory.load_stage_file(b, "gallery.pt") for b in range(stage)])
            if not self.quiet:
                print(f"[{self.config.method}] resuming {self.run_dir} at stage {stage}", flush=True)
        return stage

    def _load_epoch_checkpoint(self, stage: int, models: dict, optimizers: dict, losses: dict,
                               schedulers: dict) -> tuple[int, list[dict]]:
        """Restore the last finished epoch of ``stage`` if the run was interrupted in it.

        Returns (that epoch, the per-epoch loss log so far); (0, []) when the stage starts afresh.
        """
        state = self.directory.load_in_progress(map_location=self.device)
        path = self.run_dir / "in_progress.pt"
        if state is None:
            return 0, []
        if not isinstance(state, dict) or not {"stage", "epoch", "models", "epoch_losses"} <= set(state):
            raise RunDirectoryError(f"{path} is not an epoch checkpoint of this project; delete it to retrain stage {stage}")
        if isinstance(state["stage"], int) and state["stage"] < stage:
            return 0, []  # the previous stage's, left by a run killed as that stage completed
        epochs = self._epochs(stage)
        if state["stage"] != stage or not isinstance(state["epoch"], int) or not 1 <= state["epoch"] <= epochs:
            raise RunDirectoryError(
                f"{path} holds stage {state['stage']!r}, epoch {state['epoch']!r}, but this run resumes stage {stage} "
                f"of epochs 1–{epochs}; delete it to retrain stage {stage} from its start")
        if set(state["models"]) != set(models) - {"teacher_trunk"}:
            raise RunDirectoryError(f"{path} holds networks {sorted(state['models'])}, this stage trains "
                                    f"{sorted(set(models) - {'teacher_trunk'})}; delete it to retrain stage {stage}")
        if "optimizers" not in state and state["epoch"] < epochs:
            raise RunDirectoryError(f"{self.run_dir / 'in_progress.pt'} has no optimizer state for epoch {state['epoch']} "
                                    f"of {epochs}; delete it to retrain stage {stage}")
        for k, sd in state["models"].items():
            models[k].load_state_dict(sd)
        for k, sd in state.get("optimizers", {}).items():  # none after the last epoch: no step follows
            optimizers[k].load_state_dict(sd)
        for k, sd in state.get("losses", {}).items():
            if sd:
                load_training_state(losses[k], sd)
        for k, sd in state.get("lr_schedulers", {}).items():
            schedulers[k].load_state_dict(sd)
        if not self.quiet:
            print(f"[{self.config.method}] resuming stage {stage} after epoch {state['epoch']}", flush=True)
        return int(state["epoch"]), list(state["epoch_losses"])
