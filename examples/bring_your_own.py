"""Bring your own model, data, loss, optimizer and logger to an online run (the README's walkthrough).

    python examples/bring_your_own.py --run-dir runs/byo --log runs/byo.csv

Three stages of scikit-learn's digits (classes 0-3, then 4-6, then 7-9), with everything a PML user
brings: a model class and a Dataset of one's own, ArcFace (its weights trained by their own optimizer),
PML's MultiSimilarityMiner, SGD with a cosine schedule, a CSV log and a callback of one's own.
"""

import argparse
import functools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from pml_mutual import OnlineConfig, OnlineLearner
from pml_mutual.callbacks import Callback, CSVLogger
from pml_mutual.data import stage_assignment


class DigitImages(Dataset):
    """Your own Dataset: items are (input, label) pairs, as PML's trainers expect."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = torch.tensor(images, dtype=torch.float32)
        self.labels = labels.astype(np.int64)  # an int array named `labels` spares one pass over the items

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i] / 16.0, int(self.labels[i])


class Embedder(nn.Module):
    """Your own network: input → L2-normalised embedding."""

    def __init__(self, embedding_size: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, embedding_size))

    def forward(self, x):
        return F.normalize(self.body(x), dim=1)


class BestStage(Callback):
    """A callback of your own: remember the stage with the best all-class Recall@1."""

    def __init__(self):
        self.best = (None, -1.0)

    def after_stage(self, ctx):
        recall = ctx.results["all"][1]
        if recall > self.best[1]:
            self.best = (ctx.stage, recall)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/bring-your-own")
    parser.add_argument(
        "--log", default="runs/bring-your-own.csv", help="CSV log (step, stage, epoch, name, value)"
    )
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    digits = load_digits()
    rng = np.random.default_rng(0)
    test_mask = np.zeros(len(digits.target), dtype=bool)
    for c in range(10):  # 30 test images per class, the rest for training
        test_mask[rng.choice(np.flatnonzero(digits.target == c), 30, replace=False)] = True
    train = DigitImages(digits.data[~test_mask], digits.target[~test_mask])
    test = DigitImages(digits.data[test_mask], digits.target[test_mask])

    torch.manual_seed(0)  # ArcFace's weights are drawn here: the run directory records them
    arcface = losses.ArcFaceLoss(num_classes=10, embedding_size=32)
    best = BestStage()
    learner = OnlineLearner.from_class_assignment(
        Embedder,
        train,
        test,
        stage_assignment(range(10), first=4, per_stage=3),
        config=OnlineConfig(
            method="ours", epochs=args.epochs, iterations_per_epoch=20, batch_size=24, m_per_class=8
        ),
        metric_loss=arcface,  # F_s gets its own copy, with its own W
        miner=miners.MultiSimilarityMiner(epsilon=0.1),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),  # networks and ArcFace's W
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=args.epochs),
        callbacks=[CSVLogger(args.log), best],
        run_dir=args.run_dir,
    )
    summary = learner.run()
    final = summary["stages"][-1]
    print(
        f"final Recall@1: old {100 * final['old'][1]:.1f} %, new {100 * final['new'][1]:.1f} %, "
        f"all {100 * final['all'][1]:.1f} %; best all-class Recall@1 after stage {best.best[0]}"
    )
    return summary


if __name__ == "__main__":
    main()
