"""OBD-SD vs PSD vs the base loss, on ordinary (non-incremental) deep metric learning.

    python benchmarks/obdsd.py --dataset glyphs --seeds 0 1 2            # CPU, the project's real data
    python benchmarks/obdsd.py --dataset fashion-mnist --quick           # minutes
    python benchmarks/obdsd.py --dataset cub200 --data-root CUB_200_2011 --weights resnet50-0676ba61.pth
    --device cuda
    python benchmarks/obdsd.py --dataset cars196 --data-root cars196 --weights resnet50-0676ba61.pth --device
    cuda
    python benchmarks/obdsd.py --dataset cub200 --smoke      # the CUB path end to end on a tiny CUB-format
    set

On CUB-200 / Cars196 (the paper's setting: ResNet-50, batch 112 = 56 × 2, Adam 1e-5, wd 4e-4, the released
α and λ per dataset, 224-pixel crops) the data and ImageNet weights come from local paths.

Protocol (the usual zero-shot DML split): train on the first half of the classes, evaluate Recall@K
on the unseen second half. Variants: ``base`` (Multi-Similarity loss + miner), ``psd`` (+ progressive
self-distillation, α = 0) and ``obdsd`` (+ online batch diffusion, α > 0), all with one trainer
(``SelfDistillationTrainer``; ``base`` is the same loss with weight 0). Prints Recall@1 mean ± std.
``--validation`` tunes on unseen classes carved from the training classes (never the test classes).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# PML's trainer draws a progress bar per epoch (read at tqdm import)
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import TensorDataset

from pml_mutual.data import ImageListDataset, ProtocolTransform, fixtures, read_cars196, read_cub
from pml_mutual.data.cpu_benchmark import load_cpu_benchmark
from pml_mutual.evaluation import extract_embeddings, recall_at_k
from pml_mutual.losses import OBDSD_DEFAULTS, BatchDiffusionSelfDistillationLoss
from pml_mutual.models import BACKBONES, SmallCNN, backbone_factory
from pml_mutual.models.backbones import INPUT_SPACE
from pml_mutual.online import seed_everything
from pml_mutual.tables import mean_std
from pml_mutual.trainers import SelfDistillationTrainer

VARIANTS = ("base", "psd", "obdsd")
PAPER_DATASETS = {"cub200": read_cub, "cars196": read_cars196}


def load_paper_dataset(args):
    """The zero-shot split of the DML literature: all images of the first half of the classes train, the
    rest test."""
    import tempfile

    if args.smoke:
        args._tmp = tempfile.TemporaryDirectory(prefix="obdsd_smoke_")
        write = fixtures.write_cub_fixture if args.dataset == "cub200" else fixtures.write_cars196_fixture
        args.data_root = write(Path(args._tmp.name) / args.dataset, [6] * 8)
    elif args.data_root is None:
        raise SystemExit(f"--data-root is required for {args.dataset}")
    items = PAPER_DATASETS[args.dataset](args.data_root)
    if args.dataset == "cub200":
        items = items[0]
    classes = np.unique(items.labels)
    seen = np.isin(items.labels, classes[: len(classes) // 2])
    space = INPUT_SPACE[args.backbone]
    size = args.image_size
    train = ImageListDataset(items.subset(np.flatnonzero(seen)), ProtocolTransform(True, space, size))
    test = ImageListDataset(items.subset(np.flatnonzero(~seen)), ProtocolTransform(False, space, size))
    return train, test


def split_half(train: TensorDataset, test: TensorDataset):
    classes = np.unique(train.tensors[1].numpy())
    seen = torch.from_numpy(np.isin(train.tensors[1].numpy(), classes[: len(classes) // 2]))
    unseen = torch.from_numpy(~np.isin(test.tensors[1].numpy(), classes[: len(classes) // 2]))
    return TensorDataset(*(t[seen] for t in train.tensors)), TensorDataset(*(t[unseen] for t in test.tensors))


def validation_split(train: TensorDataset):
    """Zero-shot validation inside the training classes: their first 3/4 train, the last 1/4 are the unseen
    evaluation classes (the test classes are never looked at while tuning)."""
    y = train.tensors[1].numpy()
    classes = np.unique(y)
    fit = torch.from_numpy(np.isin(y, classes[: 3 * len(classes) // 4]))
    return TensorDataset(*(t[fit] for t in train.tensors)), TensorDataset(*(t[~fit] for t in train.tensors))


def train_variant(variant, train, args, seed, model_factory):
    seed_everything(seed, VARIANTS.index(variant))
    model = model_factory().to(args.device)
    loss = BatchDiffusionSelfDistillationLoss(
        base_loss=losses.MultiSimilarityLoss(2, 40, 0.5),
        miner=miners.MultiSimilarityMiner(0.1),
        alpha=args.alpha if variant == "obdsd" else 0.0,
        weight=0.0 if variant == "base" else args.weight,
        temperature=args.temperature,
        diffusion_temperature=args.diffusion_temperature,
    )
    labels = train.tensors[1].numpy() if isinstance(train, TensorDataset) else train.labels
    trainer = SelfDistillationTrainer(
        models={"trunk": model},
        optimizers={
            "trunk_optimizer": torch.optim.Adam(
                model.parameters(), lr=args.lr, weight_decay=args.weight_decay
            )
        },
        batch_size=args.batch_size,
        loss_funcs={"metric_loss": loss},
        dataset=train,
        sampler=MPerClassSampler(
            labels,
            args.m_per_class,
            args.batch_size,
            length_before_new_iter=args.batch_size * args.iterations,
        ),
        iterations_per_epoch=args.iterations,
        dataloader_num_workers=args.num_workers,
        data_device=torch.device(args.device),
        num_epochs=args.epochs,
        freeze_trunk_batchnorm=args.dataset in PAPER_DATASETS,
    )
    trainer.train(1, args.epochs)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["glyphs", "fashion-mnist", *PAPER_DATASETS], default="glyphs")
    p.add_argument("--data-root", type=Path, help="CUB_200_2011/ or the Cars196 directory")
    p.add_argument("--weights", type=Path, help="ImageNet state dict of the backbone (CUB / Cars196)")
    p.add_argument("--backbone", choices=BACKBONES, default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument(
        "--smoke", action="store_true", help="CUB / Cars196 path on a tiny dataset in the real format"
    )
    p.add_argument(
        "--validation",
        action="store_true",
        help="tune: evaluate on unseen classes carved from the training classes, never the test classes",
    )
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
    if args.dataset in PAPER_DATASETS:
        defaults = dict(
            OBDSD_DEFAULTS[args.dataset], lr=1e-5, batch_size=112, m_per_class=2, epochs=args.epochs
        )
        if args.smoke:
            defaults.update(batch_size=8, epochs=2, image_size=32, backbone="bninception", weights=None)
            args.seeds, args.iterations = args.seeds[:1], 2
        for k, v in defaults.items():
            if p.get_default(k) == getattr(args, k, None) or args.smoke:
                setattr(args, k, v)
        train, test = load_paper_dataset(args)
        weights = None if args.smoke else args.weights
        if weights is None and not args.smoke:
            raise SystemExit(
                "--weights is required for CUB / Cars196 (the ImageNet state dict of the backbone)"
            )
        factory = backbone_factory(args.backbone, weights)
    else:
        if args.dataset == "fashion-mnist":
            args.m_per_class = max(args.m_per_class, args.batch_size // 5)
            args.batch_size -= args.batch_size % args.m_per_class
        train, test, _ = load_cpu_benchmark(args.dataset, quick=args.quick)
        train, test = split_half(train, test)
        if args.validation:
            train, test = validation_split(train)
        factory = lambda: SmallCNN(widths=tuple(args.widths))  # noqa: E731
    rows, t0 = [], time.perf_counter()
    for seed in args.seeds:
        for variant in args.variants:
            t = time.perf_counter()
            model = train_variant(variant, train, args, seed, factory)
            emb, labels = extract_embeddings(model, test, 512, args.device)
            r = recall_at_k(emb, labels, (1, 2, 4, 8))
            rows.append({"variant": variant, "seed": seed, "recall": r, "seconds": time.perf_counter() - t})
            print(f"seed {seed} {variant:<6} R@1 {100 * r[1]:.2f}  ({rows[-1]['seconds']:.0f}s)", flush=True)
    where = (
        "validation: the last quarter of the training classes" if args.validation else "test: the unseen half"
    )
    print(
        f"\nOBD-SD on {args.dataset} (train: first half of the classes, {where}), λ = {args.weight:g}, α = "
        f"{args.alpha:g}, Recall@K (%), mean ± std over seeds {args.seeds}"
    )
    print(f"{'variant':<8} " + " ".join(f"{'R@' + str(k):>15}" for k in (1, 2, 4, 8)))
    for v in args.variants:
        mean, std = mean_std(
            [[100 * r["recall"][k] for k in (1, 2, 4, 8)] for r in rows if r["variant"] == v]
        )
        print(f"{v:<8} " + " ".join(f"{m:6.2f} ± {s:5.2f}" for m, s in zip(mean, std)))
    print(f"total time: {time.perf_counter() - t0:.0f}s")
    if args.out:
        config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        args.out.write_text(json.dumps({"results": rows, "config": config}, indent=2, default=str))


if __name__ == "__main__":
    main()
