"""Peak memory of each stage of a 10-stage `ours` run: it must stay flat as stages accumulate.

    python benchmarks/perf_memory.py [--stages 10] [--quick] [--device cuda]

Old models are loaded one at a time (direct drift) and freed, and the drift state is O(classes × D),
so stage 10 should peak where stage 2 does. Data: synthetic Gaussian classes (64-d), EmbeddingMLP, so
only the method's own memory behaviour is measured. RSS is sampled every 2 ms by a thread.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from pml_mutual import OnlineConfig, OnlineLearner
from pml_mutual.callbacks import Callback
from pml_mutual.models import EmbeddingMLP

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class MemoryProbe(Callback):
    """Which stage runs (for the RSS sampler) and, on CUDA, each stage's peak allocation up to its checkpoint
    (reset as the stage starts, read after its evaluation): public callbacks, no private hook."""

    def __init__(self):
        self.current_stage = -1
        self.cuda_peaks: dict[int, int] = {}

    def before_stage(self, ctx):
        self.current_stage = ctx.stage
        if ctx.learner.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.learner.device)

    def after_eval(self, ctx):
        if ctx.learner.device.type == "cuda":
            self.cuda_peaks[ctx.stage] = torch.cuda.max_memory_allocated(ctx.learner.device)


def synthetic(n_classes, per_class, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    return TensorDataset(centres[y] + 0.7 * torch.randn(len(y), dim, generator=g), y)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=10)
    p.add_argument("--classes-per-stage", type=int, default=8)
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path("runs") / "benchmarks" / "perf_memory.json",
                   help="result JSON (default: under runs/, git-ignored; never the source tree unless asked)")
    args = p.parse_args(argv)
    if args.quick:
        args.stages, args.iterations = 4, 5
    n_classes = args.stages * args.classes_per_stage
    train, test = synthetic(n_classes, 40, seed=0), synthetic(n_classes, 20, seed=1)
    c2s = {c: c // args.classes_per_stage for c in range(n_classes)}
    config = OnlineConfig(method="ours", epochs=1, initial_epochs=1, iterations_per_epoch=args.iterations, batch_size=32,
                          m_per_class=4, lr=1e-3, device=args.device)
    with tempfile.TemporaryDirectory() as run_dir:
        probe = MemoryProbe()
        learner = OnlineLearner.from_class_assignment(EmbeddingMLP, train, test, c2s, config=config, run_dir=run_dir,
                                                      quiet=True, callbacks=[probe])
        peaks: dict[int, int] = {}
        done = threading.Event()

        def sample():
            while not done.is_set():
                s = probe.current_stage
                if s >= 0:
                    peaks[s] = max(peaks.get(s, 0), rss_bytes())
                time.sleep(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        learner.run()
        done.set()
        thread.join()
    mb = {s: v / 2**20 for s, v in sorted(peaks.items())}
    doc = {"stages": args.stages, "peak_rss_mb": mb, "cuda_peak_mb": {s: v / 2**20 for s, v in probe.cuda_peaks.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    for s, v in mb.items():
        print(f"stage_{s}_peak_rss_mb: {v:.1f}")
    for s, v in doc["cuda_peak_mb"].items():
        print(f"stage_{s}_cuda_peak_mb: {v:.1f}")
    last = max(mb)
    ref = 2 if 2 in mb else min(mb)
    print(f"ratio: stage{last}/stage{ref} peak_rss {mb[last] / mb[ref]:.4f}")


if __name__ == "__main__":
    main()
