"""Cost of the distillation losses: GramCorrelationLoss + MutualGramLoss, forward + backward.

    python benchmarks/perf_losses.py [--batch-sizes 80 256] [--dim 512] [--repeats 50] [--teachers 5]

Prints, per batch size, the median time of one L_corr + L_mutual forward+backward next to a PML
TripletMarginLoss + BatchHardMiner forward+backward on the same embeddings (the baseline of the same
run), and the ratio; the same two losses as the trainer computes them (``gram_distillation_losses``,
one stacked computation) against the modules called one by one, with one teacher and with
``--teachers`` (the real one and virtual ones, as at stage 5), and the computing ops each dispatches
(each a kernel launch on a GPU); and the batch-hard loss as one dense computation
(BatchHardTripletLoss, the stage's default) against PML's pair.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from pytorch_metric_learning import losses, miners

from pml_mutual import GramCorrelationLoss, MutualGramLoss
from pml_mutual.losses import BatchHardTripletLoss, gram_distillation_losses

sys.path.insert(0, str(Path(__file__).parent))
from dispatched_ops import computing_ops  # noqa: E402


def timed(fn, repeats, warmup=5):
    # on a GPU the kernels run after the call returns: wait for them, or only the launches are timed
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (min(times), max(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[80, 256])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--teachers", type=int, default=5, help="teachers of the stage-5 case (1 real + virtual)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("runs") / "benchmarks" / "perf_losses.json")  # git-ignored
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

        def called(n_teachers):
            teachers = [emb_o] + [torch.randn_like(emb_o) for _ in range(n_teachers - 1)]
            def run():
                emb_p.grad = emb_s.grad = None
                total = 10 * sum(corr(emb_p, ref_emb=t) for t in teachers) + 8 * mutual(emb_p, ref_emb=emb_s)
                total.backward()
            return run

        def stacked(n_teachers):
            teachers = [emb_o, torch.randn(n_teachers - 1, *emb_o.shape, device=emb_o.device)]
            def run():
                emb_p.grad = emb_s.grad = None
                out = gram_distillation_losses(emb_p, emb_s, teachers, correlation_loss=corr, mutual_loss=mutual)
                (10 * out["correlation_loss"] + 8 * out["mutual_loss"]).backward()
            return run

        def metric():
            triplet(emb_p, labels, miner(emb_p, labels)).backward()

        def dense_metric():
            dense(emb_p, labels).backward()

        t_d, spread_d = timed(distill, args.repeats)
        t_m, _ = timed(metric, args.repeats)
        t_b, _ = timed(dense_metric, args.repeats)
        paths = {}
        for n in (1, args.teachers):
            for name, make in (("called", called), ("stacked", stacked)):
                fn = make(n)
                paths[f"{name}_{n}"] = {"ms": 1e3 * timed(fn, args.repeats)[0], "ops": sum(computing_ops(fn).values())}
        rows.append({"batch_size": b, "dim": args.dim, "distill_ms": 1e3 * t_d, "distill_range_ms": [1e3 * x for x in spread_d],
                     "triplet_ms": 1e3 * t_m, "ratio_to_triplet": t_d / t_m, "teachers": paths,
                     "batch_hard_dense_ms": 1e3 * t_b, "ratio_dense_to_pml_batch_hard": t_b / t_m})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    for r in rows:
        print(f"B={r['batch_size']} D={r['dim']}: corr+mutual fwd+bwd: {r['distill_ms']:.3f} ms "
              f"(range {r['distill_range_ms'][0]:.3f}–{r['distill_range_ms'][1]:.3f}); "
              f"triplet+batch-hard: {r['triplet_ms']:.3f} ms; ratio: {r['ratio_to_triplet']:.2f}")
        for n in sorted({int(k.split("_")[1]) for k in r["teachers"]}):
            c, f = r["teachers"][f"called_{n}"], r["teachers"][f"stacked_{n}"]
            print(f"B={r['batch_size']} D={r['dim']}, {n} teacher(s): corr+mutual called {c['ms']:.3f} ms, {c['ops']} ops; "
                  f"stacked {f['ms']:.3f} ms, {f['ops']} ops; ratio: stacked/called time {f['ms'] / c['ms']:.2f}, "
                  f"ops {f['ops'] / c['ops']:.2f}")
        print(f"B={r['batch_size']} D={r['dim']}: BatchHardTripletLoss (dense, no host read) {r['batch_hard_dense_ms']:.3f} ms; "
              f"ratio: dense/PML batch-hard {r['ratio_dense_to_pml_batch_hard']:.2f}")


if __name__ == "__main__":
    main()
