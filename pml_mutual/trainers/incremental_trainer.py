from __future__ import annotations

import logging

import torch
import tqdm
from pytorch_metric_learning.trainers import MetricLossOnly
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.key_checker import KeyChecker

from .. import distributed
from ..evaluation.stages import autocast_dtype
from ..losses.gram_distillation import gram_distillation_losses
from ..losses.state import own_copy, trainable_parameters
from .loss_log import LossLog, NonFiniteLossError  # noqa: F401  (NonFiniteLossError: public here since the first release)
from .stage_loader import StageLoaderMixin

LOGGER = logging.getLogger("pml_mutual")

SUPPORT = ("support_trunk", "support_embedder")
TEACHER = ("teacher_trunk", "teacher_embedder")


class IncrementalTrainer(StageLoaderMixin, MetricLossOnly):
    """One stage of online metric learning by mutual distillation (paper Eq. 1, with Eq. 6 for L_corr).

    A PML trainer: ``models`` holds the student F_p as ``trunk`` (+ ``embedder``), and optionally the
    supporting student F_s as ``support_trunk`` (+ ``support_embedder``) and the frozen teacher
    F_{i−1} as ``teacher_trunk`` (+ ``teacher_embedder``). ``loss_funcs`` holds ``metric_loss`` (used
    by both students, e.g. PML's ``TripletMarginLoss`` with a batch-hard ``tuple_miner``) and, when the
    corresponding model is present, ``correlation_loss`` (a ``GramCorrelationLoss``) and
    ``mutual_loss`` (a ``MutualGramLoss``). ``loss_weights`` are λ1 (``metric_loss`` and
    ``support_metric_loss``), λ2 (``correlation_loss``) and λ3 (``mutual_loss``).

    With a ``drift_compensator`` holding earlier stages, the correlation loss is summed over the
    real teacher features and the virtual features of every earlier stage (Eq. 6). L_mutual and L_corr
    over all teachers are computed together by :func:`~pml_mutual.losses.gram_distillation_losses`: one
    stacked computation for the default losses (a fixed number of kernel launches however many
    teachers), the modules called one by one for any other.

    Which terms exist follows from the models given: no teacher → no L_corr, no F_s → no L_mutual and
    no second metric loss, so fine-tuning is this trainer with only ``trunk``. With a teacher,
    ``compatibility_loss`` (a :class:`~pml_mutual.losses.ProjectedDistillationLoss`, beyond the paper) may
    stand beside L_corr or instead of it.

    ``epoch_start_hook(trainer)`` runs before each epoch (the orchestrator seeds RNGs there so an
    epoch can be replayed exactly); ``quiet`` hides the progress bar. ``freeze_batchnorm_in`` names the
    trained models whose BatchNorm layers stay in eval mode (default, with PML's
    ``freeze_trunk_batchnorm=True``: both students).

    As in PML's trainers, ``optimizers`` and ``lr_schedulers`` take a key per model or loss
    (``metric_loss_optimizer``, ``support_metric_loss_optimizer``, ``<name>_scheduler_by_iteration`` /
    ``_by_epoch`` / ``_by_plateau``). F_s trains its own copy of the metric loss and of the tuple miner unless
    ``loss_funcs["support_metric_loss"]`` / ``mining_funcs["support_tuple_miner"]`` are given; a copied loss
    with parameters gets an optimizer of the kind and settings of ``metric_loss_optimizer``. A loss with
    trainable parameters and no optimizer is refused (its weights would never move).

    ``loader_pool`` (a :class:`~pml_mutual.data.loaders.LoaderPool`) supplies the training loader, so
    worker processes persist across stages; without it the trainer builds its own for its epochs.

    Under ``torchrun`` (students wrapped in ``DistributedDataParallel``, see
    :class:`~pml_mutual.OnlineLearner`),
    ``gram_scope="global"`` computes every loss on the batch gathered from all ranks, so N ranks with
    batches of B train exactly like one process with N·B; ``"local"`` keeps each rank's batch.
    """

    def __init__(
        self,
        *args,
        drift_compensator=None,
        epoch_start_hook=None,
        quiet: bool = False,
        freeze_batchnorm_in=None,
        amp: bool = False,
        gram_scope: str = "global",
        context: str = "",
        loader_pool=None,
        **kwargs,
    ):
        self.context = context  # prefix of error messages, e.g. "stage 2, "
        self.loader_pool = loader_pool  # a data.loaders.LoaderPool whose workers serve every stage of a run
        self.gram_scope = distributed.check_gram_scope(gram_scope)
        self.amp = amp
        self.drift_compensator = drift_compensator
        self.freeze_batchnorm_in = freeze_batchnorm_in
        self.epoch_start_hook = epoch_start_hook
        self.quiet = quiet
        super().__init__(*args, **kwargs)
        # PML's key schema (only read while constructing) holds lambdas closing over the trainer: that
        # cycle would keep every model alive until a full gc.collect (~0.2 s per call with torch loaded)
        self.schema = None

    def custom_setup(self):
        self.has_support = "support_trunk" in self.models
        self.has_teacher = "teacher_trunk" in self.models
        self.models.setdefault("embedder", torch.nn.Identity())
        for prefix, present in (("support", self.has_support), ("teacher", self.has_teacher)):
            if present:
                self.models.setdefault(f"{prefix}_embedder", torch.nn.Identity())
        if self.has_support:
            support_copies(self.loss_funcs, self.optimizers, self.mining_funcs)
        check_distillation_losses(self.loss_funcs, self.has_teacher, self.has_support)
        self.loss_names = list(self.loss_funcs.keys())
        refuse_untrained_loss_parameters(self.loss_funcs, self.optimizers, self.freeze_these)
        self.initialize_data_device()  # PML resolves data_device=None only after custom_setup
        self.device_type = torch.device(self.data_device).type
        self.autocast_dtype = autocast_dtype(torch.device(self.data_device))
        # bfloat16 needs no loss scaling; float16 (GPUs without bfloat16) does, at one sync per step
        self.grad_scaler = (
            torch.amp.GradScaler("cuda") if self.amp and self.autocast_dtype == torch.float16 else None
        )
        self.dataloader = None
        if self.has_teacher:
            self.freeze_these = tuple(set(self.freeze_these) | set(TEACHER))

    def modify_schema(self):
        students = ["trunk", "embedder"] + list(SUPPORT)
        losses = [
            "metric_loss",
            "support_metric_loss",
            "correlation_loss",
            "mutual_loss",
            "compatibility_loss",
        ]
        # Optional models and losses are absent on purpose (fine-tuning has only "trunk"): no warnings.
        self.schema["models"] = KeyChecker(students + list(TEACHER), essential=["trunk"], important=[])
        self.schema["loss_funcs"] = KeyChecker(losses, essential=["metric_loss"], important=[])
        self.schema["mining_funcs"] = KeyChecker(
            ["subset_batch_miner", "tuple_miner", "support_tuple_miner"], warn_empty=False, important=[]
        )
        trained = ["trunk"] + (["support_trunk"] if "support_trunk" in self.models else [])
        # as PML's trainers: an optimizer and LR schedulers (by iteration, epoch or plateau) for any model
        # or loss the trainer holds
        self.schema["optimizers"] = KeyChecker(
            [f"{k}_optimizer" for k in students + losses], important=[f"{k}_optimizer" for k in trained]
        )
        suffixes = self.allowed_lr_scheduler_key_suffixes.values()
        self.schema["lr_schedulers"] = KeyChecker(
            [k + s for s in suffixes for k in students + losses], warn_empty=False, important=[]
        )

    def calculate_loss(self, curr_batch):
        # AMP: the networks run under autocast (bfloat16; float16 + GradScaler on GPUs without it);
        # the Gram losses compute their softmax/KL in float32 regardless.
        with torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype, enabled=self.amp):
            self._calculate_loss(curr_batch)

    def _calculate_loss(self, curr_batch):
        data, labels = curr_batch
        # Under torchrun with gram_scope="global", every loss sees the batch of all ranks (gathered with
        # gradient to each rank's slice): N ranks × B behave as one process with N·B.
        scope = lambda x: x  # noqa: E731
        if self.gram_scope == "global" and distributed.world_size() > 1:
            scope = distributed.gather_with_grad
            labels = distributed.gather(c_f.to_device(labels, device=self.data_device))
        emb_p = scope(self.compute_embeddings(data))
        self.losses["metric_loss"] = self.metric_loss(emb_p, labels)
        emb_s = teachers = None
        if self.has_support:
            emb_s = scope(self.compute_embeddings(data, prefix="support_"))
            self.losses["support_metric_loss"] = self.metric_loss(emb_s, labels, "support_metric_loss")
        if self.has_teacher:
            with torch.no_grad():
                emb_o = scope(self.compute_embeddings(data, prefix="teacher_"))
            if "compatibility_loss" in self.loss_funcs:  # F_p through P onto F_{i-1} (beyond the paper)
                self.losses["compatibility_loss"] = self.loss_funcs["compatibility_loss"](
                    emb_p, ref_emb=emb_o
                )
            if "correlation_loss" in self.loss_funcs:
                teachers = [emb_o]
                if self.drift_compensator is not None:  # Eq. 6: the virtual features of every earlier stage
                    teachers.append(self.drift_compensator.virtual_feature_stack(emb_o))
        # L_mutual and L_corr over all teachers as one stacked computation (few kernel launches)
        self.losses.update(
            gram_distillation_losses(
                emb_p,
                emb_s,
                teachers,
                correlation_loss=self.loss_funcs.get("correlation_loss"),
                mutual_loss=self.loss_funcs.get("mutual_loss"),
            )
        )

    def backward(self):
        if self.grad_scaler is not None:
            self.grad_scaler.scale(self.losses["total_loss"]).backward()
        else:
            self.losses["total_loss"].backward()

    def clip_gradients(self):
        if self.grad_scaler is not None and self.gradient_clippers:
            for opt in self.optimizers.values():
                self.grad_scaler.unscale_(opt)
        super().clip_gradients()

    def step_optimizers(self):
        if self.grad_scaler is None:
            return super().step_optimizers()
        for k, opt in self.optimizers.items():
            if c_f.regex_replace("_optimizer$", "", k) not in self.freeze_these:
                self.grad_scaler.step(opt)
        self.grad_scaler.update()

    def metric_loss(self, embeddings, labels, name="metric_loss"):
        miner = self.mining_funcs.get("support_tuple_miner" if name.startswith("support_") else "tuple_miner")
        indices_tuple = miner(embeddings, labels) if miner is not None else None
        return self.loss_funcs[name](embeddings, labels, indices_tuple)

    def compute_embeddings(self, data, prefix: str = ""):
        return self.models[f"{prefix}embedder"](self.models[f"{prefix}trunk"](data))

    def maybe_freeze_trunk_batchnorm(self):
        # The paper freezes BatchNorm in every trained network, not only PML's "trunk".
        names = self.freeze_batchnorm_in
        if names is None:
            names = ("trunk", "support_trunk") if self.freeze_trunk_batchnorm else ()
        for k in names:
            if k in self.models:
                self.models[k].apply(c_f.set_layers_to_eval("BatchNorm"))

    def train(self, start_epoch: int = 1, num_epochs: int = 1):
        """PML's loop, with each epoch's batches drawn afresh after ``epoch_start_hook`` so every epoch
        depends only on the seed and the weights it starts from: that is what makes resume exact.

        Loss terms stay on the device (a :class:`LossLog`): their sums and a record of the first iteration
        at which each term was not finite are read once per epoch (on CPU, where reading is free, after every
        step),
        and a non-finite term raises :class:`NonFiniteLossError` before ``end_of_epoch_hook`` can
        checkpoint anything.
        """
        for self.epoch in range(start_epoch, num_epochs + 1):
            if self.epoch_start_hook is not None:
                self.epoch_start_hook(self)
            self.initialize_dataloader()
            self.set_to_train()
            log = LossLog()
            pbar = tqdm.tqdm(
                range(self.iterations_per_epoch), disable=self.quiet, leave=False, desc=f"epoch {self.epoch}"
            )
            for self.iteration in pbar:
                self.forward_and_backward()
                log.add(self.losses, self.iteration)
                if self.device_type == "cpu":
                    self.raise_if_not_finite(log)
                self.end_of_iteration_hook(self)
                self.step_lr_schedulers(end_of_epoch=False)
            self.raise_if_not_finite(log)
            self.step_lr_schedulers(end_of_epoch=True)
            self.epoch_losses = {k: v / max(1, self.iterations_per_epoch) for k, v in log.sums().items()}
            if not self.quiet:
                pbar.write(f"epoch {self.epoch}: total_loss={self.epoch_losses.get('total_loss', 0.0):.4f}")
            LOGGER.info(
                "epoch %d: %s", self.epoch, " ".join(f"{k}={v:.5f}" for k, v in self.epoch_losses.items())
            )
            self.zero_losses()
            if self.end_of_epoch_hook(self) is False:
                break
        self.close_dataloader()

    def raise_if_not_finite(self, log: LossLog) -> None:
        """Raise naming the epoch, the first iteration and the loss terms that were NaN or inf."""
        bad = {k: i for k, i in log.first_not_finite().items() if i >= 0}
        if bad:
            it = min(bad.values())
            terms = ", ".join(k for k, i in bad.items() if i == it)
            raise NonFiniteLossError(
                f"{self.context}epoch {self.epoch}, iteration {it + 1}: non-finite loss ({terms}); "
                "training stopped before anything was checkpointed"
            )


def support_copies(loss_funcs: dict, optimizers: dict, mining_funcs: dict) -> None:
    """F_s trains its own copy of the metric loss and of the tuple miner (unless given): one ArcFace W
    updated by two networks, or one memory queue filled with both students' embeddings, would be another
    loss than the paper's two triplet terms. A copied loss with parameters gets an optimizer of the kind
    and settings of ``metric_loss_optimizer`` (its parameters did not exist when the optimizers were
    built)."""
    if "support_metric_loss" not in loss_funcs:
        copied = loss_funcs["support_metric_loss"] = own_copy(loss_funcs["metric_loss"])
        given = optimizers.get("metric_loss_optimizer")
        if (
            given is not None
            and trainable_parameters(copied)
            and "support_metric_loss_optimizer" not in optimizers
        ):
            optimizers["support_metric_loss_optimizer"] = type(given)(copied.parameters(), **given.defaults)
    if "tuple_miner" in mining_funcs and "support_tuple_miner" not in mining_funcs:
        mining_funcs["support_tuple_miner"] = own_copy(mining_funcs["tuple_miner"])


def check_distillation_losses(loss_funcs: dict, has_teacher: bool, has_support: bool) -> None:
    """A teacher with L_corr or the compatibility term (or both), either only with a teacher; L_mutual exactly
    when F_s is given (ValueError otherwise)."""
    teacher_terms = [k for k in ("correlation_loss", "compatibility_loss") if k in loss_funcs]
    if has_teacher and not teacher_terms:
        raise ValueError(
            "loss_funcs needs 'correlation_loss' (or 'compatibility_loss') when the teacher model is given"
        )
    for name in teacher_terms:
        if not has_teacher:
            raise ValueError(f"loss_funcs has {name!r} but models has no teacher_trunk")
    if has_support and "mutual_loss" not in loss_funcs:
        raise ValueError("loss_funcs needs 'mutual_loss' when the support model is given")
    if not has_support and "mutual_loss" in loss_funcs:
        raise ValueError("loss_funcs has 'mutual_loss' but models has no support_trunk")


def refuse_untrained_loss_parameters(loss_funcs: dict, optimizers: dict, frozen) -> None:
    """A loss with trainable parameters (ArcFace, ProxyAnchor, ...) needs an optimizer of its own
    (``<loss name>_optimizer``, as in PML), or must be frozen: its weights would stay at their random
    start."""
    for name, loss in loss_funcs.items():
        if trainable_parameters(loss) and f"{name}_optimizer" not in optimizers and name not in frozen:
            raise ValueError(
                f"loss_funcs[{name!r}] ({type(loss).__name__}) has trainable parameters but optimizers "
                f"has no {name + '_optimizer'!r}: pass one (e.g. torch.optim.SGD(loss.parameters(), "
                f"lr=...)) or name {name!r} in freeze_these"
            )
