"""The paper's Tables 2, 3 and 5 on real data that installs offline, on a CPU.

    apt-get install dataset-fashion-mnist <fonts: see pml_mutual/data/glyphs.py>
    python benchmarks/cpu_realdata.py --dataset glyphs --setting multi-task --seeds 0 1 2 --out glyphs_mt.json
    python benchmarks/cpu_realdata.py --dataset fashion-mnist --setting one-task --quick      # minutes

Datasets: Fashion-MNIST (10 classes; one-task 0–4 → 5–9; multi-task 5 stages of 2 classes) and the
glyph dataset (200 of its character classes, spread evenly over code points; one-task 100 → 100;
multi-task 100 + 4 × 25, as CUB in the paper). Backbone: pml_mutual.models.SmallCNN (widths 16/32/64, 128-d; sized for 2 CPU cores).
Every method of a seed starts from one shared initial model. Prints the paper's table layouts (mean ±
std over seeds) and writes every run to --out as JSON. ``--validation`` evaluates on a validation
split carved from the training images of every class (for tuning; the test images are never used).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pml_mutual.checks import check_output_file
from pml_mutual.data.cpu_benchmark import load_cpu_benchmark
from pml_mutual.drift import DRIFT_MODES, SIMILARITIES
from pml_mutual.evaluation import gap_closed
from pml_mutual.experiment import final_row, mean_std, measure_fidelity, measure_gallery_update, per_stage_row, run_methods
from pml_mutual.models import SmallCNN
from pml_mutual.online import METHODS, OnlineConfig

ALL_METHODS = ["initial", "finetune", "joint", "fecd", "mutual_only", "fecd_mutual", "ours"]
# with one earlier stage there is no virtual feature: ours_no_drift would repeat fecd_mutual
MULTI_TASK_ONLY = ["ours_no_drift"]
ABLATION = ["mutual_only", "fecd", "fecd_mutual", "ours_no_drift", "ours"]

# Hyper-parameters at this scale, chosen on the validation split (see README "CPU real-data benchmark").
DATASETS = {
    "fashion-mnist": dict(batch_size=64, m_per_class=32, per_class_train=1000, lambda_corr=1000.0, lambda_mutual=1.0),
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
        drift_similarity=args.drift_similarity,
        drift_mode=args.drift_mode,
        # From-scratch CNN: BatchNorm learns in stage 0 and in the fresh F_s, and is frozen in networks
        # that inherit trained weights (freezing it from scratch collapses the embedding).
        freeze_batchnorm="inherited",
        seed=seed,
        device=args.device,
    )


def fmt(mean, std):
    return f"{mean:6.2f} ± {std:4.2f}"


def print_tables(rows, setting, methods):
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    if setting == "one-task":
        print("\nTable 2 layout — one-task, Recall@1 (%) of the final model, mean ± std over seeds")
        print(f"{'method':<12} {'old':>15} {'new':>15} {'all':>15}")
        for m in methods:
            if m in by_method:
                mean, std = mean_std([[r["recall@1"][k] for k in ("old", "new", "all")] for r in by_method[m]])
                print(f"{m:<12} " + " ".join(fmt(a, b) for a, b in zip(mean, std)))
        return
    n_stages = len(rows[0]["recall@1"]["per_stage"])
    for title, cols in (("Table 3 layout — multi-task", [m for m in methods if m in by_method]),
                        ("Table 5 layout — ablation (no L_corr / no L_mutual / no virtual / no drift estimate / all)",
                         [m for m in ABLATION if m in by_method])):
        print(f"\n{title}: final model's Recall@1 (%) on each stage's classes, mean ± std over seeds")
        print(f"{'classes':<10} " + " ".join(f"{m:>15}" for m in cols))
        stats = {m: mean_std([r["recall@1"]["per_stage"] + [r["recall@1"]["all"]] for r in by_method[m]]) for m in cols}
        for i in range(n_stages + 1):
            label = f"stage {i}" if i < n_stages else "all"
            print(f"{label:<10} " + " ".join(f"{fmt(stats[m][0][i], stats[m][1][i]):>15}" for m in cols))


def print_fidelity(rows):
    """Per stage i, the mean over earlier stages b (and seeds) of cos(virtual, real F_b) and the cross-model
    Recall@1 (real F_b queries against the virtual gallery); "gap" = share of teacher → real closed."""
    modes = [m for m in ("teacher", "none", "direct", "learned", "real") if m in rows[0]]
    print("\nFidelity of the virtual features (the `ours` run's checkpoints): mean cos(virtual, real F_b) / "
          "cross-model Recall@1 (%), mean over earlier stages b and seeds")
    print(f"{'after':<7} " + " ".join(f"{'teacher (none)' if m == 'teacher' else m:>15}" for m in modes) + f" {'gap closed: direct':>20} {'learned':>9}")
    for i in sorted({r["after_stage"] for r in rows}):
        rs = [r for r in rows if r["after_stage"] == i]
        cells = [f"{np.mean([r[m]['cosine'] for r in rs]):.3f} / {100 * np.mean([r[m]['recall@1'] for r in rs]):5.1f}" for m in modes]
        gaps = [np.nanmean([gap_closed(r, m) for r in rs]) if m in rs[0] else float("nan") for m in ("direct", "learned")]
        print(f"stage {i:<2} " + " ".join(f"{c:>15}" for c in cells) + f" {gaps[0]:>20.2f} {gaps[1]:>9.2f}")
    print("\nWhat the estimates change in Eq. 6: mean KL(σ_T(G_estimate) ‖ σ_T(G_teacher))·T² over batches of 80 "
          "held-out images (the real F_b: what a perfect estimate would add; teacher = 0)")
    print(f"{'after':<7} " + " ".join(f"{m:>12}" for m in modes if m != "teacher"))
    for i in sorted({r["after_stage"] for r in rows}):
        rs = [r for r in rows if r["after_stage"] == i]
        print(f"stage {i:<2} " + " ".join(f"{np.mean([r[m]['gram_kl'] for r in rs]):>12.2e}" for m in modes if m != "teacher"))


def print_gallery(rows):
    """Final stage: all-class Recall@1 of F_final's queries against the gallery (a)–(d), mean ± std over seeds,
    the share of the (a) → (d) gap each update recovers and its time against re-embedding."""
    last = max(r["after_stage"] for r in rows)
    print("\nGallery without re-embedding, after the last stage: Recall@1 (%) of the final model's queries against "
          "(a) the stored gallery, (b) moved by translation, (c) moved by the learned maps, (d) re-embedded")
    print(f"{'method':<14} {'(a) stored':>15} {'(b) translation':>15} {'(c) learned':>15} {'(d) re-embedded':>15} "
          f"{'gap (b)':>8} {'gap (c)':>8} {'time (c)/(d)':>13}")
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m and r["after_stage"] == last]
        cells = [fmt(*[v[0] for v in mean_std([[100 * r[k]] for r in rs])]) for k in ("stored", "translation", "learned", "reembedded")]
        gap = lambda k: np.mean([(r[k] - r["stored"]) / max(r["reembedded"] - r["stored"], 1e-12) for r in rs])  # noqa: E731
        ratio = np.mean([r["learned_seconds"] / max(r["reembed_seconds"], 1e-12) for r in rs])
        print(f"{m:<14} " + " ".join(f"{c:>15}" for c in cells) + f" {gap('translation'):>8.2f} {gap('learned'):>8.2f} {ratio:>13.4f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(DATASETS), required=True)
    p.add_argument("--setting", choices=["one-task", "multi-task"], required=True)
    p.add_argument("--methods", nargs="+", default=None, choices=sorted(METHODS),
                   help="default: all of them (ours_no_drift in the multi-task setting only)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="a reduced run (1 seed, few iterations, fewer classes)")
    p.add_argument("--validation", action="store_true", help="evaluate on a validation split of the training images")
    p.add_argument("--epochs", type=int, default=2, help="epochs of every stage after the first")
    p.add_argument("--initial-epochs", type=int, default=4)
    p.add_argument("--iterations", type=int, default=75, help="iterations per epoch")
    p.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64], help="SmallCNN channel widths")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lambda-corr", type=float, default=None, help="λ2 (default: the dataset's tuned value)")
    p.add_argument("--lambda-mutual", type=float, default=None, help="λ3 (default: the dataset's tuned value)")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--drift-similarity", choices=SIMILARITIES, default=OnlineConfig.drift_similarity,
                   help="the weight S of Eq. 3 and 4")
    p.add_argument("--drift-mode", choices=DRIFT_MODES, default=OnlineConfig.drift_mode,
                   help="direct (the paper: F_b → F_{i-1}), chained (SDC: stage to stage) or none (zero drift)")
    p.add_argument("--fidelity", action="store_true",
                   help="after each seed, measure the virtual features of drift modes none/direct/learned against "
                        "the real earlier models on the `ours` run's checkpoints (multi-task)")
    p.add_argument("--gallery", action="store_true",
                   help="after each seed, Recall@1 of a gallery that is not re-embedded (stored / moved by translation / "
                        "moved by learned maps / re-embedded) on the checkpoints of every method (multi-task)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=Path, default=Path("runs/cpu_realdata"), help="checkpoint directory (resumable)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = ALL_METHODS + (MULTI_TASK_ONLY if args.setting == "multi-task" else [])
    # known before any training: refused now, not after the runs
    if args.out is not None:
        check_output_file(args.out, "--out")
    if args.runs.exists() and not args.runs.is_dir():
        raise SystemExit(f"--runs {args.runs} is a file: name a directory for the checkpoints")
    if args.fidelity and ("ours" not in args.methods or args.setting != "multi-task"):
        raise SystemExit("--fidelity measures the `ours` run's virtual features: it needs --methods with ours and "
                         "--setting multi-task")
    if args.gallery and (args.setting != "multi-task" or not set(args.methods) - {"initial"}):
        raise SystemExit("--gallery measures the checkpoints of a trained method over several stages: it needs "
                         "--setting multi-task and a method other than initial")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seeds = args.seeds[:1] if args.quick else args.seeds
    train, test, stages = load_cpu_benchmark(args.dataset, args.validation, args.quick, DATASETS[args.dataset]["per_class_train"])
    class_to_stage = stages[args.setting]
    names = ["initial"] + [m for m in args.methods if m != "initial"]
    tag = f"{args.dataset}_{args.setting}{'_quick' if args.quick else ''}{'_val' if args.validation else ''}"
    rows, fidelity, gallery = [], [], []
    t_all = time.perf_counter()
    for seed in seeds:
        configs = {m: make_config(args.dataset, m, seed, args.quick, args) for m in names}
        t0 = time.perf_counter()
        results, learners = run_methods(lambda: SmallCNN(widths=tuple(args.widths)), train, test, class_to_stage, configs,
                                        args.runs / tag / f"seed{seed}", return_learners=True)
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
            rows.append({
                "method": m, "seed": seed, "setting": args.setting, "dataset": args.dataset,
                "recall@1": {"old": old, "new": new, "all": all_, "per_stage": per_stage_row(s)[:-1]},
                "recall@k": s["stages"][-1]["all"],
                "accuracy_matrix": s["accuracy_matrix"],
                "seconds": sum(log["seconds"] for log in s["stage_logs"]),
            })
        print(f"seed {seed}: {len(names)} methods in {elapsed:.0f}s", flush=True)
    print_tables(rows, args.setting, names)
    if fidelity:
        print_fidelity(fidelity)
    if gallery:
        print_gallery(gallery)
    total = time.perf_counter() - t_all
    print(f"\ntotal time: {total:.0f}s ({len(seeds)} seed(s), {len(train)} training / {len(test)} "
          f"{'validation' if args.validation else 'test'} images)")
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
