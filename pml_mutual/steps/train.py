"""The training step of a stage: F_p from F_{i−1}, F_s and the frozen teacher as the method needs them, one
:class:`~pml_mutual.trainers.IncrementalTrainer` run, an epoch checkpoint after every epoch (paper Eq. 1,
6)."""

from __future__ import annotations

import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import ConcatDataset, Dataset

from .. import distributed
from ..callbacks import StageContext
from ..data.stages import dataset_labels
from ..losses import GramCorrelationLoss, MutualGramLoss, ProjectedDistillationLoss
from ..losses.state import load_training_state, own_copy, trainable_parameters
from ..optimization import epoch_checkpoint, seed_everything
from ..run_dir import RunDirectoryError
from ..trainers import IncrementalTrainer


class TrainStep:
    """Builds the stage's networks, losses, optimizers and schedulers, resumes a killed epoch, trains.

    Hands over ``ctx.student`` (F_i), ``ctx.teacher`` (F_{i−1} when training held it, for drift
    measurement to embed with instead of reloading it) and ``ctx.epoch_losses``. Fires ``before_train``,
    ``after_epoch`` and ``after_train`` for a stage that trains."""

    name = "train"

    def run(self, learner, ctx: StageContext) -> None:
        cfg, method, stage = learner.config, learner.method, ctx.stage
        # F_{i-1}: the previous stage's deployed model, still in memory when that stage ran in this process
        # (its checkpoint was written from it: the same bits), else loaded from the checkpoint (a resume)
        previous, learner.deployed = learner.deployed, None
        teacher = None
        if stage > 0:
            teacher = previous if previous is not None else learner.load_stage_model(stage - 1)
        del previous
        # seeded once F_{i-1} is at hand: loading it builds a network, whose random initialisation draws
        # from the generator, and reusing it does not; the networks built below must not depend on which
        seed_everything(cfg.seed, stage, 0)
        student = learner.new_model()
        if stage == 0 and learner.initial_state_dict is not None:
            student.load_state_dict(learner.initial_state_dict)
        elif teacher is not None:
            student.load_state_dict(teacher.state_dict())  # F_p starts as F_{i-1}
        if not learner.trains(stage):
            del teacher
            ctx.student, ctx.epoch_losses = student, []
            return
        dataset = training_dataset(learner, stage)
        models = {"trunk": student}
        loss_funcs = {"metric_loss": learner.metric_loss.to(learner.device)}
        weights = {"metric_loss": cfg.lambda_metric}
        if stage > 0 and method.support:
            support = learner.new_model()
            if cfg.support_init == "teacher":
                support.load_state_dict(teacher.state_dict())
            models["support_trunk"] = support
            # F_s's own metric loss (and miner): from the loss as given when F_s starts fresh, from F_p's
            # when it starts as the teacher
            start_loss = learner.metric_loss if cfg.support_init == "teacher" else learner.initial_metric_loss
            loss_funcs["support_metric_loss"] = own_copy(start_loss).to(learner.device)
            loss_funcs["mutual_loss"] = MutualGramLoss(temperature=cfg.temperature, mode=cfg.mutual_mode)
            weights.update(support_metric_loss=cfg.lambda_metric, mutual_loss=cfg.lambda_mutual)
        if stage > 0 and (method.teacher or cfg.lambda_compat):
            models["teacher_trunk"] = teacher
        if stage > 0 and method.teacher:
            loss_funcs["correlation_loss"] = GramCorrelationLoss(
                temperature=cfg.temperature, direction=cfg.corr_direction
            )
            weights["correlation_loss"] = cfg.lambda_corr
        if stage > 0 and cfg.lambda_compat:
            # P is fresh each stage (F_i → F_{i-1}); trained, checkpointed and resumed like a loss's W
            loss_funcs["compatibility_loss"] = ProjectedDistillationLoss(
                embedding_size(teacher, learner.prototype_stages[stage])
            ).to(learner.device)
            weights["compatibility_loss"] = cfg.lambda_compat
        del teacher  # held by ``models`` only if the method distils from it
        trained = [k for k in models if k != "teacher_trunk"]
        trained_losses = {
            k: loss_funcs[k]
            for k in ("metric_loss", "support_metric_loss", "compatibility_loss")
            if k in loss_funcs
        }
        optimizers = {f"{k}_optimizer": learner.optimizer_factory(models[k].parameters()) for k in trained}
        # a loss's parameters (ArcFace's W, proxies) are trained with their network, by the same optimiser
        optimizers.update(
            {
                f"{k}_optimizer": learner.optimizer_factory(trainable_parameters(loss))
                for k, loss in trained_losses.items()
                if trainable_parameters(loss)
            }
        )
        suffix = f"_scheduler_by_{learner.lr_scheduler_step}"  # PML's key: stepped per epoch or per iteration
        schedulers = (
            {}
            if learner.lr_scheduler_factory is None
            else {
                k.removesuffix("_optimizer") + suffix: learner.lr_scheduler_factory(o)
                for k, o in optimizers.items()
            }
        )
        # F_s's own copy of the miner is the trainer's to make (IncrementalTrainer.custom_setup)
        mining = {"tuple_miner": learner.miner} if learner.miner is not None else {}
        labels = dataset_labels(dataset)

        def new_sampler():
            length = cfg.batch_size * cfg.iterations_per_epoch
            if distributed.is_active():  # one global class-balanced batch per step, split across ranks
                return distributed.DistributedMPerClassSampler(
                    labels, cfg.m_per_class, cfg.batch_size, length
                )
            return MPerClassSampler(labels, cfg.m_per_class, cfg.batch_size, length_before_new_iter=length)

        epochs = learner.epochs_of(stage)
        done_epochs, epoch_losses = load_epoch_checkpoint(
            learner, stage, models, optimizers, trained_losses, schedulers
        )
        use_virtual = method.virtual and learner.compensator.num_stages >= 2

        def epoch_start(trainer):
            seed_everything(cfg.seed, stage, trainer.epoch)
            # MPerClassSampler shuffles its class list in place: a fresh one per epoch keeps every
            # epoch a function of (seed, stage, epoch) alone, so a resumed epoch replays exactly.
            trainer.sampler = new_sampler()

        # models / optimizers are closure cells that the `del` after training empties (memory): these
        # hooks never run after it, so the names are bound whenever they run (ruff's F821 sees the del)
        def epoch_end(trainer):
            epoch_losses.append(dict(trainer.epoch_losses, epoch=trainer.epoch))
            state = epoch_checkpoint(
                stage,
                trainer.epoch,
                {k: models[k] for k in trained},  # noqa: F821
                optimizers,  # noqa: F821
                epoch_losses,
                last=trainer.epoch == epochs,
                losses=trained_losses,
                schedulers=schedulers,
            )
            # written by a background thread from a CPU snapshot: the next epoch does not wait for the disk
            learner.directory.save_in_background(state)
            ctx.epoch, ctx.epochs, ctx.epoch_losses = trainer.epoch, epochs, dict(trainer.epoch_losses)
            ctx.learning_rates = {k: o.param_groups[0]["lr"] for k, o in optimizers.items()}  # noqa: F821
            ctx.global_step = learner.steps_before(stage) + trainer.epoch * cfg.iterations_per_epoch
            learner.fire("after_epoch")

        trainer = IncrementalTrainer(
            models=wrap_for_ranks(learner, models, trained),
            optimizers=optimizers,
            lr_schedulers=schedulers,
            batch_size=cfg.batch_size,
            loss_funcs=loss_funcs,
            dataset=dataset,
            mining_funcs=mining,
            iterations_per_epoch=cfg.iterations_per_epoch,
            sampler=new_sampler(),
            dataloader_num_workers=cfg.num_workers,
            data_device=learner.device,
            loss_weights=weights,
            freeze_batchnorm_in=batchnorm_frozen(cfg, stage, models),
            drift_compensator=learner.compensator if use_virtual else None,
            epoch_start_hook=epoch_start,
            end_of_epoch_hook=epoch_end,
            quiet=learner.quiet,
            amp=cfg.amp,
            gram_scope=cfg.gram_scope,
            loader_pool=learner.loaders,
            context=f"[{cfg.method}] stage {stage}, ",
        )
        if learner.trainer_hook is not None:
            learner.trainer_hook(stage, trainer)
        ctx.trainer = trainer
        learner.fire("before_train")
        if done_epochs < epochs:
            trainer.train(done_epochs + 1, epochs)
        learner.fire("after_train")
        ctx.trainer = None
        # the last epoch's checkpoint goes on writing during drift and evaluation; save_stage waits for it
        ctx.student, ctx.epoch_losses = student, epoch_losses
        ctx.teacher = models.get("teacher_trunk")  # drift measurement embeds with it instead of reloading it
        support = models.get("support_trunk")
        if support is not None:  # snapshotted now so that drift measurement holds two networks, not three;
            # written in the background while drift is measured (save_stage waits for it)
            learner.directory.save_stage_file_in_background(stage, "support.pt", support.state_dict())
        # F_s and the teacher are freed here, by reference counting (no cycles hold models; tested without
        # the garbage collector), before drift measurement loads old models
        del trainer, models, optimizers, support


def embedding_size(model, dataset) -> int:
    """D of ``model``'s embeddings, from one item of ``dataset`` (eval mode, no gradient; mode restored).
    Called with the prototype dataset: its deterministic transform draws nothing from the RNG."""
    was_training = model.training
    x = dataset[0][0]
    x = torch.as_tensor(x).unsqueeze(0).to(next(model.parameters()).device)
    model.eval()
    try:
        with torch.no_grad():
            return int(model(x).shape[1])
    finally:
        model.train(was_training)


def training_dataset(learner, stage: int) -> Dataset:
    joint = stage > 0 and learner.method.joint
    return ConcatDataset(learner.train_stages[: stage + 1]) if joint else learner.train_stages[stage]


def wrap_for_ranks(learner, models: dict, trained: list[str]) -> dict:
    """Under torchrun, the trained networks in DistributedDataParallel (the teacher stays bare: it is
    frozen and never synchronised). Checkpoints keep the bare networks' state dicts. One rank has
    nothing to synchronise: no wrapper."""
    if distributed.world_size() == 1:
        return models
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [learner.device.index] if learner.device.type == "cuda" else None
    return {k: DDP(m, device_ids=ids) if k in trained else m for k, m in models.items()}


def batchnorm_frozen(cfg, stage: int, models: dict) -> list[str]:
    mode = cfg.freeze_batchnorm
    if mode is True:
        return [k for k in ("trunk", "support_trunk") if k in models]
    if mode == "inherited":
        inherited = ["trunk"] if stage > 0 else []
        if stage > 0 and cfg.support_init == "teacher":
            inherited.append("support_trunk")
        return [k for k in inherited if k in models]
    return []


def load_epoch_checkpoint(
    learner, stage: int, models: dict, optimizers: dict, losses: dict, schedulers: dict
) -> tuple[int, list[dict]]:
    """Restore the last finished epoch of ``stage`` if the run was interrupted in it.

    Returns (that epoch, the per-epoch loss log so far); (0, []) when the stage starts afresh.
    """
    state = learner.directory.load_in_progress(map_location=learner.device)
    path = learner.run_dir / "in_progress.pt"
    if state is None:
        return 0, []
    if not isinstance(state, dict) or not {"stage", "epoch", "models", "epoch_losses"} <= set(state):
        raise RunDirectoryError(
            f"{path} is not an epoch checkpoint of this project; delete it to retrain stage {stage}"
        )
    if isinstance(state["stage"], int) and state["stage"] < stage:
        return 0, []  # the previous stage's, left by a run killed as that stage completed
    epochs = learner.epochs_of(stage)
    if state["stage"] != stage or not isinstance(state["epoch"], int) or not 1 <= state["epoch"] <= epochs:
        raise RunDirectoryError(
            f"{path} holds stage {state['stage']!r}, epoch {state['epoch']!r}, but this run resumes stage "
            f"{stage} of epochs 1–{epochs}; delete it to retrain stage {stage} from its start"
        )
    if set(state["models"]) != set(models) - {"teacher_trunk"}:
        raise RunDirectoryError(
            f"{path} holds networks {sorted(state['models'])}, this stage trains "
            f"{sorted(set(models) - {'teacher_trunk'})}; delete it to retrain stage {stage}"
        )
    if "optimizers" not in state and state["epoch"] < epochs:
        raise RunDirectoryError(
            f"{path} has no optimizer state for epoch {state['epoch']} of {epochs}; delete it to retrain "
            f"stage {stage}"
        )
    for k, sd in state["models"].items():
        models[k].load_state_dict(sd)
    for k, sd in state.get("optimizers", {}).items():  # none after the last epoch: no step follows
        optimizers[k].load_state_dict(sd)
    for k, sd in state.get("losses", {}).items():
        if sd:
            load_training_state(losses[k], sd)
    for k, sd in state.get("lr_schedulers", {}).items():
        schedulers[k].load_state_dict(sd)
    if not learner.quiet:
        print(f"[{learner.config.method}] resuming stage {stage} after epoch {state['epoch']}", flush=True)
    return int(state["epoch"]), list(state["epoch_losses"])


def start_loader_workers(learner, start: int) -> None:
    """Fork every worker process the run will use now, before the first network is built: memory
    written later (weights, gradients, optimiser state) is then never shared with a worker, so the
    training process does not copy it page by page on its first write (see LoaderPool.start_workers)."""
    from .drift import drift_users

    if start >= len(learner.train_stages):
        return
    first = next((s for s in range(start, len(learner.train_stages)) if learner.trains(s)), None)
    embedded = [learner.test_dataset] + ([learner.prototype_stages[start]] if drift_users(learner) else [])
    learner.loaders.start_workers(
        train=training_dataset(learner, first) if first is not None else None, embed=embedded
    )
