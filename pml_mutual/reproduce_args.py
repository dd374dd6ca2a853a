"""The command line of the reproduction scripts (:mod:`pml_mutual.reproduce`): the paper's three datasets
(readers, stage splits, fixtures), the flags, and the configs and run-directory tags they give."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable

from .checks import check_output_file
from .data import cars196, cub, deepfashion2, fixtures
from .data.images import ImageItems
from .drift import DRIFT_MODES
from .identity import file_sha256
from .models.backbones import BACKBONES
from .online import EMBED_DECODES, METHODS, OnlineConfig
from .published import TABLES

# what every script's --help says after the flags
EPILOG = """Nothing is downloaded: the dataset and the ImageNet weights come from ``--data-root`` and
``--weights``. Defaults are the paper's (Adam 1e-5, weight decay 5e-4, λ = 1/10/8, T = 4, 512-d,
BatchNorm frozen, batch 16 classes × 5 images for BN-Inception and 16 × 3 otherwise). The paper
gives no schedule; the default of 30 epochs × 100 iterations per stage is ours. ``--smoke``
writes a tiny dataset in the real on-disk format and runs every stage of every method on it in
seconds (random weights, 32-pixel crops)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    num_classes: int
    stage_ends: dict
    load: Callable[..., tuple[ImageItems, ImageItems]]  # (root, seed, args) → (train, test)
    write_fixture: Callable[[Path], Path]
    expected_layout: str


def _load_cub(root, seed, args):
    return cub.load_cub(
        root,
        split=args.cub_split,
        seed=seed,
        train_list=args.train_list,
        test_list=args.test_list,
        allow_outside_root=args.allow_outside_root,
    )


DATASETS = {
    "cub200": DatasetSpec(
        "cub200",
        "CUB-200-2011",
        cub.NUM_CLASSES,
        cub.STAGE_ENDS,
        _load_cub,
        lambda d: fixtures.write_cub_fixture(d, [8] * 16),
        "CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt and images/",
    ),
    "cars196": DatasetSpec(
        "cars196",
        "Cars196",
        cars196.NUM_CLASSES,
        cars196.STAGE_ENDS,
        lambda root, seed, args: cars196.load_cars196(
            root, seed=seed, crop=args.crop, allow_outside_root=args.allow_outside_root
        ),
        lambda d: fixtures.write_cars196_fixture(d, [8] * 16),
        "a directory with cars_annos.mat and car_ims/ (or the devkit layout)",
    ),
    "deepfashion2": DatasetSpec(
        "deepfashion2",
        "DeepFashion2",
        deepfashion2.NUM_CLASSES,
        deepfashion2.STAGE_ENDS,
        lambda root, seed, args: deepfashion2.load_deepfashion2(root, seed=seed),
        lambda d: fixtures.write_deepfashion2_fixture(d, 8, 8, splits=("train", "validation")),
        "a directory with annos/*.json and image/*.jpg (or train/ and validation/ laid out that way)",
    ),
}


def build_parser(dataset: str) -> argparse.ArgumentParser:
    spec = DATASETS[dataset]
    p = argparse.ArgumentParser(
        prog=f"benchmarks/{dataset}.py",
        description=f"The paper's tables on {spec.title}: measured Recall@1 beside the published numbers.",
        epilog=f"--data-root: {spec.expected_layout}. {EPILOG}",
    )
    p.add_argument("--data-root", type=Path, help=f"the {spec.title} directory")
    p.add_argument("--weights", type=Path, help="ImageNet state dict of the backbone (a local .pth file)")
    p.add_argument(
        "--no-pretrained", action="store_true", help="train from random weights (not the paper's setting)"
    )
    p.add_argument("--backbone", choices=BACKBONES, default=None)
    p.add_argument("--setting", choices=["one-task", "multi-task"], default=None)
    p.add_argument(
        "--table",
        type=int,
        choices=sorted(TABLES),
        help="preset backbone / setting / methods of a paper table",
    )
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--split-seed", type=int, default=0, help="seed of the per-class train/test split")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per stage (not given by the paper; default 30, smoke 1)",
    )
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch (default 100, smoke 2)")
    p.add_argument("--classes-per-batch", type=int, default=None, help="default 16 (smoke 2)")
    p.add_argument(
        "--images-per-class", type=int, default=None, help="default 5 for BN-Inception, 3 otherwise (smoke 2)"
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lambda-corr", type=float, default=10.0)
    p.add_argument("--lambda-mutual", type=float, default=8.0)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument(
        "--lambda-compat",
        type=float,
        default=0.0,
        help="weight of the compatibility term, beyond the paper (OnlineConfig.lambda_compat; 0: off)",
    )
    p.add_argument(
        "--drift-mode",
        choices=DRIFT_MODES,
        default="direct",
        help="virtual features: direct (the paper), chained, learned (ridge-fitted maps, beyond the paper), "
        "learned_chained (the maps from the previous model only) or none",
    )
    p.add_argument(
        "--gallery-report",
        action="store_true",
        help="after every stage, also Recall@1 of a test gallery that is not re-embedded (stored / moved by "
        "translation / moved by the learned maps / re-embedded); its own run directory",
    )
    p.add_argument(
        "--corr-direction",
        choices=["forward", "reverse"],
        default="forward",
        help="'reverse' = the KL direction of the authors' code",
    )
    p.add_argument("--image-size", type=int, default=None, help="crop size (default 224, smoke 32)")
    p.add_argument(
        "--embed-decode",
        choices=EMBED_DECODES,
        default="workers",
        help="where drift measurement and evaluation decode JPEGs: the DataLoader workers (Pillow) or the "
        "run's device (torchvision; nvJPEG on a GPU, where worker decoding bounds those passes)",
    )
    p.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision (bfloat16 autocast; float16 + GradScaler on GPUs without bfloat16)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="a run directory holding other settings is moved aside (<dir>.old-N) instead of refused",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument(
        "--runs", type=Path, default=Path("runs") / dataset, help="checkpoints (an interrupted run resumes)"
    )
    p.add_argument("--out", type=Path, help="write every run and the published numbers as JSON")
    p.add_argument(
        "--smoke", action="store_true", help="tiny data in the real format, random weights, seconds"
    )
    p.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="follow image paths of the annotation/list files that leave the dataset directory (refused by "
        "default)",
    )
    if dataset == "cub200":
        p.add_argument("--cub-split", choices=["protocol", "official", "lists"], default="protocol")
        p.add_argument(
            "--train-list", type=Path, help="'<path> <label>' list file (e.g. FECD's data/train.txt)"
        )
        p.add_argument("--test-list", type=Path)
    else:
        p.set_defaults(cub_split=None, train_list=None, test_list=None)
    if dataset == "cars196":
        p.add_argument("--crop", action="store_true", help="crop the cars by their bounding boxes")
    else:
        p.set_defaults(crop=False)
    return p


def resolve(args: argparse.Namespace, dataset: str) -> argparse.Namespace:
    """Fill backbone / setting / methods from ``--table`` or the defaults, and check the paths."""
    table = TABLES.get(args.table) if args.table else None
    if table and dataset not in table.get("datasets", [dataset]):
        raise SystemExit(f"Table {args.table} of the paper has no {dataset} rows")
    if args.backbone is None:
        backbone = table["backbone"] if table else "bninception"
        args.backbone = backbone[0] if isinstance(backbone, tuple) else backbone
    if args.setting is None:
        args.setting = table["setting"] if table else "one-task"
    if args.methods is None:
        args.methods = list(table["methods"]) if table else ["initial", "finetune", "joint", "fecd", "ours"]
    if not args.smoke:
        if args.data_root is None:
            raise SystemExit(f"--data-root is required: {DATASETS[dataset].expected_layout}")
        if args.weights is None and not args.no_pretrained:
            raise SystemExit(
                "--weights is required (the ImageNet state dict of the backbone), or --no-pretrained"
            )
        if args.weights is not None and not args.weights.is_file():
            raise SystemExit(f"--weights: no such file {args.weights}")
    if args.out is not None:  # known before training: say so now, not after hours of it
        check_output_file(args.out, "--out")
    if args.runs.exists() and not args.runs.is_dir():
        raise SystemExit(f"--runs {args.runs} is a file: name a directory for the checkpoints")
    return args


def data_and_model_flags(args) -> dict:
    """The command-line settings that change the data or the model (the weights file by its SHA-256)."""
    flags = {
        k: getattr(args, k, None)
        for k in (
            "backbone",
            "setting",
            "split_seed",
            "image_size",
            "cub_split",
            "crop",
            "no_pretrained",
            "smoke",
            "drift_mode",
        )
    }
    for k in ("data_root", "train_list", "test_list"):
        v = getattr(args, k, None)
        flags[k] = str(Path(v).resolve()) if v is not None and not args.smoke else None
    flags["weights_sha256"] = (
        file_sha256(args.weights) if args.weights is not None and not args.no_pretrained else None
    )
    # other pixels; absent at the default, so that run directories of earlier versions keep their names
    if getattr(args, "embed_decode", "workers") != "workers":
        flags["embed_decode"] = args.embed_decode
    return flags


def make_configs(args, seed: int, m_per_class: int, batch: int) -> dict[str, OnlineConfig]:
    names = ["initial"] + [m for m in args.methods if m != "initial"]
    return {
        m: OnlineConfig(
            method=m,
            epochs=args.epochs,
            iterations_per_epoch=args.iterations,
            batch_size=batch,
            m_per_class=m_per_class,
            lr=args.lr,
            weight_decay=args.weight_decay,
            lambda_corr=args.lambda_corr,
            lambda_mutual=args.lambda_mutual,
            temperature=args.temperature,
            lambda_compat=args.lambda_compat,
            corr_direction=args.corr_direction,
            freeze_batchnorm=True,
            seed=seed,
            device=args.device,
            amp=args.amp,
            num_workers=args.num_workers,
            drift_mode=args.drift_mode,
            gallery_report=args.gallery_report,
            eval_batch_size=4 * batch,
            embed_decode=args.embed_decode,
        )
        for m in names
    }
