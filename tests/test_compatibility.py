"""OnlineConfig(lambda_compat=...): the compatibility term in the stage loop, for any method."""

import pytest
import torch

from pml_mutual import OnlineConfig, OnlineLearner
from pml_mutual.callbacks import Callback
from pml_mutual.data import load_digits_splits, stage_assignment
from pml_mutual.models import EmbeddingMLP

C2S = stage_assignment(range(10), 4, 3)


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits()


def config(method, **kw):
    base = dict(
        method=method, epochs=2, iterations_per_epoch=3, batch_size=16, m_per_class=8, lr=1e-3, device="cpu"
    )
    return OnlineConfig(**{**base, **kw})


class Trainers(Callback):
    def __init__(self):
        self.seen = []

    def before_train(self, ctx):
        self.seen.append((ctx.stage, ctx.trainer))


def run(digits, run_dir, cfg, callbacks=()):
    train, test = digits
    learner = OnlineLearner.from_class_assignment(
        EmbeddingMLP, train, test, C2S, config=cfg, run_dir=run_dir, quiet=True, callbacks=list(callbacks)
    )
    return learner, learner.run()


@pytest.mark.parametrize("method", ["finetune", "ours"])
def test_the_term_trains_P_with_the_student_in_every_later_stage(digits, tmp_path, method):
    rec = Trainers()
    _, summary = run(digits, tmp_path, config(method, lambda_compat=2.0), [rec])
    by_stage = dict(rec.seen)
    assert "compatibility_loss" not in by_stage[0].loss_funcs  # stage 0 has no F_{i-1}
    for stage in (1, 2):
        trainer = by_stage[stage]
        loss = trainer.loss_funcs["compatibility_loss"]
        assert trainer.loss_weights["compatibility_loss"] == 2.0 and "teacher_trunk" in trainer.models
        assert "compatibility_loss_optimizer" in trainer.optimizers
        assert not torch.equal(loss.projection.weight.detach(), torch.eye(64))  # P moved from the identity
        assert ("correlation_loss" in trainer.loss_funcs) == (method == "ours")
    logged = summary["stage_logs"][2]["epoch_losses"][-1]
    assert logged["compatibility_loss"] > 0


def test_off_by_default_and_absent_from_the_identity_then(digits, tmp_path):
    train, test = digits
    make = lambda cfg, d: OnlineLearner.from_class_assignment(  # noqa: E731
        EmbeddingMLP, train, test, C2S, config=cfg, run_dir=tmp_path / d, quiet=True
    )
    assert "lambda_compat" not in make(config("ours"), "a").run_identity()["config"]
    assert make(config("ours", lambda_compat=1.0), "b").run_identity()["config"]["lambda_compat"] == 1.0


class StopAt(Callback):
    def after_epoch(self, ctx):
        if (ctx.stage, ctx.epoch) == (1, 1):
            raise KeyboardInterrupt


def test_an_interrupted_stage_resumes_P_and_its_optimizer_exactly(digits, tmp_path):
    cfg = config("finetune", lambda_compat=1.0)
    whole, _ = run(digits, tmp_path / "whole", cfg)
    with pytest.raises(KeyboardInterrupt):
        run(digits, tmp_path / "cut", cfg, [StopAt()])
    resumed, _ = run(digits, tmp_path / "cut", cfg)
    for stage in range(3):
        a = torch.load(tmp_path / "whole" / f"stage_{stage:03d}" / "model.pt", weights_only=True)
        b = torch.load(tmp_path / "cut" / f"stage_{stage:03d}" / "model.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value", [-1.0, float("nan"), "1"])
def test_a_bad_weight_is_refused(value):
    with pytest.raises(ValueError, match="lambda_compat"):
        OnlineConfig(lambda_compat=value)
