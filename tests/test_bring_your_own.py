"""What a PML user brings to the stage loop takes effect: a loss with parameters, a stateful loss, a miner,
an optimizer and LR scheduler, callbacks and loggers (issue: "A PML plug-in in practice")."""

import csv
import functools
import math

import pytest
import torch
from pytorch_metric_learning import losses, miners

from pml_mutual import IncrementalTrainer, OnlineConfig, OnlineLearner
from pml_mutual.callbacks import Callback, CSVLogger
from pml_mutual.callbacks.base import EVENTS
from pml_mutual.data import load_digits_splits, stage_assignment
from pml_mutual.models import EmbeddingMLP

C2S = stage_assignment(range(10), 4, 3)  # three stages


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits()


def config(method="ours", **kw):
    base = dict(
        method=method, epochs=2, iterations_per_epoch=3, batch_size=16, m_per_class=8, device="cpu", ks=(1, 2)
    )
    base.update(kw)
    return OnlineConfig(**base)


def arcface(seed=0):
    torch.manual_seed(seed)
    return losses.ArcFaceLoss(num_classes=10, embedding_size=64)


def learner(digits, run_dir, **kw):
    train, test = digits
    kw.setdefault("config", config())
    return OnlineLearner.from_class_assignment(
        EmbeddingMLP, train, test, C2S, run_dir=run_dir, quiet=True, **kw
    )


class Recorder(Callback):
    def __init__(self):
        self.events, self.trainers = [], []

    def _log(self, event, ctx):
        self.events.append((event, ctx.stage, ctx.epoch if event == "after_epoch" else None, ctx.global_step))

    def before_train(self, ctx):
        self.trainers.append(ctx.trainer)
        self._log("before_train", ctx)


class Stop(Exception):
    pass


class StopAt(Callback):
    """Interrupt the run after ``epoch`` of ``stage`` (as a kill would, once that epoch's checkpoint is
    queued)."""

    def __init__(self, stage, epoch):
        self.at = (stage, epoch)

    def after_epoch(self, ctx):
        if (ctx.stage, ctx.epoch) == self.at:
            raise Stop


for _event in EVENTS:
    if _event != "before_train":
        setattr(Recorder, _event, lambda self, ctx, _e=_event: self._log(_e, ctx))


def test_a_loss_with_parameters_trains_with_its_network_and_each_student_has_its_own(digits, tmp_path):
    loss = arcface()
    start = loss.W.detach().clone()
    rec = Recorder()
    learner(digits, tmp_path, metric_loss=loss, callbacks=[rec]).run()
    assert not torch.equal(loss.W.detach().cpu(), start)  # on 0e3a6e5 W stayed at its random start
    saved = torch.load(tmp_path / "stage_002" / "metric_loss.pt", weights_only=True)
    assert torch.equal(saved["W"], loss.W.detach().cpu())
    trainer = rec.trainers[-1]
    assert trainer.loss_funcs["support_metric_loss"] is not trainer.loss_funcs["metric_loss"]
    assert {"metric_loss_optimizer", "support_metric_loss_optimizer"} <= set(trainer.optimizers)
    # F_s started from the loss as given (support_init="fresh") and trained its own W
    assert not torch.equal(trainer.loss_funcs["support_metric_loss"].W.detach(), start)
    assert not torch.equal(trainer.loss_funcs["support_metric_loss"].W.detach(), loss.W.detach())


def test_a_memory_queue_fills_with_its_own_networks_embeddings_only(digits, tmp_path):
    memory = losses.CrossBatchMemory(losses.ContrastiveLoss(), embedding_size=64, memory_size=1000)
    rec = Recorder()
    learner(digits, tmp_path, metric_loss=memory, callbacks=[rec]).run()
    trainer = rec.trainers[-1]
    # each stage trains 2 epochs × 3 iterations × 16 rows; the queue carries over from stage to stage
    assert memory.queue_idx == 3 * 2 * 3 * 16  # shared with F_s it would hold twice as many rows (0e3a6e5)
    assert trainer.loss_funcs["support_metric_loss"].queue_idx == 2 * 3 * 16


def test_optimizer_and_scheduler_factories_take_effect(digits, tmp_path):
    seen = []

    class LR(Callback):
        def after_epoch(self, ctx):
            seen.append((ctx.stage, ctx.epoch, dict(ctx.learning_rates)))

        def before_train(self, ctx):
            assert all(type(o) is torch.optim.SGD for o in ctx.trainer.optimizers.values())

    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    cosine = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=2)
    learner(
        digits, tmp_path, metric_loss=arcface(), optimizer=sgd, lr_scheduler=cosine, callbacks=[LR()]
    ).run()
    for stage, epoch, lrs in seen:
        assert set(lrs) >= {"trunk_optimizer", "metric_loss_optimizer"}
        # a fresh schedule per stage: after epoch e of T_max=2, lr = 0.1 · (1 + cos(π e / 2)) / 2
        expected = 0.1 * (1 + math.cos(math.pi * epoch / 2)) / 2
        assert all(v == pytest.approx(expected, abs=1e-12) for v in lrs.values())
    by_iteration = []

    class Count(Callback):
        def after_epoch(self, ctx):
            by_iteration.append(ctx.trainer.lr_schedulers["trunk_scheduler_by_iteration"].last_epoch)

    step = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=100)
    learner(
        digits,
        tmp_path / "it",
        optimizer=sgd,
        lr_scheduler=step,
        lr_scheduler_step="iteration",
        callbacks=[Count()],
    ).run()
    assert by_iteration[:2] == [3, 6]  # stepped once per iteration


def test_what_cannot_take_effect_is_refused_before_training(digits, tmp_path):
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="configure the default Adam"):
        learner(digits, tmp_path, config=config(lr=1e-3), optimizer=sgd)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        learner(digits, tmp_path, optimizer=lambda params: "adam")
    with pytest.raises(TypeError, match="LRScheduler"):
        learner(digits, tmp_path, lr_scheduler=lambda opt: 3)
    with pytest.raises(ValueError, match="lr_scheduler_step"):
        learner(digits, tmp_path, lr_scheduler_step="batch")


def test_pml_trainer_keys_for_losses_and_schedulers_are_accepted_and_loss_parameters_need_an_optimizer(
    digits,
):
    train, _ = digits
    model = EmbeddingMLP()
    loss = arcface()
    common = dict(batch_size=16, loss_funcs={"metric_loss": loss}, dataset=train, quiet=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="metric_loss_optimizer"):
        IncrementalTrainer(models={"trunk": model}, optimizers={"trunk_optimizer": opt}, **common)
    loss_opt = torch.optim.SGD(loss.parameters(), lr=0.5)
    schedulers = {
        "metric_loss_scheduler_by_iteration": torch.optim.lr_scheduler.StepLR(
            loss_opt, step_size=1, gamma=0.5
        )
    }
    trainer = IncrementalTrainer(
        models={"trunk": model},
        optimizers={"trunk_optimizer": opt, "metric_loss_optimizer": loss_opt},
        lr_schedulers=schedulers,
        iterations_per_epoch=2,
        **common,
    )
    start = loss.W.detach().clone()
    trainer.train(1, 1)
    assert not torch.equal(loss.W.detach(), start)
    assert loss_opt.param_groups[0]["lr"] == pytest.approx(0.125)  # 0.5 halved after each of 2 iterations


def test_callbacks_fire_in_order_with_one_global_step_also_across_a_resume(digits, tmp_path):
    first = Recorder()
    with pytest.raises(Stop):
        learner(digits, tmp_path, callbacks=[first, StopAt(1, 1)]).run()
    resumed = Recorder()
    learner(digits, tmp_path, callbacks=[resumed]).run()
    per_stage = [
        "before_stage",
        "before_train",
        "after_epoch",
        "after_epoch",
        "after_train",
        "after_drift",
        "after_eval",
        "after_stage",
    ]
    assert [e for e, *_ in first.events] == per_stage + per_stage[:3]
    # the resume fires nothing for stage 0 (done) and only epoch 2 of stage 1
    assert [e for e, *_ in resumed.events] == per_stage[:2] + per_stage[3:] + per_stage + ["after_run"]
    epochs = [(s, ep, step) for e, s, ep, step in first.events + resumed.events if e == "after_epoch"]
    assert epochs == [(0, 1, 3), (0, 2, 6), (1, 1, 9), (1, 2, 12), (2, 1, 15), (2, 2, 18)]
    assert resumed.events[-1] == ("after_run", 2, None, 18)


def test_exact_resume_holds_with_a_parametrised_loss_sgd_and_a_scheduler(digits, tmp_path):
    sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    cosine = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=2)

    def make(run_dir, callbacks=()):
        return learner(
            digits,
            run_dir,
            metric_loss=arcface(),
            optimizer=sgd,
            lr_scheduler=cosine,
            miner=miners.MultiSimilarityMiner(),
            callbacks=list(callbacks),
        )

    reference = make(tmp_path / "ref")
    reference.run()
    with pytest.raises(Stop):
        make(tmp_path / "run", [StopAt(1, 1)]).run()
    resumed = make(tmp_path / "run")
    resumed.run()
    for name in ("model.pt", "metric_loss.pt"):
        a = torch.load(tmp_path / "ref" / "stage_002" / name, weights_only=True)
        b = torch.load(tmp_path / "run" / "stage_002" / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_csv_logger_writes_every_epoch_and_stage_with_one_step_count(digits, tmp_path):
    path = tmp_path / "log.csv"
    learner(digits, tmp_path / "run", callbacks=[CSVLogger(path)]).run()
    rows = list(csv.DictReader(open(path)))
    steps = [int(r["step"]) for r in rows if r["name"] == "loss/total_loss"]
    assert steps == [3, 6, 9, 12, 15, 18]
    assert {r["name"] for r in rows} >= {
        "loss/metric_loss",
        "loss/correlation_loss",
        "lr/trunk_optimizer",
        "recall_at_1/all",
        "recall_at_2/new",
    }
    recall = [(int(r["stage"]), int(r["step"])) for r in rows if r["name"] == "recall_at_1/all"]
    assert recall == [(0, 6), (1, 12), (2, 18)]


def test_the_bring_your_own_example_runs_as_the_readme_walks_through_it(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "bring_your_own.py"
    spec = importlib.util.spec_from_file_location("bring_your_own", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(
        ["--run-dir", str(tmp_path / "run"), "--log", str(tmp_path / "log.csv"), "--epochs", "2"]
    )
    assert len(summary["stages"]) == 3 and 0 < summary["stages"][-1]["all"][1] <= 1
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert {"lr/metric_loss_optimizer", "lr/support_metric_loss_optimizer", "loss/mutual_loss"} <= {
        r["name"] for r in rows
    }
    assert (tmp_path / "run" / "stage_002" / "metric_loss.pt").exists()


def test_a_pml_trainer_users_support_student_gets_its_own_loss_and_optimizer(digits):
    train, _ = digits
    student, support = EmbeddingMLP(), EmbeddingMLP()
    loss = arcface()
    loss_opt = torch.optim.SGD(loss.parameters(), lr=0.5, momentum=0.5)
    from pml_mutual import MutualGramLoss

    trainer = IncrementalTrainer(
        models={"trunk": student, "support_trunk": support},
        batch_size=16,
        dataset=train,
        quiet=True,
        optimizers={
            "trunk_optimizer": torch.optim.Adam(student.parameters()),
            "metric_loss_optimizer": loss_opt,
            "support_trunk_optimizer": torch.optim.Adam(support.parameters()),
        },
        loss_funcs={"metric_loss": loss, "mutual_loss": MutualGramLoss()},
        iterations_per_epoch=2,
    )
    copy_ = trainer.loss_funcs["support_metric_loss"]
    opt = trainer.optimizers["support_metric_loss_optimizer"]
    assert copy_ is not loss and type(opt) is torch.optim.SGD and opt.defaults == loss_opt.defaults
    start = copy_.W.detach().clone()
    trainer.train(1, 1)
    assert not torch.equal(copy_.W.detach(), start) and not torch.equal(copy_.W.detach(), loss.W.detach())


def test_tensorboard_and_record_keeper_get_one_step_count_across_stages(digits, tmp_path):
    from record_keeper import RecordKeeper, RecordWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pml_mutual.callbacks import RecordKeeperLogger, TensorBoardLogger, TextLogger

    keeper = RecordKeeper(record_writer=RecordWriter(folder=str(tmp_path / "records"), global_db_path=None))
    learner(
        digits,
        tmp_path / "run",
        callbacks=[TensorBoardLogger(tmp_path / "tb"), RecordKeeperLogger(keeper), TextLogger()],
    ).run()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total_loss")] == [3, 6, 9, 12, 15, 18]  # not restarting at 0
    assert [e.step for e in events.Scalars("recall_at_1/all")] == [6, 12, 18]
    # the record writer's files hold every epoch without a save_records() by hand
    lines = (tmp_path / "records" / "loss.csv").read_text().splitlines()
    steps = [
        int(line.split(",")[0]) for line in lines if not line.startswith("~iteration~")
    ]  # a header per new column set
    assert steps == [3, 6, 9, 12, 15, 18]


def test_a_second_run_on_a_directory_in_use_is_refused_before_it_checks_or_writes_anything(digits, tmp_path):
    from pml_mutual.run_dir import RunDirectoryError

    refused = []

    class SecondLaunch(Callback):
        def before_stage(self, ctx):
            if ctx.stage == 0:
                with pytest.raises(RunDirectoryError, match="in use by a running process"):
                    learner(digits, tmp_path, config=config(seed=1)).run()
                refused.append(True)

    learner(digits, tmp_path, callbacks=[SecondLaunch()]).run()
    assert refused == [True]
    learner(digits, tmp_path).run()  # the lock ended with the first run: the same identity resumes (all done)
