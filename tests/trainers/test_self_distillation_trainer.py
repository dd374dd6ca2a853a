import copy

import pytest
import torch
from pytorch_metric_learning import losses
from pytorch_metric_learning.samplers import MPerClassSampler

from pml_mutual.data import load_digits_splits
from pml_mutual.losses import BatchDiffusionSelfDistillationLoss
from pml_mutual.models import EmbeddingMLP
from pml_mutual.trainers import SelfDistillationTrainer


def test_teacher_is_previous_epoch_snapshot_and_weight_ramps():
    train, _ = load_digits_splits()
    model = EmbeddingMLP()
    start = copy.deepcopy(model.state_dict())
    loss = BatchDiffusionSelfDistillationLoss(
        base_loss=losses.MultiSimilarityLoss(2, 40, 0.5), alpha=0.3, weight=10.0
    )
    seen = {}

    def end_of_epoch(trainer):
        seen[trainer.epoch] = {
            "model": copy.deepcopy(trainer.models["trunk"].state_dict()),
            "teacher": copy.deepcopy(trainer.teacher[0].state_dict()),
            "scale": trainer.loss_funcs["metric_loss"].weight_scale,
        }

    trainer = SelfDistillationTrainer(
        models={"trunk": model},
        optimizers={"trunk_optimizer": torch.optim.Adam(model.parameters(), lr=1e-3)},
        batch_size=40,
        loss_funcs={"metric_loss": loss},
        dataset=train,
        sampler=MPerClassSampler(train.tensors[1].numpy(), 4, 40, length_before_new_iter=200),
        iterations_per_epoch=5,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        num_epochs=4,
        end_of_epoch_hook=end_of_epoch,
    )
    trainer.train(1, 2)
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(seen[1]["teacher"], start)  # first epoch: the starting network teaches
    assert same(seen[2]["teacher"], seen[1]["model"])  # then the previous epoch's weights
    assert not same(seen[2]["model"], seen[1]["model"])
    assert seen[1]["scale"] == pytest.approx(0.25) and seen[2]["scale"] == pytest.approx(0.5)
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
