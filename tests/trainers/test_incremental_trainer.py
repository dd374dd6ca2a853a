import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.samplers import MPerClassSampler

from pml_mutual import DriftCompensator, GramCorrelationLoss, IncrementalTrainer, MutualGramLoss
from pml_mutual.data import dataset_labels, load_digits_splits, split_by_stage, stage_assignment
from pml_mutual.models import EmbeddingMLP


@pytest.fixture(scope="module")
def new_stage():
    train, _ = load_digits_splits()
    return split_by_stage(train, stage_assignment(range(10), 5))[1]


def make_trainer(dataset, models, loss_funcs, weights, **kwargs):
    optimizers = {
        f"{k}_optimizer": torch.optim.Adam(m.parameters(), lr=1e-3)
        for k, m in models.items()
        if not k.startswith("teacher")
    }
    return IncrementalTrainer(
        models=models,
        optimizers=optimizers,
        batch_size=20,
        loss_funcs=loss_funcs,
        dataset=dataset,
        mining_funcs={"tuple_miner": miners.BatchHardMiner()},
        iterations_per_epoch=5,
        sampler=MPerClassSampler(dataset_labels(dataset), 4, 20, length_before_new_iter=100),
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        loss_weights=weights,
        quiet=True,
        **kwargs,
    )


def full_models():
    teacher = EmbeddingMLP()
    student = copy.deepcopy(teacher)
    return {"trunk": student, "support_trunk": EmbeddingMLP(), "teacher_trunk": teacher}


def full_losses():
    return {
        "metric_loss": losses.TripletMarginLoss(0.1),
        "correlation_loss": GramCorrelationLoss(),
        "mutual_loss": MutualGramLoss(),
    }


def test_teacher_frozen_students_trained(new_stage):
    models = full_models()
    before = {k: copy.deepcopy(m.state_dict()) for k, m in models.items()}
    weights = {"metric_loss": 1, "support_metric_loss": 1, "correlation_loss": 10, "mutual_loss": 8}
    trainer = make_trainer(new_stage, models, full_losses(), weights)
    trainer.train(1, 2)
    for k in before["teacher_trunk"]:
        assert torch.equal(before["teacher_trunk"][k], models["teacher_trunk"].state_dict()[k])
    for name in ("trunk", "support_trunk"):
        changed = any(not torch.equal(before[name][k], v) for k, v in models[name].state_dict().items())
        assert changed, name
    assert not any(p.requires_grad for p in models["teacher_trunk"].parameters())
    assert set(trainer.epoch_losses) == {
        "metric_loss",
        "support_metric_loss",
        "correlation_loss",
        "mutual_loss",
        "total_loss",
    }
    assert all(v >= 0 for v in trainer.epoch_losses.values())


def test_total_loss_is_weighted_sum_of_terms(new_stage):
    weights = {"metric_loss": 1.0, "support_metric_loss": 0.5, "correlation_loss": 10.0, "mutual_loss": 8.0}
    trainer = make_trainer(new_stage, full_models(), full_losses(), weights)
    trainer.initialize_dataloader()
    trainer.set_to_train()
    trainer.zero_losses()
    trainer.calculate_loss(trainer.get_batch())
    raw = {k: v.detach().clone() for k, v in trainer.losses.items() if k != "total_loss"}
    trainer.loss_tracker.update(trainer.loss_weights)
    want = sum(weights[k] * raw[k] for k in raw)
    assert trainer.losses["total_loss"].item() == pytest.approx(want.item(), rel=1e-6)


def test_finetune_is_metric_loss_only(new_stage):
    trainer = make_trainer(
        new_stage,
        {"trunk": EmbeddingMLP()},
        {"metric_loss": losses.TripletMarginLoss(0.1)},
        {"metric_loss": 1},
    )
    trainer.train(1, 1)
    assert set(trainer.losses) == {"metric_loss", "total_loss"}
    assert trainer.epoch_losses["total_loss"] == pytest.approx(trainer.epoch_losses["metric_loss"])


def test_virtual_features_enter_the_correlation_loss(new_stage):
    torch.manual_seed(0)
    comp = DriftCompensator()
    x = torch.nn.functional.normalize(torch.randn(40, 64), dim=1)
    comp.add_stage(x, torch.arange(20, 30).repeat(4))
    comp.add_stage(x, torch.arange(30, 40).repeat(4))
    comp.update_drift(x, torch.nn.functional.normalize(x + 0.3, dim=1), stage=0)
    models = {"trunk": EmbeddingMLP(), "teacher_trunk": EmbeddingMLP()}
    loss_funcs = {"metric_loss": losses.TripletMarginLoss(0.1), "correlation_loss": GramCorrelationLoss()}
    weights = {"metric_loss": 1, "correlation_loss": 1}
    with_virtual = make_trainer(new_stage, dict(models), dict(loss_funcs), weights, drift_compensator=comp)
    without = make_trainer(new_stage, dict(models), dict(loss_funcs), weights)
    batch = next(iter(torch.utils.data.DataLoader(new_stage, batch_size=16)))
    for t in (with_virtual, without):
        t.set_to_train()
        t.calculate_loss(batch)
    emb_p = models["trunk"](batch[0])
    emb_o = models["teacher_trunk"](batch[0]).detach()
    want = GramCorrelationLoss().sum_over_teachers(emb_p, [emb_o, comp.virtual_feature_stack(emb_o)])
    assert with_virtual.losses["correlation_loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert with_virtual.losses["correlation_loss"].item() > without.losses["correlation_loss"].item()


def test_missing_or_extra_losses_are_errors(new_stage):
    with pytest.raises(ValueError, match="correlation_loss"):
        make_trainer(
            new_stage,
            {"trunk": EmbeddingMLP(), "teacher_trunk": EmbeddingMLP()},
            {"metric_loss": losses.TripletMarginLoss()},
            {"metric_loss": 1},
        )
    with pytest.raises(ValueError, match="mutual_loss"):
        make_trainer(
            new_stage,
            {"trunk": EmbeddingMLP()},
            {"metric_loss": losses.TripletMarginLoss(), "mutual_loss": MutualGramLoss()},
            {"metric_loss": 1},
        )


def test_amp_on_cpu_runs_in_bfloat16_with_float32_losses(new_stage):
    models = full_models()
    seen = {}
    models["trunk"].embedding.register_forward_hook(lambda m, i, o: seen.setdefault("act", o.dtype) and None)
    weights = {"metric_loss": 1, "support_metric_loss": 1, "correlation_loss": 10, "mutual_loss": 8}
    trainer = make_trainer(new_stage, models, full_losses(), weights, amp=True)
    assert trainer.grad_scaler is None  # no GradScaler on CPU: bfloat16 needs none
    trainer.train(1, 1)
    assert seen["act"] == torch.bfloat16  # the networks ran under autocast
    assert all(v == v and v >= 0 for v in trainer.epoch_losses.values())  # finite
    batch = next(iter(torch.utils.data.DataLoader(new_stage, batch_size=16)))
    trainer.calculate_loss(batch)
    assert trainer.losses["correlation_loss"].dtype == torch.float32
    assert trainer.losses["mutual_loss"].dtype == torch.float32


def test_a_trained_trainer_and_its_loader_workers_go_with_the_last_reference(new_stage):
    """No reference cycle keeps models alive after training (a full gc.collect per stage costs ~0.2 s
    with torch loaded), and the loader's workers end when training does, not in a later collection."""
    import gc
    import weakref

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch's one-off lazy import (see test_online)
    from pytorch_metric_learning.utils import common_functions as c_f

    models = {k: m.to(c_f.use_cuda_if_available()) for k, m in full_models().items()}  # PML's default device
    weights = {"metric_loss": 1, "support_metric_loss": 1, "correlation_loss": 1, "mutual_loss": 1}
    gc.collect()
    gc.disable()
    try:
        optimizers = {
            f"{k}_optimizer": torch.optim.Adam(m.parameters(), lr=1e-3)
            for k, m in models.items()
            if k != "teacher_trunk"
        }
        # PML defaults: data_device and sampler unset (a shuffled epoch)
        trainer = IncrementalTrainer(
            models=models,
            optimizers=optimizers,
            batch_size=20,
            loss_funcs=full_losses(),
            dataset=new_stage,
            iterations_per_epoch=2,
            dataloader_num_workers=1,
            loss_weights=weights,
            quiet=True,
        )
        trainer.train(1, 1)
        assert trainer.dataloader is None  # workers ended with the epochs
        alive = [weakref.ref(x) for x in (trainer, *models.values())]
        del trainer, models, optimizers
        assert [r() is None for r in alive] == [True] * len(alive)
    finally:
        gc.enable()


def test_the_stage_default_step_reads_nothing_back_but_the_cpu_only_value_checks():
    """A whole `ours` step as the stage builds it (BatchHardTripletLoss without a miner, fused Adam,
    virtual features of 4 earlier stages): the only host reads are checks.py's finiteness checks, which
    run on the CPU only; PML's miner + reducer pair, in the same step, reads sizes back."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers.host_reads import host_reads
    from perf_training import make_trainer as make_step_trainer
    from perf_training import stage5_compensator

    x, y = torch.randn(16, 64), torch.arange(4).repeat_interleave(4)
    # EmbeddingMLP: 64-d
    trainer = make_step_trainer("ours", "mlp", (x, y), torch.device("cpu"), stage5_compensator(64, "cpu"))
    trainer.forward_and_backward()
    reads = host_reads(trainer.forward_and_backward)
    assert reads and {where for _, where in reads} == {"checks.py"}
    for name in ("metric_loss", "support_metric_loss"):
        trainer.loss_funcs[name] = losses.TripletMarginLoss(margin=0.1)
    trainer.mining_funcs["tuple_miner"] = miners.BatchHardMiner()
    assert {where for _, where in host_reads(trainer.forward_and_backward)} - {"checks.py"}


@given(st.integers(1, 7), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_loss_log_sums_and_first_non_finite_iteration_per_term(n_terms, steps, seed):
    """LossLog against the plain per-term bookkeeping: sums equal to float32 addition in step order
    (bit for bit: the same additions), and for each term the first step at which it was NaN or inf."""
    from pml_mutual.trainers.incremental_trainer import LossLog

    g = torch.Generator().manual_seed(seed)
    names = [f"term_{i}" for i in range(n_terms)]
    log, sums, first = LossLog(), {}, {k: -1 for k in names}
    for it in range(steps):
        losses = {"plain": 0}  # PML's placeholder before a term is computed: summed as a number
        for k in names:
            v = torch.randn((), generator=g) * 10
            u = float(torch.rand((), generator=g))
            if u < 0.1:
                v = torch.tensor(float("nan"))
            elif u < 0.15:
                v = torch.tensor(float("-inf"))
            losses[k] = v.requires_grad_()
            sums[k] = sums.get(k, 0.0) + v.detach()
            if not torch.isfinite(v) and first[k] < 0:
                first[k] = it
        log.add(losses, it)
    got = log.sums()
    assert got["plain"] == 0.0
    for k in names:
        want = float(sums[k])
        assert got[k] == want or (want != want and got[k] != got[k])  # NaN sums stay NaN
    assert log.first_not_finite() == first


def test_loss_log_ops_per_step_do_not_grow_with_the_number_of_terms():
    """Each op is a kernel launch on a GPU: per step, the log stacks the terms once (counted through
    torch's dispatcher on the CPU), where keeping each term's sum and first bad step took 10 ops a term."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from common import computing_ops

    from pml_mutual.trainers.incremental_trainer import LossLog

    def ops(n_terms):
        log = LossLog()
        losses = {f"t{i}": torch.rand(()) for i in range(n_terms)}
        log.add(losses, 0)
        return sum(computing_ops(lambda: log.add(losses, 1)).values())

    assert ops(8) == ops(2) <= 8
