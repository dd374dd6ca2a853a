"""A small multi-stage `ours` run on digits, used by the kill-and-resume test: python resumable_run.py
RUN_DIR."""

import sys

import torch

from pml_mutual import OnlineConfig, OnlineLearner
from pml_mutual.data import load_digits_splits, stage_assignment
from pml_mutual.models import EmbeddingMLP

torch.set_num_threads(1)
train, test = load_digits_splits()
config = OnlineConfig(
    method="ours",
    epochs=6,
    initial_epochs=3,
    iterations_per_epoch=8,
    batch_size=24,
    m_per_class=8,
    lr=1e-3,
    weight_decay=0.0,
    lambda_corr=100.0,
    lambda_mutual=1.0,
    device="cpu",
    seed=3,
)
learner = OnlineLearner.from_class_assignment(
    EmbeddingMLP,
    train,
    test,
    stage_assignment(range(10), 4, 3),
    config=config,
    run_dir=sys.argv[1],
    quiet=True,
)
learner.run()
print("done")
