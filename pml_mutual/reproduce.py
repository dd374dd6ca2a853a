"""Reproduce the paper's Tables 2–6 on CUB-200-2011, Cars196 and DeepFashion2 (the CLI behind
``benchmarks/cub200.py``, ``benchmarks/cars196.py`` and ``benchmarks/deepfashion2.py``).

Data, weights and defaults: :data:`pml_mutual.reproduce_args.EPILOG` (what every script's ``--help`` ends
with).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed, tables
from .data.images import ImageListDataset
from .data.stages import scale_stage_ends, stages_from_ends
from .data.transforms import ProtocolTransform
from .evaluation.results import recall_at
from .experiment import final_row, per_stage_row, run_methods
from .gallery import GALLERIES
from .models.backbones import (
    BATCH,
    INPUT_SPACE,
    backbone_factory,
    check_batch_memory,
    check_image_size,
)
from .published import published
from .reproduce_args import DATASETS, build_parser, data_and_model_flags, make_configs, resolve


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
    defaults = dict(
        epochs=30,
        iterations=100,
        image_size=224,
        classes_per_batch=BATCH[args.backbone][0],
        images_per_class=BATCH[args.backbone][1],
    )
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
            tmp = (
                tempfile.TemporaryDirectory(prefix=f"pml_mutual_smoke_{dataset}_")
                if distributed.is_main()
                else None
            )
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
            smoke, gallery = "_smoke" if args.smoke else "", "_gallery" if args.gallery_report else ""
            tag = f"{args.backbone}_{args.setting}{smoke}_{flag_hash}{gallery}/seed{seed}"
            t0 = time.perf_counter()
            results = run_methods(
                factory,
                train,
                test,
                class_to_stage,
                make_configs(args, seed, m_per_class, batch),
                args.runs / tag,
                prototype_dataset=prototypes,
                identity_tags=flags,
                fresh=args.fresh,
            )
            for m, s in results.items():
                rows.append(result_row(dataset, args, m, seed, s))
            if distributed.is_main():
                print(
                    f"seed {seed}: {len(results)} methods in {time.perf_counter() - t0:.0f}s "
                    f"({len(train_items)} train / {len(test_items)} test images, {len(classes)} classes)",
                    flush=True,
                )
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
        args.out.write_text(
            json.dumps({"results": rows, "config": config, "seconds": total}, indent=2, default=str)
        )
    return rows


def result_row(dataset: str, args, method: str, seed: int, summary: dict) -> dict:
    old, new, all_ = final_row(summary)
    per_stage = per_stage_row(summary)
    measured = [old, new, all_] if args.setting == "one-task" else per_stage
    return {
        "dataset": dataset,
        "backbone": args.backbone,
        "setting": args.setting,
        "method": method,
        "seed": seed,
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
    return tables.format_gallery(
        [
            {
                "method": r["method"],
                **{n: r["gallery"][n] / 100 for n in GALLERIES},
                **{f"{k}_seconds": v for k, v in r["gallery"]["seconds"].items()},
            }
            for r in rows
            if "gallery" in r
        ]
    )


def format_table(rows: list[dict], dataset: str, backbone: str, setting: str) -> str:
    """The paper's layout (:func:`pml_mutual.tables.format_recall_table`): measured mean ± std, the
    published value and measured − published."""
    title = (
        f"{dataset} · {backbone} · {setting}: Recall@1 (%) measured (mean ± std over seeds) | published | Δ"
    )
    return tables.format_recall_table(rows, setting, title)
