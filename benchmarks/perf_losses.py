"""Cost of the distillation losses: GramCorrelationLoss + MutualGramLoss, forward + backward.

    python benchmarks/perf_losses.py [--batch-sizes 80 256] [--dim 512] [--repeats 50]

Prints, per batch size, the median time of one L_corr + L_mutual forward+backward next to a PML
TripletMarginLoss + BatchHardMiner forward+backward on the same embeddings (the baseline of the same
run), and the ratio; and the same batch-hard loss as one dense computation (BatchHardTripletLoss, the
stage's default) against PML's pair.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from pytorch_metric_learning import losses, miners

from pml_mutual import GramCorrelationLoss, MutualGramLoss
from pml_mutual.losses import BatchHardTripletLoss


def timed(fn, repeats, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (min(times), max(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[80, 256])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "perf_losses.json")
    args = p.parse_args(argv)
    corr, mutual = GramCorrelationLoss(), MutualGramLoss()
    triplet, miner = losses.TripletMarginLoss(margin=0.1), miners.BatchHardMiner()
    dense = BatchHardTripletLoss(margin=0.1)
    rows = []
    for b in args.batch_sizes:
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(b // 4).repeat_interleave(4)[:b].to(args.device)
        emb_o = torch.randn(b, args.dim, generator=g).to(args.device)
        emb_p = torch.randn(b, args.dim, generator=g).to(args.device).requires_grad_()
        emb_s = torch.randn(b, args.dim, generator=g).to(args.device).requires_grad_()

        def distill():
            (10 * corr(emb_p, ref_emb=emb_o) + 8 * mutual(emb_p, ref_emb=emb_s)).backward()

        def metric():
            triplet(emb_p, labels, miner(emb_p, labels)).backward()

        def dense_metric():
            dense(emb_p, labels).backward()

        t_d, spread_d = timed(distill, args.repeats)
        t_m, _ = timed(metric, args.repeats)
        t_b, _ = timed(dense_metric, args.repeats)
        rows.append({"batch_size": b, "dim": args.dim, "distill_ms": 1e3 * t_d, "distill_range_ms": [1e3 * x for x in spread_d],
                     "triplet_ms": 1e3 * t_m, "ratio_to_triplet": t_d / t_m,
                     "batch_hard_dense_ms": 1e3 * t_b, "ratio_dense_to_pml_batch_hard": t_b / t_m})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    for r in rows:
        print(f"B={r['batch_size']} D={r['dim']}: corr+mutual fwd+bwd: {r['distill_ms']:.3f} ms "
              f"(range {r['distill_range_ms'][0]:.3f}–{r['distill_range_ms'][1]:.3f}); "
              f"triplet+batch-hard: {r['triplet_ms']:.3f} ms; ratio: {r['ratio_to_triplet']:.2f}")
        print(f"B={r['batch_size']} D={r['dim']}: BatchHardTripletLoss (dense, no host read) {r['batch_hard_dense_ms']:.3f} ms; "
              f"ratio: dense/PML batch-hard {r['ratio_dense_to_pml_batch_hard']:.2f}")


if __name__ == "__main__":
    main()
