"""One IncrementalTrainer step of `ours` (with virtual features) on a fixed global batch, for the DDP tests.

``run_step(world, rank, out)`` trains on rank ``rank``'s slice of the global batch (world = 1: all of it, no
process group) and saves the loss terms and the students' gradients to ``out``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners

from pml_mutual import DriftCompensator, GramCorrelationLoss, IncrementalTrainer, MutualGramLoss, distributed
from pml_mutual.models import EmbeddingMLP

GLOBAL_BATCH = 24
EMBEDDING_SIZE = 32
LOSS_WEIGHTS = {"metric_loss": 1, "support_metric_loss": 1, "correlation_loss": 10, "mutual_loss": 8}
STAGES = 3
CORRELATION_TERMS = (
    STAGES  # the real teacher and the virtual features of the STAGES − 1 earlier stages (Eq. 6)
)


def global_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 64, generator=g)
    y = torch.arange(6).repeat_interleave(4)  # 6 classes × 4
    return x, y


def compensator():
    g = torch.Generator().manual_seed(2)
    comp = DriftCompensator()
    for s in range(STAGES):
        feats = F.normalize(torch.randn(60, 32, generator=g), dim=1)
        comp.add_stage(feats, torch.arange(5 * s, 5 * s + 5).repeat(12))
        for t in comp.stages_to_measure():
            comp.update_drift(
                feats, F.normalize(feats + 0.1 * torch.randn(60, 32, generator=g), dim=1), stage=t
            )
    return comp


def run_step(world: int, rank: int, out: str, gram_scope: str = "global") -> None:
    models = {}
    for i, k in enumerate(("trunk", "support_trunk", "teacher_trunk")):
        torch.manual_seed(10 + i)
        models[k] = EmbeddingMLP(in_features=64, hidden=48, embedding_size=EMBEDDING_SIZE)
    trained = ("trunk", "support_trunk")
    optimizers = {f"{k}_optimizer": torch.optim.SGD(models[k].parameters(), lr=0.0) for k in trained}
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        models = {k: DDP(m) if k in trained else m for k, m in models.items()}
    x, y = global_batch()
    b = GLOBAL_BATCH // world
    batch = (x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b])
    trainer = IncrementalTrainer(
        models=models,
        optimizers=optimizers,
        batch_size=b,
        loss_funcs={
            "metric_loss": losses.TripletMarginLoss(margin=0.1),
            "correlation_loss": GramCorrelationLoss(),
            "mutual_loss": MutualGramLoss(),
        },
        dataset=None,
        mining_funcs={"tuple_miner": miners.BatchHardMiner()},
        iterations_per_epoch=1,
        data_device=torch.device("cpu"),
        loss_weights=LOSS_WEIGHTS,
        drift_compensator=compensator(),
        quiet=True,
        gram_scope=gram_scope,
    )
    trainer.get_batch = lambda: batch
    trainer.set_to_train()
    trainer.forward_and_backward()
    bare = {k: (m.module if hasattr(m, "module") else m) for k, m in models.items()}
    grads = {f"{k}.{n}": p.grad.clone() for k in trained for n, p in bare[k].named_parameters()}
    terms = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in trainer.losses.items()}
    if rank == 0:
        torch.save({"grads": grads, "losses": terms}, out)


def spawned(rank: int, world: int, port: int, step, out: str, gram_scope: str = "global") -> None:
    """Entry point for ``torch.multiprocessing.spawn``: a gloo group of ``world`` ranks running ``step``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        step(world, rank, out, gram_scope)
    finally:
        distributed.shutdown(wait=False)  # a no-op where ``step`` ended the group itself


def run_obdsd_step(world: int, rank: int, out: str, gram_scope: str = "global") -> None:
    """One SelfDistillationTrainer (OBD-SD) step on rank ``rank``'s slice of the global batch."""
    from pml_mutual.losses import BatchDiffusionSelfDistillationLoss
    from pml_mutual.trainers import SelfDistillationTrainer

    torch.manual_seed(20)
    model = EmbeddingMLP(in_features=64, hidden=48, embedding_size=32)
    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)
    x, y = global_batch()
    b = GLOBAL_BATCH // world
    batch = (x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b])
    loss = BatchDiffusionSelfDistillationLoss(alpha=0.5, weight=100.0)
    trainer = SelfDistillationTrainer(
        models={"trunk": wrapped},
        optimizers={"trunk_optimizer": torch.optim.SGD(model.parameters(), lr=0.0)},
        batch_size=b,
        loss_funcs={"metric_loss": loss},
        dataset=None,
        iterations_per_epoch=1,
        data_device=torch.device("cpu"),
        num_epochs=2,
        gram_scope=gram_scope,
    )
    trainer.epoch = 1
    trainer.set_to_train()
    with torch.no_grad():  # the snapshot (teacher) is taken; perturb the student so that the two differ
        for p in model.parameters():
            p.add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
    trainer.get_batch = lambda: batch
    trainer.forward_and_backward()
    if rank == 0:
        torch.save(
            {
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                "losses": {
                    k: float(v.detach()) if torch.is_tensor(v) else float(v)
                    for k, v in trainer.losses.items()
                },
            },
            out,
        )


def wrap_then_shutdown(world: int, rank: int, out: str, gram_scope: str = "global") -> None:
    """Which networks OnlineLearner wraps in DDP for ``world`` ranks, and whether ``distributed.shutdown``
    leaves the process without a group; rank 0 writes what it saw."""
    from types import SimpleNamespace

    from pml_mutual.steps.train import wrap_for_ranks

    models = {
        "trunk": EmbeddingMLP(in_features=8, hidden=8, embedding_size=4),
        "teacher_trunk": EmbeddingMLP(in_features=8, hidden=8, embedding_size=4),
    }
    learner = SimpleNamespace(device=torch.device("cpu"))
    wrapped = wrap_for_ranks(learner, models, ["trunk"])
    seen = {k: type(m).__name__ for k, m in wrapped.items()}
    del wrapped
    distributed.shutdown()
    if rank == 0:
        torch.save({"wrapped": seen, "active_after": distributed.is_active()}, out)
