"""What a run costs besides its training steps: epoch checkpoints, memory over many stages, and the run
identity's content checks.

    python benchmarks/perf_run.py checkpoint                    # BN-Inception (10.8 M parameters), CPU
    python benchmarks/perf_run.py checkpoint --model resnet50   # 25.6 M (needs torchvision)
    python benchmarks/perf_run.py memory [--stages 10] [--quick] [--device cuda]
    python benchmarks/perf_run.py identity [--images 400]       # default: 11,788 images of 500×375

checkpoint
----------
The state is what ``OnlineLearner`` checkpoints after an epoch of a two-network stage (F_p and F_s, as in
``ours``), built by the same ``pml_mutual.online.epoch_checkpoint``: both networks' weights and, mid-stage,
both fused-Adam states after a step (two moments per weight). After the stage's last epoch only the
networks are kept (no step follows). For each, through
``RunDirectory.save_in_background`` as the stage calls it: ``blocked`` = the time the training thread spends
in the call (CPU snapshot + finiteness check), ``write`` = the time until the background thread has the
file on disk (``wait()``), and the file's size; median of ``--repeats``.

memory
------
Peak memory of each stage of a 10-stage `ours` run: it must stay flat as stages accumulate.
Old models are loaded one at a time (direct drift) and freed, and the drift state is O(classes × D),
so stage 10 should peak where stage 2 does. Data: synthetic Gaussian classes (64-d), EmbeddingMLP, so
only the method's own memory behaviour is measured. RSS is sampled every 2 ms by a thread.

identity
--------
Writes a CUB-format dataset of real image size into a temporary directory, builds the protocol's
training / prototype / test datasets (224-pixel crops), and times ``OnlineLearner.content_records()``
against a baseline measured in the same run: one pass of the test set through ``__getitem__`` (what one
evaluation decodes). Printed as seconds and as the ratio to that baseline.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import build, rss_bytes, run_subcommands, write_cub, write_result
from torch.utils.data import TensorDataset

from pml_mutual import OnlineConfig, OnlineLearner
from pml_mutual.callbacks import Callback
from pml_mutual.data import ImageListDataset, ProtocolTransform, load_cub, stages_from_ends
from pml_mutual.models import BNInception, EmbeddingMLP
from pml_mutual.online import adam, epoch_checkpoint
from pml_mutual.run_dir import RunDirectory


def stage_state(model_name: str, device, image_size: int) -> tuple[dict, dict]:
    """(mid-stage state, last-epoch state) of a two-network stage after one optimiser step."""
    models, optimizers = {}, {}
    for k in ("trunk", "support_trunk"):
        model, probe = build(model_name, device, image_size)
        opt = adam(model.parameters(), lr=1e-5, weight_decay=5e-4)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()  # Adam's moments exist from the first step on
        models[k], optimizers[f"{k}_optimizer"] = model, opt
    return (
        epoch_checkpoint(1, 1, models, optimizers, [], last=False),
        epoch_checkpoint(1, 2, models, optimizers, [], last=True),
    )


def measure(directory: RunDirectory, state: dict, repeats: int) -> dict:
    blocked, written = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        directory.save_in_background(state)
        t1 = time.perf_counter()
        directory.wait()
        blocked.append(t1 - t0)
        written.append(time.perf_counter() - t1)
    size = (directory.path / "in_progress.pt").stat().st_size
    return {"blocked_s": statistics.median(blocked), "write_s": statistics.median(written), "bytes": size}


def add_checkpoint_arguments(p):
    p.add_argument("--model", default="bninception")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="SmallCNN, 2 repeats")


def checkpoint(args):
    """What an epoch checkpoint blocks training for, and its background write (see the module's docstring)."""
    if args.quick:
        args.model, args.repeats = "small_cnn", 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    mid, last = stage_state(args.model, device, 224)
    n_params = sum(t.numel() for t in last["models"]["trunk"].values() if t.is_floating_point())
    with tempfile.TemporaryDirectory(prefix="pml_mutual_ckpt_") as tmp:
        directory = RunDirectory(Path(tmp) / "run")
        directory.path.mkdir(parents=True)
        results = {
            "mid_stage": measure(directory, mid, args.repeats),
            "last_epoch": measure(directory, last, args.repeats),
        }
    for name, r in results.items():
        print(
            f"{name:10s}: training thread blocked {1000 * r['blocked_s']:7.1f} ms, background write "
            f"{1000 * r['write_s']:7.1f} ms, {r['bytes'] / 2**20:6.1f} MiB"
        )
    ratios = {
        k: results["last_epoch"][k] / results["mid_stage"][k] for k in ("blocked_s", "write_s", "bytes")
    }
    print(
        f"model: {args.model} ({n_params / 1e6:.1f} M parameters per network, two networks), device {device}"
    )
    print(
        f"ratio: last-epoch / mid-stage checkpoint: blocked {ratios['blocked_s']:.2f}, write "
        f"{ratios['write_s']:.2f}, size {ratios['bytes']:.2f}"
    )
    result = {
        "model": args.model,
        "device": str(device),
        "parameters_per_network": n_params,
        "repeats": args.repeats,
        **results,
        "ratio_last_over_mid": ratios,
    }
    write_result(args.out, result)
    return result


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


def add_memory_arguments(p):
    p.add_argument("--stages", type=int, default=10)
    p.add_argument("--classes-per-stage", type=int, default=8)
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")


def memory(args):
    """Peak memory of each stage of a long `ours` run (see the module's docstring)."""
    if args.quick:
        args.stages, args.iterations = 4, 5
    n_classes = args.stages * args.classes_per_stage
    train, test = synthetic(n_classes, 40, seed=0), synthetic(n_classes, 20, seed=1)
    c2s = {c: c // args.classes_per_stage for c in range(n_classes)}
    config = OnlineConfig(
        method="ours",
        epochs=1,
        initial_epochs=1,
        iterations_per_epoch=args.iterations,
        batch_size=32,
        m_per_class=4,
        lr=1e-3,
        device=args.device,
    )
    with tempfile.TemporaryDirectory() as run_dir:
        probe = MemoryProbe()
        learner = OnlineLearner.from_class_assignment(
            EmbeddingMLP, train, test, c2s, config=config, run_dir=run_dir, quiet=True, callbacks=[probe]
        )
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
    doc = {
        "stages": args.stages,
        "peak_rss_mb": mb,
        "cuda_peak_mb": {s: v / 2**20 for s, v in probe.cuda_peaks.items()},
    }
    write_result(args.out, doc)
    for s, v in mb.items():
        print(f"stage_{s}_peak_rss_mb: {v:.1f}")
    for s, v in doc["cuda_peak_mb"].items():
        print(f"stage_{s}_cuda_peak_mb: {v:.1f}")
    last = max(mb)
    ref = 2 if 2 in mb else min(mb)
    print(f"ratio: stage{last}/stage{ref} peak_rss {mb[last] / mb[ref]:.4f}")


class UserDataset(torch.utils.data.Dataset):
    """A dataset of the user's own (no attribute the package knows but ``labels``)."""

    def __init__(self, base):
        self.base, self.labels = base, base.labels

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


def add_identity_arguments(p):
    p.add_argument("--images", type=int, default=11_788, help="images in all (CUB-200-2011: 11,788)")
    p.add_argument("--classes", type=int, default=200)


def identity(args):
    """The run identity's content records and the finite-input check at CUB size (see the module's
    docstring)."""
    per_class = max(4, args.images // args.classes)
    with tempfile.TemporaryDirectory(prefix="pml_mutual_identity_") as tmp:
        root = write_cub(Path(tmp) / "CUB_200_2011", args.classes, per_class, 500, 375, workers=2)
        train_items, test_items = load_cub(root)
        train = ImageListDataset(train_items, ProtocolTransform(True, size=224))
        prototypes = ImageListDataset(train_items, ProtocolTransform(False, size=224))
        test = ImageListDataset(test_items, ProtocolTransform(False, size=224))
        learner = OnlineLearner.from_class_assignment(
            BNInception,
            train,
            test,
            stages_from_ends(range(args.classes), [args.classes // 2]),
            prototype_dataset=prototypes,
            config=OnlineConfig(device="cpu", min_images_per_class=2, m_per_class=2, batch_size=4),
            run_dir=Path(tmp) / "run",
            quiet=True,
        )
        t0 = time.perf_counter()
        records = learner.content_records()
        content = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(len(test)):
            test[i]
        test_pass = time.perf_counter() - t0
        # the finiteness check before training: free for image lists (decoded pixels are finite), one
        # __getitem__ pass for a dataset of the user's own (here the same images behind a wrapper)
        custom = OnlineLearner.from_class_assignment(
            BNInception,
            UserDataset(train),
            UserDataset(test),
            stages_from_ends(range(args.classes), [args.classes // 2]),
            prototype_dataset=UserDataset(prototypes),
            config=learner.config,
            run_dir=Path(tmp) / "run2",
            quiet=True,
        )
        t0 = time.perf_counter()
        learner.check_inputs_finite()
        finite_lists = time.perf_counter() - t0
        t0 = time.perf_counter()
        custom.check_inputs_finite()
        finite_custom = time.perf_counter() - t0
    result = {
        "images": per_class * args.classes,
        "image_size": [500, 375],
        "crop": 224,
        "sampled_datasets": sum(len(v) for k, v in records.items() if k.startswith("items:")),
        "content_records_s": content,
        "test_set_pass_s": test_pass,
        "ratio": content / test_pass,
        "test_items": len(test_items),
        "finite_check_image_lists_s": finite_lists,
        "finite_check_own_dataset_s": finite_custom,
        "finite_check_own_dataset_ratio": finite_custom / test_pass,
    }
    print(
        f"content records (model code + 64-item samples of {result['sampled_datasets']} datasets, read "
        f"twice): {content:.2f} s; one pass of the {len(test_items)} test items: {test_pass:.2f} s; ratio "
        f"{content / test_pass:.3f}"
    )
    print(
        f"finite-input check before training: image lists {finite_lists:.3f} s; the same data as datasets "
        f"of one's own {finite_custom:.1f} s ({finite_custom / test_pass:.2f}x a test-set pass)"
    )
    write_result(args.out, result)
    return result


COMMANDS = {
    "checkpoint": (
        add_checkpoint_arguments,
        checkpoint,
        "an epoch checkpoint: time blocked, background write, size",
    ),
    "memory": (add_memory_arguments, memory, "peak memory of each stage of a long run"),
    "identity": (add_identity_arguments, identity, "run identity content records and the finite-input check"),
}


if __name__ == "__main__":
    np.seterr(all="ignore")
    run_subcommands("perf_run", __doc__, COMMANDS)
