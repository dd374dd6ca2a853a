"""OBD-SD vs PSD vs the base loss, on ordinary (non-incremental) deep metric learning.

    python benchmarks/obdsd.py --dataset glyphs --seeds 0 1 2            # CPU, the project's real data
    python benchmarks/obdsd.py --dataset fashion-mnist --quick           # minutes
    python benchmarks/obdsd.py --dataset cub200 --data-root CUB_200_2011 --device cuda   # the paper's setting*

Protocol (the usual zero-shot DML split): train on the first half of the classes, evaluate Recall@K
on the unseen second half. Variants: ``base`` (Multi-Similarity loss + miner), ``psd`` (+ progressive
self-distillation, α = 0) and ``obdsd`` (+ online batch diffusion, α > 0), all with one trainer
(``SelfDistillationTrainer``; ``base`` is the same loss with weight 0). Prints Recall@1 mean ± std.
* CUB-200/Cars196 with ResNet-50 need the dataset loaders and backbones of the reproduction issue;
  until they exist this script runs the CPU datasets only.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import TensorDataset

from pml_mutual.data.cpu_benchmark import load_cpu_benchmark
from pml_mutual.evaluation import extract_embeddings, recall_at_k
from pml_mutual.experiment import mean_std
from pml_mutual.losses import BatchDiffusionSelfDistillationLoss
from pml_mutual.models import SmallCNN
from pml_mutual.online import seed_everything
from pml_mutual.trainers import SelfDistillationTrainer

VARIANTS = ("base", "psd", "obdsd")


def split_half(train: TensorDataset, test: TensorDataset):
    classes = np.unique(train.tensors[1].numpy())
    seen = torch.from_numpy(np.isin(train.tensors[1].numpy(), classes[: len(classes) // 2]))
    unseen = torch.from_numpy(~np.isin(test.tensors[1].numpy(), classes[: len(classes) // 2]))
    return TensorDataset(*(t[seen] for t in train.tensors)), TensorDataset(*(t[unseen] for t in test.tensors))


def train_variant(variant, train, args, seed):
    seed_everything(seed, VARIANTS.index(variant))
    model = SmallCNN(widths=tuple(args.widths))
    loss = BatchDiffusionSelfDistillationLoss(
        base_loss=losses.MultiSimilarityLoss(2, 40, 0.5), miner=miners.MultiSimilarityMiner(0.1),
        alpha=args.alpha if variant == "obdsd" else 0.0, weight=0.0 if variant == "base" else args.weight,
        temperature=args.temperature, diffusion_temperature=args.diffusion_temperature,
    )
    labels = train.tensors[1].numpy()
    trainer = SelfDistillationTrainer(
        models={"trunk": model},
        optimizers={"trunk_optimizer": torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)},
        batch_size=args.batch_size,
        loss_funcs={"metric_loss": loss},
        dataset=train,
        sampler=MPerClassSampler(labels, args.m_per_class, args.batch_size,
                                 length_before_new_iter=args.batch_size * args.iterations),
        iterations_per_epoch=args.iterations,
        dataloader_num_workers=0,
        data_device=torch.device(args.device),
        num_epochs=args.epochs,
    )
    trainer.train(1, args.epochs)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["glyphs", "fashion-mnist"], default="glyphs")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64], help="SmallCNN channel widths")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--m-per-class", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=4e-4)
    p.add_argument("--alpha", type=float, default=0.3, help="α of OBD-SD (CUB's released value)")
    p.add_argument("--weight", type=float, default=1000.0, help="λ (CUB's released value)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--diffusion-temperature", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.iterations = args.seeds[:1], 2, 20
    if args.dataset == "fashion-mnist":
        args.m_per_class = max(args.m_per_class, args.batch_size // 5)
        args.batch_size -= args.batch_size % args.m_per_class
    train, test, _ = load_cpu_benchmark(args.dataset, quick=args.quick)
    train, test = split_half(train, test)
    rows, t0 = [], time.perf_counter()
    for seed in args.seeds:
        for variant in args.variants:
            t = time.perf_counter()
            model = train_variant(variant, train, args, seed)
            emb, labels = extract_embeddings(model, test, 512, args.device)
            r = recall_at_k(emb, labels, (1, 2, 4, 8))
            rows.append({"variant": variant, "seed": seed, "recall": r, "seconds": time.perf_counter() - t})
            print(f"seed {seed} {variant:<6} R@1 {100 * r[1]:.2f}  ({rows[-1]['seconds']:.0f}s)", flush=True)
    print(f"\nOBD-SD on {args.dataset} (train: first half of the classes, test: the unseen half), Recall@K (%), "
          f"mean ± std over seeds {args.seeds}")
    print(f"{'variant':<8} " + " ".join(f"{'R@' + str(k):>15}" for k in (1, 2, 4, 8)))
    for v in args.variants:
        mean, std = mean_std([[100 * r["recall"][k] for k in (1, 2, 4, 8)] for r in rows if r["variant"] == v])
        print(f"{v:<8} " + " ".join(f"{m:6.2f} ± {s:5.2f}" for m, s in zip(mean, std)))
    print(f"total time: {time.perf_counter() - t0:.0f}s")
    if args.out:
        args.out.write_text(json.dumps({"results": rows, "config": vars(args)}, indent=2, default=str))


if __name__ == "__main__":
    main()
