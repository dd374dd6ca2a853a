"""The paper's Tables 2, 3 and 5 on real data that installs offline, on a CPU.

    apt-get install dataset-fashion-mnist <fonts: see pml_mutual/data/glyphs.py>
    python benchmarks/cpu_realdata.py --dataset glyphs --setting multi-task --seeds 0 1 2 --out glyphs_mt.json
    python benchmarks/cpu_realdata.py --dataset fashion-mnist --setting one-task --quick      # minutes

Datasets: Fashion-MNIST (10 classes; one-task 0–4 → 5–9; multi-task 5 stages of 2 classes) and the
glyph dataset (200 of its character classes, spread evenly over code points; one-task 100 → 100;
multi-task 100 + 4 × 25, as CUB in the paper). Backbone: pml_mutual.models.SmallCNN (widths 16/32/64, 128-d;
sized for 2 CPU cores).
Every method of a seed starts from one shared initial model. Prints the paper's table layouts (mean ±
std over seeds) and writes every run to --out as JSON. ``--validation`` evaluates on a validation
split carved from the training images of every class (for tuning; the test images are never used).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pml_mutual.checks import check_output_file
from pml_mutual.data.cpu_benchmark import RandomAffine, load_cpu_benchmark
from pml_mutual.drift import DRIFT_MODES, SIMILARITIES
from pml_mutual.experiment import (
    final_row,
    measure_fidelity,
    measure_gallery_update,
    per_stage_row,
    run_methods,
)
from pml_mutual.models import SmallCNN
from pml_mutual.online import METHODS, OnlineConfig
from pml_mutual.tables import format_fidelity, format_gallery, format_recall_table

ALL_METHODS = ["initial", "finetune", "joint", "fecd", "mutual_only", "fecd_mutual", "ours"]
# with one earlier stage there is no virtual feature: ours_no_drift would repeat fecd_mutual
MULTI_TASK_ONLY = ["ours_no_drift"]
ABLATION = ["mutual_only", "fecd", "fecd_mutual", "ours_no_drift", "ours"]

# Hyper-parameters at this scale, chosen on the validation split (see README "CPU real-data benchmark").
DATASETS = {
    "fashion-mnist": dict(
        batch_size=64, m_per_class=32, per_class_train=1000, lambda_corr=1000.0, lambda_mutual=1.0
    ),
    "glyphs": dict(batch_size=64, m_per_class=4, per_class_train=None, lambda_corr=100.0, lambda_mutual=1.0),
}


def make_config(dataset: str, method: str, seed: int, quick: bool, args) -> OnlineConfig:
    d = DATASETS[dataset]
    return OnlineConfig(
        method=method,
        epochs=1 if quick else args.epochs,
        initial_epochs=2 if quick else args.initial_epochs,
        iterations_per_epoch=30 if quick else args.iterations,
        batch_size=32 if quick and dataset == "glyphs" else d["batch_size"],
        m_per_class=d["m_per_class"],
        lr=args.lr,
        weight_decay=0.0,
        lambda_corr=args.lambda_corr if args.lambda_corr is not None else d["lambda_corr"],
        lambda_mutual=args.lambda_mutual if args.lambda_mutual is not None else d["lambda_mutual"],
        temperature=args.temperature,
        lambda_compat=args.lambda_compat,
        # the methods whose runs measure drift; the gallery replays of the others use the images alone
        drift_views=args.drift_views if METHODS[method].measures_drift(args.drift_mode) else 0,
        drift_similarity=args.drift_similarity,
        drift_mode=args.drift_mode,
        # From-scratch CNN: BatchNorm learns in stage 0 and in the fresh F_s, and is frozen in networks
        # that inherit trained weights (freezing it from scratch collapses the embedding).
        freeze_batchnorm="inherited",
        seed=seed,
        device=args.device,
    )


def print_tables(rows, setting, methods):
    if setting == "one-task":
        print(
            format_recall_table(
                rows,
                setting,
                "Table 2 layout — one-task, Recall@1 (%) of the final model, mean ± std over seeds",
                methods,
            )
        )
        return
    for title, cols in (
        ("Table 3 layout — multi-task", methods),
        (
            "Table 5 layout — ablation (no L_corr / no L_mutual / no virtual / no drift estimate / all)",
            ABLATION,
        ),
    ):
        print(
            format_recall_table(
                rows,
                setting,
                f"{title}: final model's Recall@1 (%) on each stage's classes, mean ± std over seeds",
                cols,
            )
        )


def parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The benchmark's flags (also read by tools that measure its runs, e.g. ``gallery_maps.py``)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(DATASETS), required=True)
    p.add_argument("--setting", choices=["one-task", "multi-task"], required=True)
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=sorted(METHODS),
        help="default: all of them (ours_no_drift in the multi-task setting only)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--quick", action="store_true", help="a reduced run (1 seed, few iterations, fewer classes)"
    )
    p.add_argument(
        "--validation", action="store_true", help="evaluate on a validation split of the training images"
    )
    p.add_argument("--epochs", type=int, default=2, help="epochs of every stage after the first")
    p.add_argument("--initial-epochs", type=int, default=4)
    p.add_argument("--iterations", type=int, default=75, help="iterations per epoch")
    p.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64], help="SmallCNN channel widths")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lambda-corr", type=float, default=None, help="λ2 (default: the dataset's tuned value)")
    p.add_argument(
        "--lambda-mutual", type=float, default=None, help="λ3 (default: the dataset's tuned value)"
    )
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument(
        "--lambda-compat",
        type=float,
        default=0.0,
        help="weight of the compatibility term (OnlineConfig.lambda_compat; 0: off)",
    )
    p.add_argument(
        "--augment",
        action="store_true",
        help="train on randomly rotated, scaled and shifted images "
        "(pml_mutual.data.cpu_benchmark.RandomAffine)",
    )
    p.add_argument(
        "--drift-views",
        type=int,
        default=0,
        help="views of each stage's training images through RandomAffine added to drift measurement "
        "(OnlineConfig.drift_views, view_dataset=; training sees them so only with --augment)",
    )
    p.add_argument(
        "--drift-similarity",
        choices=SIMILARITIES,
        default=OnlineConfig.drift_similarity,
        help="the weight S of Eq. 3 and 4",
    )
    p.add_argument(
        "--drift-mode",
        choices=DRIFT_MODES,
        default=OnlineConfig.drift_mode,
        help="direct (the paper: F_b → F_{i-1}), chained (SDC: stage to stage) or none (zero drift)",
    )
    p.add_argument(
        "--fidelity",
        action="store_true",
        help="after each seed, measure the virtual features of drift modes none/direct/learned against "
        "the real earlier models on the `ours` run's checkpoints (multi-task)",
    )
    p.add_argument(
        "--gallery",
        action="store_true",
        help="after each seed, Recall@1 of a gallery that is not re-embedded (stored / moved by translation "
        "/ moved by learned maps / re-embedded) on the checkpoints of every method (multi-task)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--runs", type=Path, default=Path("runs/cpu_realdata"), help="checkpoint directory (resumable)"
    )
    p.add_argument("--out", type=Path, default=None)
    return p


def run_tag(args) -> str:
    """The run directory's name under ``--runs`` for these flags."""
    tag = f"{args.dataset}_{args.setting}{'_quick' if args.quick else ''}{'_val' if args.validation else ''}"
    tag += f"_compat{args.lambda_compat:g}" if args.lambda_compat else ""
    tag += "_aug" if args.augment else ""
    return tag + (f"_views{args.drift_views}" if args.drift_views else "")


def run_seed(args, seed: int, names, train, test, class_to_stage):
    """(configs, results, learners) of ``names`` for one seed, trained or resumed under ``--runs``."""
    configs = {m: make_config(args.dataset, m, seed, args.quick, args) for m in names}
    results, learners = run_methods(
        lambda: SmallCNN(widths=tuple(args.widths)),
        RandomAffine(train) if args.augment else train,
        test,
        class_to_stage,
        configs,
        args.runs / run_tag(args) / f"seed{seed}",
        return_learners=True,
        # augmented training images; prototypes, drift and evaluation see the images as they are
        **({"prototype_dataset": train} if args.augment else {}),
        # drift's extra views: the images through RandomAffine, whether training sees them so or not
        **({"view_dataset": RandomAffine(train)} if args.drift_views else {}),
    )
    return configs, results, learners


def main(argv=None):
    args = parser().parse_args(argv)
    if args.methods is None:
        args.methods = ALL_METHODS + (MULTI_TASK_ONLY if args.setting == "multi-task" else [])
    # known before any training: refused now, not after the runs
    if args.out is not None:
        check_output_file(args.out, "--out")
    if args.runs.exists() and not args.runs.is_dir():
        raise SystemExit(f"--runs {args.runs} is a file: name a directory for the checkpoints")
    if args.fidelity and ("ours" not in args.methods or args.setting != "multi-task"):
        raise SystemExit(
            "--fidelity measures the `ours` run's virtual features: it needs --methods with ours and "
            "--setting multi-task"
        )
    if args.gallery and (args.setting != "multi-task" or not set(args.methods) - {"initial"}):
        raise SystemExit(
            "--gallery measures the checkpoints of a trained method over several stages: it needs --setting "
            "multi-task and a method other than initial"
        )
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seeds = args.seeds[:1] if args.quick else args.seeds
    train, test, stages = load_cpu_benchmark(
        args.dataset, args.validation, args.quick, DATASETS[args.dataset]["per_class_train"]
    )
    class_to_stage = stages[args.setting]
    names = ["initial"] + [m for m in args.methods if m != "initial"]
    rows, fidelity, gallery = [], [], []
    t_all = time.perf_counter()
    for seed in seeds:
        t0 = time.perf_counter()
        configs, results, learners = run_seed(args, seed, names, train, test, class_to_stage)
        elapsed = time.perf_counter() - t0
        if args.fidelity and "ours" in learners:
            t1 = time.perf_counter()
            for row in measure_fidelity(learners["ours"]):
                fidelity.append(dict(row, seed=seed))
            print(f"seed {seed}: fidelity measured in {time.perf_counter() - t1:.1f}s", flush=True)
        if args.gallery:
            for m, lrn in learners.items():
                if m != "initial" and len(lrn.train_stages) > 1:
                    gallery.extend(dict(row, method=m, seed=seed) for row in measure_gallery_update(lrn))
        for m in names:
            s = results[m]
            old, new, all_ = final_row(s)
            rows.append(
                {
                    "method": m,
                    "seed": seed,
                    "setting": args.setting,
                    "dataset": args.dataset,
                    "recall@1": {"old": old, "new": new, "all": all_, "per_stage": per_stage_row(s)[:-1]},
                    "recall@k": s["stages"][-1]["all"],
                    "accuracy_matrix": s["accuracy_matrix"],
                    "seconds": sum(log["seconds"] for log in s["stage_logs"]),
                }
            )
        print(f"seed {seed}: {len(names)} methods in {elapsed:.0f}s", flush=True)
    print_tables(rows, args.setting, names)
    if fidelity:
        print(format_fidelity(fidelity))
    if gallery:
        print(format_gallery(gallery))
    total = time.perf_counter() - t_all
    print(
        f"\ntotal time: {total:.0f}s ({len(seeds)} seed(s), {len(train)} training / {len(test)} "
        f"{'validation' if args.validation else 'test'} images)"
    )
    if args.out:
        config = {k: v for k, v in vars(args).items() if k not in ("out", "runs")}
        shared = {k: v for k, v in configs[names[-1]].to_dict().items() if k != "method"}  # every method's
        config.update(DATASETS[args.dataset], seeds=seeds, hyper_parameters=shared)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"results": rows, "config": config, "seconds": total}
        if fidelity:
            doc["fidelity"] = fidelity
        if gallery:
            doc["gallery"] = gallery
        args.out.write_text(json.dumps(doc, indent=2, default=str))


if __name__ == "__main__":
    main()
