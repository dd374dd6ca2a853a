from __future__ import annotations

import logging

import torch
import tqdm
from pytorch_metric_learning.trainers import MetricLossOnly
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.key_checker import KeyChecker

from .. import distributed
from ..data.loaders import train_loader
from ..evaluation.stages import autocast_dtype
from ..losses.gram_distillation import gram_distillation_losses
from ..losses.state import own_copy, trainable_parameters

LOGGER = logging.getLogger("pml_mutual")

SUPPORT = ("support_trunk", "support_embedder")
TEACHER = ("teacher_trunk", "teacher_embedder")


class IncrementalTrainer(MetricLossOnly):
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
    no second metric loss, so fine-tuning is this trainer with only ``trunk``.

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

    Under ``torchrun`` (students wrapped in ``DistributedDataParallel``, see :class:`~pml_mutual.OnlineLearner`),
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
            # F_s trains its own copy: one ArcFace W updated by two networks, or one memory queue filled
            # with both students' embeddings, would be another loss than the paper's two triplet terms
            if "support_metric_loss" not in self.loss_funcs:
                copied = self.loss_funcs["support_metric_loss"] = own_copy(self.loss_funcs["metric_loss"])
                given = self.optimizers.get("metric_loss_optimizer")
                if given is not None and trainable_parameters(copied) and "support_metric_loss_optimizer" not in self.optimizers:
                    # the copy's parameters did not exist when the optimizers were built: the same kind of
                    # optimizer with the same settings
                    self.optimizers["support_metric_loss_optimizer"] = type(given)(copied.parameters(), **given.defaults)
            if "tuple_miner" in self.mining_funcs and "support_tuple_miner" not in self.mining_funcs:
                self.mining_funcs["support_tuple_miner"] = own_copy(self.mining_funcs["tuple_miner"])
        required = {"correlation_loss": self.has_teacher, "mutual_loss": self.has_support}
        for name, needed in required.items():
            if needed and name not in self.loss_funcs:
                raise ValueError(f"loss_funcs needs {name!r} when the {name.split('_')[0]} model is given")
            if not needed and name in self.loss_funcs:
                raise ValueError(f"loss_funcs has {name!r} but models has no {'teacher' if name[0] == 'c' else 'support'}_trunk")
        self.loss_names = list(self.loss_funcs.keys())
        self.refuse_untrained_loss_parameters()
        self.initialize_data_device()  # PML resolves data_device=None only after custom_setup
        self.device_type = torch.device(self.data_device).type
        self.autocast_dtype = autocast_dtype(torch.device(self.data_device))
        # bfloat16 needs no loss scaling; float16 (GPUs without bfloat16) does, at one sync per step
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.amp and self.autocast_dtype == torch.float16 else None
        self.dataloader = None
        if self.has_teacher:
            self.freeze_these = tuple(set(self.freeze_these) | set(TEACHER))

    def refuse_untrained_loss_parameters(self):
        """A loss with trainable parameters (ArcFace, ProxyAnchor, ...) needs an optimizer of its own
        (``<loss name>_optimizer``, as in PML), or must be frozen: its weights would stay at their random
        start."""
        for name, loss in self.loss_funcs.items():
            if trainable_parameters(loss) and f"{name}_optimizer" not in self.optimizers and name not in self.freeze_these:
                raise ValueError(
                    f"loss_funcs[{name!r}] ({type(loss).__name__}) has trainable parameters but optimizers has no "
                    f"{name + '_optimizer'!r}: pass one (e.g. torch.optim.SGD(loss.parameters(), lr=...)) or name "
                    f"{name!r} in freeze_these"
                )

    def modify_schema(self):
        students = ["trunk", "embedder"] + list(SUPPORT)
        losses = ["metric_loss", "support_metric_loss", "correlation_loss", "mutual_loss"]
        # Optional models and losses are absent on purpose (fine-tuning has only "trunk"): no warnings.
        self.schema["models"] = KeyChecker(students + list(TEACHER), essential=["trunk"], important=[])
        self.schema["loss_funcs"] = KeyChecker(losses, essential=["metric_loss"], important=[])
        self.schema["mining_funcs"] = KeyChecker(
            ["subset_batch_miner", "tuple_miner", "support_tuple_miner"], warn_empty=False, important=[])
        trained = ["trunk"] + (["support_trunk"] if "support_trunk" in self.models else [])
        # as PML's trainers: an optimizer and LR schedulers (by iteration, epoch or plateau) for any model
        # or loss the trainer holds
        self.schema["optimizers"] = KeyChecker(
            [f"{k}_optimizer" for k in students + losses], important=[f"{k}_optimizer" for k in trained]
        )
        suffixes = self.allowed_lr_scheduler_key_suffixes.values()
        self.schema["lr_schedulers"] = KeyChecker(
            [k + s for s in suffixes for k in students + losses], warn_empty=False, important=[])

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
            teachers = [emb_o]
            if self.drift_compensator is not None:  # Eq. 6: the virtual features of every earlier stage too
                teachers.append(self.drift_compensator.virtual_feature_stack(emb_o))
        # L_mutual and L_corr over all teachers as one stacked computation (few kernel launches)
        self.losses.update(gram_distillation_losses(
            emb_p, emb_s, teachers,
            correlation_loss=self.loss_funcs.get("correlation_loss"), mutual_loss=self.loss_funcs.get("mutual_loss"),
        ))

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

    def initialize_dataloader(self):
        """One loader for the whole stage: its workers persist from epoch to epoch, and each epoch's
        batches come from ``self.sampler`` (set by ``epoch_start_hook``) with augmentations seeded per
        batch from torch's generator as the epoch starts (see :mod:`pml_mutual.data.loaders`)."""
        if self.dataloader is None:
            if self.loader_pool is not None:  # the run's loader: its workers outlive this stage
                if self.loader_pool.batch_size != self.batch_size:
                    raise ValueError(f"loader_pool batches {self.loader_pool.batch_size} items, the trainer {self.batch_size}")
                self.dataloader, self.batch_sampler, self.index_map = self.loader_pool.train(self.dataset, self.collate_fn)
            else:
                self.dataloader, self.batch_sampler = train_loader(
                    self.dataset, self.batch_size, self.dataloader_num_workers,
                    pin_memory=self.device_type == "cuda", collate_fn=self.collate_fn,
                )
                self.index_map = None
        sampler = self.sampler if self.sampler is not None else torch.utils.data.RandomSampler(self.dataset)  # PML: shuffle
        self.batch_sampler.set_epoch(sampler, int(torch.randint(2**62, ()).item()), self.index_map)  # CPU generator: no GPU sync
        self.dataloader_iter = iter(self.dataloader)

    def get_batch(self):
        self.dataloader_iter, curr_batch = c_f.try_next_on_generator(self.dataloader_iter, self.dataloader)
        data, labels = self.data_and_label_getter(curr_batch)
        labels = c_f.process_label(labels, self.label_hierarchy_level, self.label_mapper)
        # pinned host memory → device without blocking the host; the step queues behind the copy
        data = data.to(self.data_device, dtype=self.dtype, non_blocking=True) if self.dtype else data.to(self.data_device, non_blocking=True)
        labels = labels.to(self.data_device, non_blocking=True)
        return self.maybe_do_batch_mining(data, labels)

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
        at which each term was not finite are read once per epoch (on CPU, where reading is free, after every step),
        and a non-finite term raises :class:`NonFiniteLossError` before ``end_of_epoch_hook`` can
        checkpoint anything.
        """
        for self.epoch in range(start_epoch, num_epochs + 1):
            if self.epoch_start_hook is not None:
                self.epoch_start_hook(self)
            self.initialize_dataloader()
            self.set_to_train()
            log = LossLog()
            pbar = tqdm.tqdm(range(self.iterations_per_epoch), disable=self.quiet, leave=False, desc=f"epoch {self.epoch}")
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
            LOGGER.info("epoch %d: %s", self.epoch, " ".join(f"{k}={v:.5f}" for k, v in self.epoch_losses.items()))
            self.zero_losses()
            if self.end_of_epoch_hook(self) is False:
                break
        self.close_dataloader()

    def close_dataloader(self) -> None:
        """Let go of the loader: its workers end now (or stay with the ``loader_pool`` that owns them).
        Left to the garbage collector, their shutdown would run inside a later ``gc.collect``, where
        each worker is only terminated after DataLoader's 5 s status interval."""
        self.dataloader_iter = None
        self.dataloader = None

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


class LossLog:
    """An epoch's loss terms, kept on their device: per term, the sum and the first iteration at which it
    was not finite. The tensor terms of a step are stacked into one vector, so a step adds a fixed
    handful of ops (kernel launches on a GPU) however many terms there are, and nothing is read back
    until :meth:`sums` or :meth:`first_not_finite` (one read each). Sums accumulate in the terms' own
    order and float32, as adding each term to its own sum would."""

    def __init__(self):
        self._groups: dict[tuple[str, ...], list] = {}  # names of a step's tensor terms → [sums, first bad]
        self._plain: dict[str, float] = {}  # terms that were not tensors (PML's 0 before a term is computed)

    def add(self, losses: dict, iteration: int) -> None:
        names = tuple(k for k, v in losses.items() if torch.is_tensor(v))
        for k, v in losses.items():
            if not torch.is_tensor(v):
                self._plain[k] = self._plain.get(k, 0.0) + float(v)
        if not names:
            return
        values = torch.stack([losses[k].detach().reshape(()).float() for k in names])
        # x − x is 0 for finite x and NaN for NaN and ±inf: 2 ops, where torch.isfinite dispatches 4
        bad = (values - values) != 0
        group = self._groups.get(names)
        if group is None:
            self._groups[names] = [values, torch.where(bad, iteration, -1)]
            return
        sums, first_bad = group
        group[0] = sums + values
        group[1] = torch.where(bad & (first_bad < 0), iteration, first_bad)

    def sums(self) -> dict[str, float]:
        out = dict(self._plain)
        for names, (sums, _) in self._groups.items():
            for k, v in zip(names, sums.tolist()):  # one read per group of terms (one group in practice)
                out[k] = out.get(k, 0.0) + v
        return out

    def first_not_finite(self) -> dict[str, int]:
        """Term → the first iteration at which it was NaN or inf, or −1."""
        out: dict[str, int] = {}
        for names, (_, first) in self._groups.items():
            for k, i in zip(names, first.tolist()):
                if i >= 0 and (out.get(k, -1) < 0 or i < out[k]):
                    out[k] = i
                else:
                    out.setdefault(k, -1)
        return out


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf during training."""
