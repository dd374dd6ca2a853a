"""Recall@K evaluation: this project's evaluator vs raw FAISS flat search vs PML's AccuracyCalculator.

    python benchmarks/perf_eval.py                 # N = 5k, 20k, 88k (DeepFashion2's test size), D = 512
    python benchmarks/perf_eval.py --quick         # N = 2k, 5k (seconds; run by the tests)
    python benchmarks/perf_eval.py --sizes 88000 --variants torch@1248 raw_torch@1248 --device cuda
    python benchmarks/perf_eval.py --sizes 20000 --dim 128 --variants ours@1248 torch@1248 --ties

Each (variant, N) runs in its own subprocess so that its peak RSS is its own. Variants:
  ours@1      pml_mutual.evaluation.recall_at_k(ks=(1,))
  ours@1248   recall_at_k(ks=(1, 2, 4, 8))
  faiss@1     raw faiss IndexFlatIP: add + search(k=2) over all queries (the floor for Recall@1)
  faiss@1248  the same with k=9
  pml@1       AccuracyCalculator(include=("precision_at_1",), k=1).get_accuracy(ref_includes_query=True)
  torch@1248  recall_at_k(ks=(1, 2, 4, 8), backend="torch", device=--device)
  raw_torch@1248  plain chunked matmul + topk(k=9) on --device, host→device copy included (the limit
              the torch backend is measured against; it ignores ties and self-exclusion)
``--ties`` also runs the variants on a collapsed model's embeddings (every row equal: every pair ties)
and prints their time and memory against the clustered data of the same N.
Printed last: one `name: value` line per measurement and `ratio:` lines against raw FAISS.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from common import RESULTS, rss_bytes, write_result

VARIANTS = ("ours@1", "ours@1248", "faiss@1", "faiss@1248", "pml@1", "torch@1248", "raw_torch@1248")
DEFAULT_VARIANTS = VARIANTS[:5]


def make_data(n, dim, seed=0, kind="clustered"):
    """Clustered unit embeddings, ~4 items per class (DeepFashion2-like), float32; ``kind="tied"``: the
    same labels, every embedding the same unit vector (a collapsed model)."""
    rng = np.random.default_rng(seed)
    if kind == "tied":
        labels = rng.integers(0, max(2, n // 4), n)
        return np.full((n, dim), 1 / np.sqrt(dim), dtype=np.float32), labels.astype(np.int64)
    n_classes = max(2, n // 4)
    labels = rng.integers(0, n_classes, n)
    centres = rng.standard_normal((n_classes, dim)).astype(np.float32)
    emb = centres[labels] + 1.5 * rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return np.ascontiguousarray(emb, dtype=np.float32), labels.astype(np.int64)


def current_rss_mb() -> float:
    return rss_bytes() / 2**20


def raw_torch_knn(emb, k, device, chunk=8192):
    import torch

    x = torch.from_numpy(emb).to(device)
    out = []
    for start in range(0, len(x), chunk):
        out.append((x[start : start + chunk] @ x.T).topk(k, dim=1).indices)
    return torch.cat(out).cpu().numpy()


def child(variant, n, dim, kind="clustered", device="cpu"):
    # Every variant imports the same libraries before the clock starts: an evaluator runs inside a
    # training process, so import time and the libraries' resident memory are not its cost.
    import faiss
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from pml_mutual.evaluation import recall_at_k

    emb, labels = make_data(n, dim, kind=kind)
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # the CUDA context exists in a training process already
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss can be set by data generation itself: also sample the resident size during the call.
    rss_before, during = current_rss_mb(), [0.0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            during[0] = max(during[0], current_rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if variant.startswith("ours"):
        ks = (1,) if variant == "ours@1" else (1, 2, 4, 8)
        value = recall_at_k(emb, labels, ks)[1]
    elif variant.startswith("faiss"):
        index = faiss.IndexFlatIP(dim)
        index.add(emb)
        _, idx = index.search(emb, 2 if variant == "faiss@1" else 9)
        value = float(np.mean(labels[idx[:, 1]] == labels))  # assumes self first: only a timing floor
    elif variant == "torch@1248":
        value = recall_at_k(emb, labels, (1, 2, 4, 8), backend="torch", device=device)[1]
    elif variant == "raw_torch@1248":
        idx = raw_torch_knn(emb, 9, device)
        value = float(np.mean(labels[idx[:, 1]] == labels))  # a timing floor, like faiss@1
    else:
        calc = AccuracyCalculator(include=("precision_at_1",), k=1)
        value = calc.get_accuracy(torch.from_numpy(emb), torch.from_numpy(labels), ref_includes_query=True)[
            "precision_at_1"
        ]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    stop.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "variant": variant,
                "n": n,
                "data": kind,
                "device": device,
                "gpu_peak_mb": gpu_peak,
                "seconds": seconds,
                "recall@1": value,
                "peak_rss_mb": peak / 1024,
                "data_rss_mb": base_rss / 1024,
                "rss_before_mb": rss_before,
                "extra_rss_during_mb": max(0.0, during[0] - rss_before),
            }
        )
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    p.add_argument(
        "--device", default=None, help="for the torch variants (default: cuda if available, else cpu)"
    )
    p.add_argument("--ties", action="store_true", help="also run every variant on all-equal embeddings")
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--out", type=Path, default=RESULTS / "perf_eval.json", help="result JSON (default: %(default)s)"
    )
    p.add_argument("--child", nargs=4, metavar=("VARIANT", "N", "DATA", "DEVICE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child[0], int(args.child[1]), args.dim, args.child[2], args.child[3])
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    kinds = ["clustered", "tied"] if args.ties else ["clustered"]
    sizes = args.sizes or ([2000, 5000] if args.quick else [5000, 20000, 88000])
    rows = []
    for n in sizes:
        for kind in kinds:
            for variant in args.variants:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        variant,
                        str(n),
                        kind,
                        args.device,
                        "--dim",
                        str(args.dim),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=dict(os.environ),
                )
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(
                    f"  {variant:<14} {kind:<9} N={n:<6} {r['seconds']:8.3f}s  peak RSS "
                    f"{r['peak_rss_mb']:8.1f} MB (+{r['extra_rss_during_mb']:.1f} MB during the call, GPU "
                    f"peak {r['gpu_peak_mb']:.0f} MB)  R@1 {r['recall@1']:.4f}",
                    flush=True,
                )
    write_result(args.out, {"dim": args.dim, "cpu_count": os.cpu_count(), "rows": rows})
    by = {(r["variant"], r["n"]): r for r in rows if r["data"] == "clustered"}
    for r in rows:
        name = f"{r['variant']}_n{r['n']}" + ("_tied" if r["data"] == "tied" else "")
        print(f"{name}_seconds: {r['seconds']:.4f}")
        print(f"{name}_peak_rss_mb: {r['peak_rss_mb']:.1f}")
        print(f"{name}_extra_rss_mb: {r['extra_rss_during_mb']:.1f}")
    for r in rows:
        if r["data"] == "tied" and (r["variant"], r["n"]) in by:
            a, b = r, by[(r["variant"], r["n"])]
            extra = lambda x: x["extra_rss_during_mb"] + x["gpu_peak_mb"]  # noqa: E731
            print(
                f"ratio: {r['variant']} tied/clustered n={r['n']} time {a['seconds'] / b['seconds']:.3f} "
                f"memory {max(extra(a), 1.0) / max(extra(b), 1.0):.3f}"
            )
    for n in sizes:
        pairs = (
            ("ours@1", "faiss@1"),
            ("ours@1248", "faiss@1248"),
            ("pml@1", "faiss@1"),
            ("ours@1", "pml@1"),
            ("torch@1248", "raw_torch@1248"),
            ("ours@1248", "raw_torch@1248"),
        )
        for ours, raw in pairs:
            if (ours, n) in by and (raw, n) in by:
                a, b = by[(ours, n)], by[(raw, n)]
                print(
                    f"ratio: {ours}/{raw} n={n} time {a['seconds'] / b['seconds']:.3f} peak_rss "
                    f"{a['peak_rss_mb'] / b['peak_rss_mb']:.3f}"
                )


if __name__ == "__main__":
    main()
