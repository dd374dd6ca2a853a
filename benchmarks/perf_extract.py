"""One embedding pass (drift or evaluation) through the run's embedding loader: small worker tasks vs one
model batch per task.

    python benchmarks/perf_extract.py [--workers 14 --device cuda --model resnet50]
    python benchmarks/perf_extract.py --quick                                      # seconds (tested)

Writes a CUB-format directory of JPEGs (500×375 by default), then times full passes of
``extract_embeddings`` over the test transform through two ``EmbeddingLoader``\\ s with the same workers and
model batch (``--batch``): ``tasks_per_worker=4`` (what a run on CUDA uses: about 4 tasks per worker,
16 items or more each) and the default (one model batch per worker task, what a run on the CPU uses). Passes alternate between the two,
``--repeats`` each; printed: median pass seconds, the time to the first model batch, and
``ratio: tasks/whole-batch``. ``--model pool`` (default) embeds by a global average pool and a linear map,
so the figure is the loader's; a backbone name adds its forward.

``--decode-sleep-ms X`` replaces each image's decoding by a sleep of X ms (no JPEGs written): a stand-in,
on a machine with fewer cores than workers, for one with a core per worker (the GPU machine: 16 cores,
14 workers), where how the pass is cut into tasks decides how many workers are busy at its end.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from perf_e2e import write_result  # noqa: E402

from pml_mutual.data import ImageListDataset, ProtocolTransform, load_cub  # noqa: E402
from pml_mutual.data.fixtures import write_cub_fixture  # noqa: E402
from pml_mutual.data.loaders import EmbeddingLoader  # noqa: E402
from pml_mutual.evaluation import extract_embeddings  # noqa: E402
from pml_mutual.models import BACKBONES, build_backbone  # noqa: E402


class Pool(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 8)

    def forward(self, x):
        return self.lin(x.mean((2, 3)))


class SleepingImages(torch.utils.data.Dataset):
    """``n`` blank crops, each costing ``ms`` of waiting instead of decoding (see ``--decode-sleep-ms``)."""

    def __init__(self, n: int, ms: float, crop: int):
        self.n, self.ms, self.crop = n, ms, crop

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.ms / 1000)
        return torch.zeros(3, self.crop, self.crop), 0


class FirstBatch(torch.nn.Module):
    """Wraps a model to note when its first batch arrives."""

    def __init__(self, model):
        super().__init__()
        self.model, self.first = model, None

    def forward(self, x):
        if self.first is None:
            self.first = time.perf_counter()
        return self.model(x)


def one_pass(model, loader, batch, device):
    timed = FirstBatch(model)
    t0 = time.perf_counter()
    extract_embeddings(timed, loader(), batch, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, timed.first - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--images-per-class", type=int, default=60)
    p.add_argument("--image-width", type=int, default=500)
    p.add_argument("--image-height", type=int, default=375)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=192, help="model batch (the stage's eval_batch_size: 4 × 48)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--model", default="pool", choices=["pool", *BACKBONES])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-sleep-ms", type=float, help="sleep this long per image instead of decoding JPEGs")
    p.add_argument("--quick", action="store_true", help="4 classes × 40 images of 200×150, batch 32, 2 workers")
    p.add_argument("--out", type=Path, default=Path("runs") / "benchmarks" / "perf_extract.json")  # git-ignored
    args = p.parse_args(argv)
    if args.quick:
        args.classes, args.images_per_class, args.image_width, args.image_height = 4, 40, 200, 150
        args.crop, args.batch, args.workers, args.repeats = 64, 32, min(args.workers, 2), 1
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="pml_mutual_extract_") as tmp:
        if args.decode_sleep_ms is not None:
            dataset = SleepingImages(args.classes * args.images_per_class // 2, args.decode_sleep_ms, args.crop)
        else:
            root = Path(tmp) / "CUB_200_2011"
            write_cub_fixture(root, [args.images_per_class] * args.classes, size=(args.image_width, args.image_height),
                              workers=os.cpu_count() or 1)
            train_items, _ = load_cub(root)  # the training half: what drift measurement embeds
            dataset = ImageListDataset(train_items, ProtocolTransform(False, size=args.crop))
        model = (Pool() if args.model == "pool" else build_backbone(args.model)).to(device).eval()
        loaders = {
            "tasks": EmbeddingLoader(dataset, args.batch, args.workers, pin_memory=device.type == "cuda", tasks_per_worker=4),
            "whole_batch": EmbeddingLoader(dataset, args.batch, args.workers, pin_memory=device.type == "cuda"),
        }
        for loader in loaders.values():  # workers started (once per run in a stage loop), not timed
            one_pass(model, loader, args.batch, device)
        times = {k: [] for k in loaders}
        for _ in range(args.repeats):
            for k, loader in loaders.items():
                times[k].append(one_pass(model, loader, args.batch, device))
        n = len(dataset)
        tasks = {k: -(-n // loader.task_size(n)) for k, loader in loaders.items()}
        del loaders
    size = f"{args.image_width}x{args.image_height}" if args.decode_sleep_ms is None else f"sleeping {args.decode_sleep_ms} ms each"
    result = {"images": n, "workers": args.workers, "batch": args.batch, "model": args.model, "device": str(device),
              "size": size, "decode_sleep_ms": args.decode_sleep_ms, "tasks_per_pass": tasks}
    for k, ts in times.items():
        result[k] = {"pass_s": statistics.median(t for t, _ in ts), "first_batch_s": statistics.median(f for _, f in ts),
                     "passes_s": [t for t, _ in ts]}
        print(f"{k:12s}: {tasks[k]:4d} tasks, pass {result[k]['pass_s']:.2f}s ({n / result[k]['pass_s']:.0f} images/s), "
              f"first model batch after {result[k]['first_batch_s']:.2f}s")
    result["ratio_tasks_over_whole_batch"] = result["tasks"]["pass_s"] / result["whole_batch"]["pass_s"]
    print(f"{n} images of {result['size']}, {args.workers} workers, model batch {args.batch}, {args.model} on {device}")
    print(f"ratio: tasks/whole-batch pass time: {result['ratio_tasks_over_whole_batch']:.2f}")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
