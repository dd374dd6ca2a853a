"""Would local maps move a stored gallery better than one global linear map? A design measurement.

    python benchmarks/gallery_maps.py --dataset glyphs --setting multi-task --validation --seeds 0 \\
        --lambda-compat 10 --augment --drift-views 4 --out gallery_maps.json

Takes :mod:`cpu_realdata`'s flags, trains (or resumes under ``--runs``) its ``ours`` run, and after the last
stage moves each earlier stage's stored test items into the last model's space by forward maps fitted on
the last stage's images (the prototype images, plus ``--drift-views`` augmented views) in three ways:

- ``global``: one ridge map per stage (:func:`pml_mutual.drift.fit_linear_map`, what ships);
- ``class-local``: one map per class of the stored stage, each fitted with every image weighted by its
  Gaussian similarity to that class's prototype (normalised over the classes) and shrunk toward the global
  map; an item is moved by the maps mixed with its own weights;
- ``cluster-local``: the same with k-means clusters of the fit images instead of the stored prototypes
  (Dual-E's per-cluster ridge maps).

Prints Recall@1 of the last model's queries against each gallery and the share of the stored →
re-embedded gap each recovers, by the stage whose classes the queries are of.
"""

from __future__ import annotations

import json

import cpu_realdata  # the benchmark whose runs this measures (the script's folder is on the path)
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from pml_mutual.checks import check_output_file
from pml_mutual.data.cpu_benchmark import load_cpu_benchmark
from pml_mutual.data.views import AugmentedViews
from pml_mutual.drift import fit_linear_map
from pml_mutual.drift.equations import similarity_weights
from pml_mutual.evaluation import cross_stage_recalls, extract_embeddings


def local_maps(source, target, centres, global_map, shrink: float, sigma: float):
    """Per centre k: W_k = (Xᵀ Ω_k X + λ_k I)⁻¹ (Xᵀ Ω_k Y + λ_k W_global) on Ω_k-weighted centred rows,
    Ω_k the rows' Gaussian weights on centre k (normalised over centres), λ_k = ``shrink`` × the mean
    eigenvalue of the rows' scatter per row × Σ Ω_k: a centre with little weight keeps the global map."""
    x, y = source.double(), target.double()
    weights = similarity_weights(source, centres, "gaussian", dim=1, sigma=sigma).double()
    per_row = float(((x - x.mean(0)) ** 2).sum()) / x.shape[1] / len(x)
    eye, w_global = torch.eye(x.shape[1], dtype=torch.float64), global_map[0].double()
    maps_w, maps_b = [], []
    for k in range(len(centres)):
        w = weights[:, k : k + 1]
        mx, my = (w * x).sum(0) / w.sum(), (w * y).sum(0) / w.sum()
        xc = x - mx
        lam = shrink * per_row * float(w.sum())
        m = torch.linalg.solve((w * xc).T @ xc + lam * eye, (w * xc).T @ (y - my) + lam * w_global)
        maps_w.append(m)
        maps_b.append(my - mx @ m)
    return torch.stack(maps_w).float(), torch.stack(maps_b).float()


def apply_local(x, centres, maps, sigma: float):
    weights = similarity_weights(x, centres, "gaussian", dim=1, sigma=sigma)  # (N, K)
    return torch.einsum("nk,nke->ne", weights, torch.einsum("nd,kde->nke", x, maps[0]) + maps[1][None])


def kmeans(feats, k: int, iterations: int = 20):
    """Spherical k-means (seeded), the centres in the features' scale."""
    unit = F.normalize(feats, dim=1)
    centres = unit[torch.randperm(len(unit), generator=torch.Generator().manual_seed(0))[:k]]
    for _ in range(iterations):
        assign = (unit @ centres.T).argmax(1)
        centres = torch.stack(
            [
                F.normalize(unit[assign == j].mean(0), dim=0) if (assign == j).any() else centres[j]
                for j in range(k)
            ]
        )
    scale = feats.norm(dim=1).mean()
    return centres * scale


def measure(learner, views: int, shrinks, sigma: float, clusters: int) -> dict:
    last = len(learner.train_stages) - 1
    models = [learner.load_stage_model(s) for s in range(last + 1)]
    seen = learner.seen_test_positions(last)
    items = Subset(learner.test_dataset, seen.tolist())
    labels = np.asarray(learner.test_labels)[seen]
    item_stage = np.array([learner.class_to_stage[int(c)] for c in labels])

    def embed(model, dataset):
        return extract_embeddings(model, dataset, batch_size=256)[0]

    def rows(model):  # what the maps are fitted on: the last stage's prototype images, then the views
        feats = embed(model, learner.prototype_stages[last])
        if not views:
            return feats
        extra = AugmentedViews(learner.view_stages[last], views, seed=(learner.config.seed, last))
        return torch.cat([feats, embed(model, extra)])

    latest, fit_new = embed(models[last], items), rows(models[last])
    stored = latest.clone()
    galleries = {}
    for t in range(last):
        mask = torch.from_numpy(item_stage == t)
        x = stored[mask] = embed(models[t], Subset(items, np.flatnonzero(item_stage == t).tolist()))
        fit_old = rows(models[t])
        global_map = fit_linear_map(fit_old, fit_new)
        proto_feats, proto_labels = extract_embeddings(models[t], learner.prototype_stages[t], batch_size=256)
        prototypes = torch.stack([proto_feats[proto_labels == c].mean(0) for c in torch.unique(proto_labels)])
        moved = {"global": x @ global_map[0] + global_map[1]}
        centres = kmeans(fit_old, clusters)
        for shrink in shrinks:
            maps = local_maps(fit_old, fit_new, prototypes, global_map, shrink, sigma)
            moved[f"class-local λ{shrink:g}"] = apply_local(x, prototypes, maps, sigma)
            maps = local_maps(fit_old, fit_new, centres, global_map, shrink, sigma)
            moved[f"cluster-local k{clusters} λ{shrink:g}"] = apply_local(x, centres, maps, sigma)
        for name, v in moved.items():  # the last stage's items stay as stored: by the last model
            galleries.setdefault(name, latest.clone())[mask] = F.normalize(v, dim=1)
    report = {
        name: cross_stage_recalls(latest, g, labels, learner.class_to_stage, last, (1,))
        for name, g in {"stored": stored, **galleries, "reembedded": latest}.items()
    }
    out = {}
    for name, r in report.items():
        by_stage = []
        for s in range(last):
            a, d = report["stored"]["per_stage"][s][1], report["reembedded"]["per_stage"][s][1]
            by_stage.append((r["per_stage"][s][1] - a) / (d - a) if d - a > 0.005 else None)
        a, d = report["stored"]["all"][1], report["reembedded"]["all"][1]
        out[name] = {"all": r["all"][1], "share": (r["all"][1] - a) / (d - a), "share_by_stage": by_stage}
    return out


def main(argv=None):
    p = cpu_realdata.parser(__doc__)
    p.add_argument("--shrinks", type=float, nargs="+", default=[0.03, 0.3, 3.0])
    p.add_argument("--sigma", type=float, default=0.4, help="the Gaussian weights' width (unit embeddings)")
    p.add_argument("--clusters", type=int, default=16)
    args = p.parse_args(argv)
    args.methods, args.fidelity, args.gallery = ["ours"], False, False
    if args.out is not None:
        check_output_file(args.out, "--out")
    train, test, stages = load_cpu_benchmark(
        args.dataset, args.validation, args.quick, cpu_realdata.DATASETS[args.dataset]["per_class_train"]
    )
    rows = []
    for seed in args.seeds[:1] if args.quick else args.seeds:
        _, _, learners = cpu_realdata.run_seed(
            args, seed, ["initial", "ours"], train, test, stages[args.setting]
        )
        result = measure(learners["ours"], args.drift_views, args.shrinks, args.sigma, args.clusters)
        print(f"seed {seed}: Recall@1 % (share of the stored → re-embedded gap; by stage 0 1 2 ...)")
        for name, r in result.items():
            shares = " ".join("–" if v is None else f"{v:.2f}" for v in r["share_by_stage"])
            print(f"  {name:28s} {100 * r['all']:6.2f}  ({r['share']:.2f}; {shares})")
        rows.append({"seed": seed, "maps": result})
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"rows": rows, "config": {k: str(v) for k, v in vars(args).items()}}, indent=2)
        )


if __name__ == "__main__":
    main()
