"""Reproduce the paper's Tables 2–6 on CUB-200-2011, Cars196 and DeepFashion2 (the CLI behind
``benchmarks/cub200.py``, ``benchmarks/cars196.py`` and ``benchmarks/deepfashion2.py``).

Nothing is downloaded: the dataset and the ImageNet weights come from ``--data-root`` and ``--weights``.
Defaults are the paper's (Adam 1e-5, weight decay 5e-4, λ = 1/10/8, T = 4, 512-d, BatchNorm frozen,
batch 16 classes × 5 images for BN-Inception and 16 × 3 otherwise). The paper gives no schedule; the
default of 30 epochs × 100 iterations per stage is ours. ``--smoke`` writes a tiny dataset in the real
on-disk format and runs every stage of every method on it in seconds (random weights, 32-pixel crops).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import distributed
from .data import cars196, cub, deepfashion2
from .data import fixtures
from .data.images import ImageItems, ImageListDataset
from .data.stages import scale_stage_ends, stages_from_ends
from .data.transforms import ProtocolTransform
from . import tables
from .experiment import final_row, per_stage_row, run_methods
from .gallery import GALLERIES
from .identity import file_sha256
from .models.backbones import BACKBONES, BATCH, INPUT_SPACE, backbone_factory, check_batch_memory, check_image_size
from .drift import DRIFT_MODES
from .online import EMBED_DECODES, METHODS, OnlineConfig
from .published import TABLES, published
from .checks import check_output_file
from .evaluation.results import recall_at


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
    return cub.load_cub(root, split=args.cub_split, seed=seed, train_list=args.train_list, test_list=args.test_list,
                        allow_outside_root=args.allow_outside_root)


DATASETS = {
    "cub200": DatasetSpec(
        "cub200", "CUB-200-2011", cub.NUM_CLASSES, cub.STAGE_ENDS, _load_cub,
        lambda d: fixtures.write_cub_fixture(d, [8] * 16),
        "CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt and images/",
    ),
    "cars196": DatasetSpec(
        "cars196", "Cars196", cars196.NUM_CLASSES, cars196.STAGE_ENDS,
        lambda root, seed, args: cars196.load_cars196(root, seed=seed, crop=args.crop, allow_outside_root=args.allow_outside_root),
        lambda d: fixtures.write_cars196_fixture(d, [8] * 16),
        "a directory with cars_annos.mat and car_ims/ (or the devkit layout)",
    ),
    "deepfashion2": DatasetSpec(
        "deepfashion2", "DeepFashion2", deepfashion2.NUM_CLASSES, deepfashion2.STAGE_ENDS,
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
        epilog=f"--data-root: {spec.expected_layout}. " + __doc__.split("\n\n")[1],
    )
    p.add_argument("--data-root", type=Path, help=f"the {spec.title} directory")
    p.add_argument("--weights", type=Path, help="ImageNet state dict of the backbone (a local .pth file)")
    p.add_argument("--no-pretrained", action="store_true", help="train from random weights (not the paper's setting)")
    p.add_argument("--backbone", choices=BACKBONES, default=None)
    p.add_argument("--setting", choices=["one-task", "multi-task"], default=None)
    p.add_argument("--table", type=int, choices=sorted(TABLES), help="preset backbone / setting / methods of a paper table")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--split-seed", type=int, default=0, help="seed of the per-class train/test split")
    p.add_argument("--epochs", type=int, default=None, help="epochs per stage (not given by the paper; default 30, smoke 1)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch (default 100, smoke 2)")
    p.add_argument("--classes-per-batch", type=int, default=None, help="default 16 (smoke 2)")
    p.add_argument("--images-per-class", type=int, default=None, help="default 5 for BN-Inception, 3 otherwise (smoke 2)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lambda-corr", type=float, default=10.0)
    p.add_argument("--lambda-mutual", type=float, default=8.0)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--drift-mode", choices=DRIFT_MODES, default="direct",
                   help="virtual features: direct (the paper), chained, learned (ridge-fitted maps, beyond the paper), "
                        "learned_chained (the maps from the previous model only) or none")
    p.add_argument("--gallery-report", action="store_true",
                   help="after every stage, also Recall@1 of a test gallery that is not re-embedded (stored / moved by "
                        "translation / moved by the learned maps / re-embedded); its own run directory")
    p.add_argument("--corr-direction", choices=["forward", "reverse"], default="forward",
                   help="'reverse' = the KL direction of the authors' code")
    p.add_argument("--image-size", type=int, default=None, help="crop size (default 224, smoke 32)")
    p.add_argument("--embed-decode", choices=EMBED_DECODES, default="workers",
                   help="where drift measurement and evaluation decode JPEGs: the DataLoader workers (Pillow) or the "
                        "run's device (torchvision; nvJPEG on a GPU, where worker decoding bounds those passes)")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 autocast; float16 + GradScaler on GPUs without bfloat16)")
    p.add_argument("--fresh", action="store_true", help="a run directory holding other settings is moved aside (<dir>.old-N) instead of refused")
    p.add_argument("--device", default=None)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--runs", type=Path, default=Path("runs") / dataset, help="checkpoints (an interrupted run resumes)")
    p.add_argument("--out", type=Path, help="write every run and the published numbers as JSON")
    p.add_argument("--smoke", action="store_true", help="tiny data in the real format, random weights, seconds")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="follow image paths of the annotation/list files that leave the dataset directory (refused by default)")
    if dataset == "cub200":
        p.add_argument("--cub-split", choices=["protocol", "official", "lists"], default="protocol")
        p.add_argument("--train-list", type=Path, help="'<path> <label>' list file (e.g. FECD's data/train.txt)")
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
            raise SystemExit("--weights is required (the ImageNet state dict of the backbone), or --no-pretrained")
        if args.weights is not None and not args.weights.is_file():
            raise SystemExit(f"--weights: no such file {args.weights}")
    if args.out is not None:  # known before training: say so now, not after hours of it
        check_output_file(args.out, "--out")
    if args.runs.exists() and not args.runs.is_dir():
        raise SystemExit(f"--runs {args.runs} is a file: name a directory for the checkpoints")
    return args


def data_and_model_flags(args) -> dict:
    """The command-line settings that change the data or the model (the weights file by its SHA-256)."""
    flags = {k: getattr(args, k, None) for k in ("backbone", "setting", "split_seed", "image_size", "cub_split", "crop",
                                                 "no_pretrained", "smoke", "drift_mode")}
    for k in ("data_root", "train_list", "test_list"):
        v = getattr(args, k, None)
        flags[k] = str(Path(v).resolve()) if v is not None and not args.smoke else None
    flags["weights_sha256"] = file_sha256(args.weights) if args.weights is not None and not args.no_pretrained else None
    if getattr(args, "embed_decode", "workers") != "workers":  # other pixels; absent at the default, so that run
        flags["embed_decode"] = args.embed_decode                # directories of earlier versions keep their names
    return flags


def make_configs(args, seed: int, m_per_class: int, batch: int) -> dict[str, OnlineConfig]:
    names = ["initial"] + [m for m in args.methods if m != "initial"]
    return {
        m: OnlineConfig(
            method=m, epochs=args.epochs, iterations_per_epoch=args.iterations, batch_size=batch,
            m_per_class=m_per_class, lr=args.lr, weight_decay=args.weight_decay, lambda_corr=args.lambda_corr,
            lambda_mutual=args.lambda_mutual, temperature=args.temperature, corr_direction=args.corr_direction,
            freeze_batchnorm=True, seed=seed, device=args.device, amp=args.amp, num_workers=args.num_workers,
            drift_mode=args.drift_mode, gallery_report=args.gallery_report,
            eval_batch_size=4 * batch, embed_decode=args.embed_decode,
        )
        for m in names
    }


def run(dataset: str, argv=None) -> list[dict]:
    """Parse ``argv``, run every method and seed, print the table with the published numbers, write --out."""
    args = resolve(build_parser(dataset).parse_args(argv), dataset)
    started_group = not distributed.is_active()
    # under torchrun: NCCL and this rank's GPU, or gloo (no GPU per rank, or --device cpu)
    device = distributed.init_from_env(backend="gloo" if args.device == "cpu" else None)
    try:
        rows = _run(dataset, args, device)
    except BaseException:
        if started_group:
            distributed.shutdown(wait=False)  # the other ranks may never reach a barrier
        raise
    if started_group:
        distributed.shutdown()
    return rows


def _run(dataset: str, args, device: torch.device) -> list[dict]:
    spec = DATASETS[dataset]
    if args.device is None and distributed.is_active():
        args.device = str(device)
    # flags left unset take the paper's values, or tiny ones for a smoke run
    defaults = dict(epochs=30, iterations=100, image_size=224, classes_per_batch=BATCH[args.backbone][0],
                    images_per_class=BATCH[args.backbone][1])
    if args.smoke:
        defaults.update(epochs=1, iterations=2, image_size=32, classes_per_batch=2, images_per_class=2)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    # known before anything is written or trained: the backbone takes this crop size and a batch of such
    # crops fits in memory (OnlineLearner checks every image file later)
    check_image_size(args.backbone, args.image_size)
    check_batch_memory(args.classes_per_batch * args.images_per_class, args.image_size, device)
    tmp = None
    if args.smoke:
        # rank 0 writes the tiny dataset; every rank reads it (and the checkpoints) from the same directory.
        # With --runs DIR it goes beside the checkpoints, written once with fixed seeds, so a rerun finds the
        # same files under the same paths and resumes; without, into a temporary directory gone at exit.
        if args.runs == Path("runs") / dataset:
            tmp = tempfile.TemporaryDirectory(prefix=f"pml_mutual_smoke_{dataset}_") if distributed.is_main() else None
            root = Path(distributed.broadcast_object(tmp.name if tmp else None))
            args.runs = root / "runs"
        else:
            root = args.runs / "smoke_data"
        if distributed.is_main() and not (root / dataset).exists():
            spec.write_fixture(root / dataset)
        distributed.barrier()
        args.data_root = root / dataset
        args.weights, args.no_pretrained, args.num_workers = None, True, 0
    m_per_class = args.images_per_class
    batch = args.classes_per_batch * m_per_class
    space = INPUT_SPACE[args.backbone]
    size = args.image_size
    factory = backbone_factory(args.backbone, None if args.no_pretrained else args.weights)
    rows, t_all = [], time.perf_counter()
    try:
        train_items, test_items = spec.load(args.data_root, args.split_seed, args)
        classes = np.unique(train_items.labels)
        # the paper's stage boundaries; moved proportionally when a subset (or smoke data) has fewer classes
        ends = scale_stage_ends(spec.stage_ends[args.setting], spec.num_classes, len(classes))
        class_to_stage = stages_from_ends(classes, ends)
        train = ImageListDataset(train_items, ProtocolTransform(True, space, size))
        test = ImageListDataset(test_items, ProtocolTransform(False, space, size))
        prototypes = ImageListDataset(train_items, ProtocolTransform(False, space, size))
        flags = data_and_model_flags(args)
        flag_hash = hashlib.sha256(json.dumps(flags, sort_keys=True).encode()).hexdigest()[:10]
        for seed in args.seeds:
            # every flag that changes the data or the model is in the tag (and in each run's identity)
            tag = (f"{args.backbone}_{args.setting}{'_smoke' if args.smoke else ''}_{flag_hash}"
                   f"{'_gallery' if args.gallery_report else ''}/seed{seed}")
            t0 = time.perf_counter()
            results = run_methods(
                factory, train, test, class_to_stage, make_configs(args, seed, m_per_class, batch),
                args.runs / tag, prototype_dataset=prototypes, identity_tags=flags, fresh=args.fresh,
            )
            for m, s in results.items():
                rows.append(result_row(dataset, args, m, seed, s))
            if distributed.is_main():
                print(f"seed {seed}: {len(results)} methods in {time.perf_counter() - t0:.0f}s "
                      f"({len(train_items)} train / {len(test_items)} test images, {len(classes)} classes)", flush=True)
    finally:
        distributed.barrier()
        if tmp is not None:
            tmp.cleanup()
    total = time.perf_counter() - t_all
    if not distributed.is_main():
        return rows
    print(format_table(rows, dataset, args.backbone, args.setting))
    if any("gallery" in r for r in rows):
        print(format_gallery(rows))
    print(f"\ntotal time: {total:.0f}s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"results": rows, "config": config, "seconds": total}, indent=2, default=str))
    return rows


def result_row(dataset: str, args, method: str, seed: int, summary: dict) -> dict:
    old, new, all_ = final_row(summary)
    per_stage = per_stage_row(summary)
    measured = [old, new, all_] if args.setting == "one-task" else per_stage
    return {
        "dataset": dataset, "backbone": args.backbone, "setting": args.setting, "method": method, "seed": seed,
        "recall@1": {"old": old, "new": new, "all": all_, "per_stage": per_stage[:-1]},
        "recall@k": summary["stages"][-1]["all"],
        "published": published(dataset, args.backbone, args.setting, method),
        "measured_columns": measured,
        "seconds": sum(log["seconds"] for log in summary["stage_logs"]),
        **({"gallery": final_gallery_row(summary)} if "gallery" in summary["stages"][-1] else {}),
    }


def final_gallery_row(summary: dict) -> dict:
    """The last stage's gallery report: all-class Recall@1 (%) of each gallery, and the update seconds."""
    g = summary["stages"][-1]["gallery"]
    return {**{name: 100 * recall_at(g[name]["all"], 1) for name in GALLERIES}, "seconds": g["seconds"]}


def format_gallery(rows: list[dict]) -> str:
    """:func:`pml_mutual.tables.format_gallery` of the rows' last-stage gallery reports."""
    return tables.format_gallery([
        {"method": r["method"], **{n: r["gallery"][n] / 100 for n in GALLERIES},
         **{f"{k}_seconds": v for k, v in r["gallery"]["seconds"].items()}}
        for r in rows if "gallery" in r])


def format_table(rows: list[dict], dataset: str, backbone: str, setting: str) -> str:
    """The paper's layout (:func:`pml_mutual.tables.format_recall_table`): measured mean ± std, the
    published value and measured − published."""
    title = f"{dataset} · {backbone} · {setting}: Recall@1 (%) measured (mean ± std over seeds) | published | Δ"
    return tables.format_recall_table(rows, setting, title)
