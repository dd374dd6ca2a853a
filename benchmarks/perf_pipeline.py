"""What a stage costs around its training steps: the stage end to end against its compute, an embedding
pass through the run's loader, and decoding.

    python benchmarks/perf_pipeline.py stage --device cuda --model resnet50 --num-workers 14   # CUB size,
    500×375 JPEGs
    python benchmarks/perf_pipeline.py stage --quick                                         # CPU, seconds
    (tested)
    python benchmarks/perf_pipeline.py extract [--workers 14 --device cuda --model resnet50]
    python benchmarks/perf_pipeline.py decode [--workers 14] [--classes 20 --images-per-class 40]

Each writes a CUB-format directory of JPEGs (500×375 by default) into a temporary directory first.

stage
-----
The dataset is ``--classes`` × ``--images-per-class`` JPEGs of ``--image-width`` × ``--image-height``; then,
in
one process:

1. one `--method` stage end to end through ``OnlineLearner``: stage 0 keeps a given random F_0 (no
   training), stage 1 (the other half of the classes) trains ``--iterations`` steps, measures drift,
   evaluates, checkpoints. Its wall time is the ``e2e`` figure.
2. the pure costs of the same stage, measured right after it: a training step of the stage's own
   trainer (same networks, losses, miner, optimisers, frozen BatchNorm) on one batch already on the
   device (median of repeats), and a pure forward pass of the same model over as many images as the
   stage embeds (drift: the stage's training images by F_1 and F_0; evaluation: every test image) from
   a tensor already on the device. The stage's own steps are timed too (host time on the CPU, CUDA
   events on a GPU: no sync added), which splits training's excess into slower steps and time
   outside them. ``--rounds N`` repeats 1–2 and reports the round with the median ratio: on a machine
   whose speed drifts between minutes, each stage is compared with compute measured beside it.
3. the loaders alone: images/s of the training DataLoader (decoding + augmentation, same workers)
   against the model's images/s, and of the embedding passes' input (decoded by the workers, or on
   the device with ``--embed-decode device``) against the model's forward, to say which bounds the
   stage's training and which its drift measurement and evaluation.

The training phase is split too: the time outside the trainer's loop (networks and optimisers built,
F_s snapshotted) and, inside it, the host's waits for batches and its epoch-end checkpoints (host
time, no sync added): on a GPU, where the rest of a stage's cost was unexplained, this says whether
it is set-up, starvation or checkpointing.

Printed: ``e2e_over_compute: x`` = e2e ÷ (iterations × step + extraction), the phases of the stage
(train / drift / eval / save) and where the rest went; and e2e ÷ (the stage's own steps + extraction),
which leaves out how much slower the steps ran inside the stage than alone (on a shared machine, mostly
its speed changing between the two moments) and keeps what the pipeline adds around them.

extract
-------
Times full passes of
``extract_embeddings`` over the test transform through two ``EmbeddingLoader``\\ s with the same workers and
model batch (``--batch``): ``tasks_per_worker=4`` (what a run on CUDA uses: about 4 tasks per worker,
16 items or more each) and the default (one model batch per worker task, what a run on the CPU uses). Passes
alternate between the two,
``--repeats`` each; printed: median pass seconds, the time to the first model batch, and
``ratio: tasks/whole-batch``. ``--model pool`` (default) embeds by a global average pool and a linear map,
so the figure is the loader's; a backbone name adds its forward.

``--decode-sleep-ms X`` replaces each image's decoding by a sleep of X ms (no JPEGs written): a stand-in,
on a machine with fewer cores than workers, for one with a core per worker (the GPU machine: 16 cores,
14 workers), where how the pass is cut into tasks decides how many workers are busy at its end.

decode
------
Writes the dataset's copy by
``pml_mutual.data.resize.write_resized_cub`` (shorter side 256, the protocol's first Resize), then, in the
same run, the training DataLoader's images/s over both with the train transform (Resize 256 →
RandomResizedCrop 224 → flip) and with the test transform (Resize 256 → CenterCrop 224: drift and
evaluation), ``--workers`` workers. Printed: each rate and ``ratio: resized/original``. On a GPU machine
drift and evaluation were bound by this decoding (docs: Performance); compare the rates with the
model's images/s there.

Decoding on the device (``OnlineConfig(embed_decode="device")``, needs torchvision): the embedding pass's
input, workers reading files and torchvision decoding on ``--device`` (nvJPEG on CUDA), against the same
pass decoded by the workers, both up to the batch on the device: ``ratio: device/workers embedding
decode``. On the CPU the device decoder is one process against ``--workers``; the comparison that
matters is on a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import build, run_subcommands, timed, write_cub, write_result

from pml_mutual import OnlineConfig, OnlineLearner
from pml_mutual.callbacks import Callback
from pml_mutual.data import ImageListDataset, ProtocolTransform, load_cub, stages_from_ends
from pml_mutual.data.loaders import EmbeddingLoader, train_loader
from pml_mutual.data.resize import write_resized_cub
from pml_mutual.evaluation import extract_embeddings
from pml_mutual.models import BACKBONES, build_backbone
from pml_mutual.models.backbones import INPUT_SPACE
from pml_mutual.online import EMBED_DECODES


def factory_for(model_name: str, image_size: int):
    if model_name in BACKBONES:
        return lambda: build_backbone(model_name), INPUT_SPACE[model_name]
    raise SystemExit(f"--model must be one of {BACKBONES} (the stage decodes RGB JPEGs)")


def loader_images_per_second(dataset, batch, workers, n_batches, pin):
    from pytorch_metric_learning.samplers import MPerClassSampler

    labels = np.asarray(dataset.items.labels)
    loader, batches = train_loader(dataset, batch, workers, pin_memory=pin)
    batches.set_epoch(
        MPerClassSampler(
            labels, batch // 8 if batch >= 16 else 2, batch, length_before_new_iter=batch * n_batches
        ),
        0,
    )
    it = iter(loader)
    next(it)  # workers started: their start-up is not decoding throughput
    t0 = time.perf_counter()
    got = 0
    for x, _ in it:
        got += len(x)
    return got / max(time.perf_counter() - t0, 1e-9)


def embed_images_per_second(dataset, batch, workers, device, decode="workers"):
    """Images/s of an embedding pass's input as the run makes it (test transform, the run's loader
    settings), up to the batch on ``device``: decoded by the workers, or read by them and decoded on
    ``device`` (``decode="device"``). No model: what the loader side of drift and evaluation delivers."""
    from pml_mutual.data.loaders import LoaderPool

    cuda = device.type == "cuda"
    pool = LoaderPool(
        batch,
        batch,
        workers,
        pin_memory=cuda,
        embed_tasks_per_worker=4 if cuda else None,
        decode_on_device=decode == "device",
    )
    try:
        view = pool.embed(dataset)
        iter(view([]))  # workers started: their start-up is not decoding throughput
        t0, got = time.perf_counter(), 0
        for x, _ in view():
            got += len(x.to(device, non_blocking=True))
        if cuda:
            torch.cuda.synchronize(device)
        return got / max(time.perf_counter() - t0, 1e-9)
    finally:
        pool.close()


def in_stage_steps(step, device, times: list):
    """``step`` wrapped to record each call's span: host time on the CPU; on a GPU a pair of CUDA events
    per step, read after the stage (no host sync inside the stage's steps)."""

    def timed_step():
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = step()
            end.record()
            times.append((start, end))
            return out
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
        return out

    return timed_step


def host_timed(fn, spans: list):
    """``fn`` wrapped to add each call's host time to ``spans`` (no device sync added)."""

    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spans.append(time.perf_counter() - t0)

    return wrapped


def in_stage_seconds(times: list, device) -> list[float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1000 for start, end in times]
    return list(times)


class BeforeTrain(Callback):
    """Hands each stage's trainer, built and not yet trained, to ``fn(stage, trainer)``."""

    def __init__(self, fn):
        self.fn = fn

    def before_train(self, ctx):
        self.fn(ctx.stage, ctx.trainer)


class StageSeconds(Callback):
    """Each stage's seconds per step, as the stage loop hands them to callbacks."""

    def __init__(self):
        self.by_stage: dict[int, dict] = {}

    def after_stage(self, ctx):
        self.by_stage[ctx.stage] = dict(ctx.seconds)


def add_stage_arguments(p):
    p.add_argument("--root", type=Path, help="where to write the dataset (default: a temporary directory)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--images-per-class", type=int, default=80, help="CUB has ~59 per class; 100 × 80 = 8,000")
    p.add_argument("--image-width", type=int, default=500)
    p.add_argument("--image-height", type=int, default=375)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--model", default="resnet50", choices=BACKBONES)
    p.add_argument("--method", default="ours")
    p.add_argument("--iterations", type=int, default=None, help="default 100 (--quick: 4)")
    p.add_argument("--classes-per-batch", type=int, default=16)
    p.add_argument("--images-per-class-batch", type=int, default=3, dest="m")
    p.add_argument("--num-workers", type=int, default=14)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="default: on for cuda")
    p.add_argument(
        "--embed-decode",
        choices=EMBED_DECODES,
        default="workers",
        help="where drift and evaluation decode JPEGs (OnlineConfig.embed_decode; device needs torchvision)",
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats of the pure step (default 20; --quick: 3)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="stages end to end, each followed by its pure measurements; the round with the median ratio "
        "is reported (3 or more where the machine's speed drifts between minutes)",
    )
    p.add_argument(
        "--quick", action="store_true", help="CPU-sized: 8 classes × 12 images of 96×72, crop 32, 4 steps"
    )
    p.add_argument(
        "--profile", type=Path, help="write a cProfile summary of the end-to-end stage to this file"
    )


def stage(args):
    """One stage end to end against its compute (see the module's docstring)."""
    if args.rounds < 1:
        args.parser.error(f"--rounds must be at least 1 (got {args.rounds})")
    if args.quick:
        args.classes, args.images_per_class, args.image_width, args.image_height = 8, 12, 96, 72
        args.crop, args.classes_per_batch, args.m = 32, 2, 2
        args.repeats = args.repeats or 3
        args.iterations = args.iterations or 4
        args.num_workers = min(args.num_workers, 2)
        args.model = "bninception" if args.model == "resnet50" else args.model
    args.iterations = args.iterations or 100
    args.repeats = args.repeats or 20
    device = torch.device(args.device)
    amp = args.amp if args.amp is not None else device.type == "cuda"
    batch = args.classes_per_batch * args.m
    factory, space = factory_for(args.model, args.crop)

    tmp = tempfile.TemporaryDirectory(prefix="pml_mutual_e2e_")
    root = args.root or Path(tmp.name) / "CUB_200_2011"
    t0 = time.perf_counter()
    if not (root / "images.txt").exists():
        write_cub(root, args.classes, args.images_per_class, args.image_width, args.image_height)
    print(
        f"dataset: {args.classes} classes × {args.images_per_class} JPEGs of "
        f"{args.image_width}×{args.image_height} at {root} ({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    train_items, test_items = load_cub(root)
    classes = np.unique(train_items.labels)
    class_to_stage = stages_from_ends(classes, [len(classes) // 2])
    train = ImageListDataset(train_items, ProtocolTransform(True, space, args.crop))
    test = ImageListDataset(test_items, ProtocolTransform(False, space, args.crop))
    protos = ImageListDataset(train_items, ProtocolTransform(False, space, args.crop))
    config = OnlineConfig(
        method=args.method,
        epochs=1,
        iterations_per_epoch=args.iterations,
        batch_size=batch,
        m_per_class=args.m,
        device=str(device),
        amp=amp,
        num_workers=args.num_workers,
        eval_batch_size=4 * batch,
        drift_mode="direct",
        embed_decode=args.embed_decode,
    )
    # once per process, not per stage: torch imports its compiler stack at the first optimizer (~1.4 s on CPU)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    torch.manual_seed(0)
    initial = factory().state_dict()
    stage1_train = int(np.sum([class_to_stage[int(c)] == 1 for c in train_items.labels]))
    # drift: F_1 and F_0 on stage 1's images; eval: every test image
    n_embed = 2 * stage1_train + len(test_items)

    def one_round(r: int) -> dict:
        """The stage end to end, then its pure costs measured right after it (so a machine whose speed
        drifts between minutes compares each stage with compute measured at the same minute)."""
        trainers, in_stage = {}, []
        spans = {"trainer": [], "batch_waits": [], "epoch_ends": []}  # host seconds inside stage 1's training

        def capture(stage, trainer):
            trainers[stage] = trainer
            if stage == 1:
                trainer.forward_and_backward = in_stage_steps(trainer.forward_and_backward, device, in_stage)
                trainer.get_batch = host_timed(trainer.get_batch, spans["batch_waits"])
                trainer.end_of_epoch_hook = host_timed(trainer.end_of_epoch_hook, spans["epoch_ends"])
                trainer.train = host_timed(trainer.train, spans["trainer"])

        seconds = StageSeconds()
        learner = OnlineLearner.from_class_assignment(
            factory,
            train,
            test,
            class_to_stage,
            config=config,
            run_dir=Path(tmp.name) / f"run{r}",
            prototype_dataset=protos,
            initial_state_dict=initial,
            quiet=True,
            callbacks=[seconds, BeforeTrain(capture)],
        )
        if args.profile and r == 0:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.runcall(learner.run)
            with open(args.profile, "w") as f:
                stats = pstats.Stats(profiler, stream=f).sort_stats("cumulative")
                stats.print_stats(80)
                stats.sort_stats("tottime").print_stats(40)
        else:
            learner.run()
        stage1 = learner.stage_logs[1]
        save = seconds.by_stage[1]["checkpoint"]  # the checkpoint step's seconds (a callback's view)
        e2e = stage1["seconds"] + save
        phases = dict(stage1["phase_seconds"], save=save)
        del learner

        # the pure step: the stage's own trainer (after the run: its weights no longer matter), one batch
        # already on the device; the pure extraction: a forward of the same model from a device tensor
        x = torch.randn(batch, 3, args.crop, args.crop, device=device)
        y = torch.arange(args.classes_per_batch, device=device).repeat_interleave(args.m)
        trainer = trainers.pop(1)
        # the class's methods again, untimed
        del (
            trainer.forward_and_backward,
            trainer.get_batch,
            trainer.train,
        )
        trainer.get_batch = lambda: (x, y)
        trainer.set_to_train()
        step = timed(trainer.forward_and_backward, device, max(1, args.repeats // 5), args.repeats)[0]
        del trainer
        trainers.clear()
        model, _ = build(args.model, device, args.crop)
        model.eval()
        eval_batch = 4 * batch
        xb = torch.randn(eval_batch, 3, args.crop, args.crop, device=device)

        def forward():
            with torch.no_grad(), torch.autocast(device.type, enabled=amp, dtype=torch.bfloat16):
                model(xb)

        per_batch = timed(forward, device, 2, max(3, args.repeats // 2))[0]
        extraction = per_batch * n_embed / eval_batch
        compute = args.iterations * step + extraction
        steps_in_stage = in_stage_seconds(in_stage, device)
        return {
            "e2e_s": e2e,
            "phases_s": phases,
            "step_s": step,
            "extraction_s": extraction,
            "compute_s": compute,
            "e2e_over_compute": e2e / compute,
            "steps_in_stage_s": sum(steps_in_stage),
            # the same stage against its own steps as they ran: free of the machine's drift between the
            # stage and the pure step, this is what the pipeline adds (set-up, waits, drift, eval, save)
            "e2e_over_steps_in_stage": e2e / (sum(steps_in_stage) + extraction),
            "step_in_stage_median_s": statistics.median(steps_in_stage),
            "first_step_in_stage_s": steps_in_stage[0],
            # where the training phase goes outside the trainer's loop ("around_trainer": networks and
            # optimisers built, F_s
            # snapshotted) and, inside it, host time waiting for batches and in the epoch-end checkpoint
            "train_breakdown_s": {
                "around_trainer": phases["train"] - sum(spans["trainer"]),
                "trainer": sum(spans["trainer"]),
                "batch_waits": sum(spans["batch_waits"]),
                "first_batch_wait": spans["batch_waits"][0],
                "epoch_ends": sum(spans["epoch_ends"]),
            },
        }

    rounds = []
    for r in range(args.rounds):
        rounds.append(one_round(r))
        res = rounds[-1]
        ph = res["phases_s"]
        print(
            f"round {r + 1}/{args.rounds}: e2e {res['e2e_s']:.2f}s (train {ph['train']:.2f}s, drift "
            f"{ph['drift']:.2f}s, eval {ph['eval']:.2f}s, save {ph['save']:.2f}s); compute "
            f"{res['compute_s']:.2f}s (step {1000 * res['step_s']:.1f} ms; in the stage: median "
            f"{1000 * res['step_in_stage_median_s']:.1f} ms, first "
            f"{1000 * res['first_step_in_stage_s']:.0f} ms); e2e_over_compute {res['e2e_over_compute']:.2f}",
            flush=True,
        )
    # the round with the median ratio speaks for the run (its numbers are one consistent measurement)
    res = sorted(rounds, key=lambda d: d["e2e_over_compute"])[(len(rounds) - 1) // 2]
    phases, step, extraction, compute, e2e = (
        res[k] for k in ("phases_s", "step_s", "extraction_s", "compute_s", "e2e_s")
    )

    # 3. the loaders alone against the model: training batches, and the input of drift and evaluation
    loader_ips = loader_images_per_second(
        train, batch, args.num_workers, min(args.iterations, 30), device.type == "cuda"
    )
    model_ips = batch / step
    bound = "decoding (loader)" if loader_ips < model_ips else "the GPU/CPU step"
    embed_ips = embed_images_per_second(test, 4 * batch, args.num_workers, device, args.embed_decode)
    model_embed_ips = n_embed / extraction
    embed_bound = "decoding" if embed_ips < model_embed_ips else "the model's forward"

    result = {
        "device": str(device),
        "model": args.model,
        "method": args.method,
        "iterations": args.iterations,
        "batch": batch,
        "num_workers": args.num_workers,
        "amp": amp,
        "images": f"{args.image_width}x{args.image_height}",
        **res,
        "rounds": rounds,
        "loader_images_per_s": loader_ips,
        "model_images_per_s": model_ips,
        "embed_decode": args.embed_decode,
        "embed_loader_images_per_s": embed_ips,
        "model_embed_images_per_s": model_embed_ips,
    }
    outside = phases["train"] - res["steps_in_stage_s"]
    print(
        f"e2e stage: {e2e:.2f}s  (train {phases['train']:.2f}s, drift {phases['drift']:.2f}s, eval "
        f"{phases['eval']:.2f}s, save {phases['save']:.2f}s)"
        + (f", median of {len(rounds)} rounds" if len(rounds) > 1 else "")
    )
    print(
        f"compute: {args.iterations} × step {1000 * step:.1f} ms + extraction of {n_embed} images "
        f"{extraction:.2f}s = {compute:.2f}s"
    )
    print(
        f"rest: train {phases['train'] - args.iterations * step:+.2f}s beyond its steps (the steps in the "
        f"stage {res['steps_in_stage_s'] - args.iterations * step:+.2f}s against the pure step, outside "
        f"them {outside:+.2f}s), drift+eval {phases['drift'] + phases['eval'] - extraction:+.2f}s beyond "
        f"their forwards, save {phases['save']:.2f}s"
    )
    tb = res["train_breakdown_s"]
    print(
        f"train phase: {tb['around_trainer']:.2f}s outside the trainer's loop (networks, optimisers, F_s "
        f"snapshot) + {tb['trainer']:.2f}s in it, of which host time waiting for batches "
        f"{tb['batch_waits']:.2f}s (the first {tb['first_batch_wait']:.2f}s) and in epoch-end checkpoints "
        f"{tb['epoch_ends']:.2f}s"
    )
    print(
        f"loader: {loader_ips:.0f} images/s with {args.num_workers} workers; model step: {model_ips:.0f} "
        f"images/s → bound by {bound}"
    )
    print(
        f"embedding input (decoded by the {args.embed_decode}): {embed_ips:.0f} images/s; model forward: "
        f"{model_embed_ips:.0f} images/s → drift and evaluation bound by {embed_bound}"
    )
    print(f"e2e over the stage's own steps + extraction: {res['e2e_over_steps_in_stage']:.3f}")
    ratios = " ".join(f"{d['e2e_over_compute']:.2f}" for d in rounds)
    print(
        f"e2e_over_compute: {res['e2e_over_compute']:.2f}"
        + (f"  (rounds: {ratios})" if len(rounds) > 1 else "")
    )
    write_result(args.out, result)
    tmp.cleanup()
    return result


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


def add_extract_arguments(p):
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
    p.add_argument(
        "--decode-sleep-ms", type=float, help="sleep this long per image instead of decoding JPEGs"
    )
    p.add_argument(
        "--quick", action="store_true", help="4 classes × 40 images of 200×150, batch 32, 2 workers"
    )


def extract(args):
    """One embedding pass: small worker tasks vs one model batch per task (see the module's docstring)."""
    if args.quick:
        args.classes, args.images_per_class, args.image_width, args.image_height = 4, 40, 200, 150
        args.crop, args.batch, args.workers, args.repeats = 64, 32, min(args.workers, 2), 1
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="pml_mutual_extract_") as tmp:
        if args.decode_sleep_ms is not None:
            dataset = SleepingImages(
                args.classes * args.images_per_class // 2, args.decode_sleep_ms, args.crop
            )
        else:
            root = Path(tmp) / "CUB_200_2011"
            write_cub(root, args.classes, args.images_per_class, args.image_width, args.image_height)
            train_items, _ = load_cub(root)  # the training half: what drift measurement embeds
            dataset = ImageListDataset(train_items, ProtocolTransform(False, size=args.crop))
        model = (Pool() if args.model == "pool" else build_backbone(args.model)).to(device).eval()
        loaders = {
            "tasks": EmbeddingLoader(
                dataset, args.batch, args.workers, pin_memory=device.type == "cuda", tasks_per_worker=4
            ),
            "whole_batch": EmbeddingLoader(
                dataset, args.batch, args.workers, pin_memory=device.type == "cuda"
            ),
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
    size = (
        f"{args.image_width}x{args.image_height}"
        if args.decode_sleep_ms is None
        else f"sleeping {args.decode_sleep_ms} ms each"
    )
    result = {
        "images": n,
        "workers": args.workers,
        "batch": args.batch,
        "model": args.model,
        "device": str(device),
        "size": size,
        "decode_sleep_ms": args.decode_sleep_ms,
        "tasks_per_pass": tasks,
    }
    for k, ts in times.items():
        result[k] = {
            "pass_s": statistics.median(t for t, _ in ts),
            "first_batch_s": statistics.median(f for _, f in ts),
            "passes_s": [t for t, _ in ts],
        }
        print(
            f"{k:12s}: {tasks[k]:4d} tasks, pass {result[k]['pass_s']:.2f}s ({n / result[k]['pass_s']:.0f} "
            f"images/s), first model batch after {result[k]['first_batch_s']:.2f}s"
        )
    result["ratio_tasks_over_whole_batch"] = result["tasks"]["pass_s"] / result["whole_batch"]["pass_s"]
    print(
        f"{n} images of {result['size']}, {args.workers} workers, model batch {args.batch}, {args.model} on "
        f"{device}"
    )
    print(f"ratio: tasks/whole-batch pass time: {result['ratio_tasks_over_whole_batch']:.2f}")
    write_result(args.out, result)
    return result


def add_decode_arguments(p):
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--images-per-class", type=int, default=40)
    p.add_argument("--image-width", type=int, default=500)
    p.add_argument("--image-height", type=int, default=375)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the device-decoding pass decodes (and where both embedding passes deliver)",
    )
    p.add_argument("--quick", action="store_true", help="4 classes × 8 images, batch 8, 2 workers")


def decode(args):
    """What a pre-resized copy gains the loader, and decoding on the device (see the module's docstring)."""
    if args.quick:
        args.classes, args.images_per_class, args.batch, args.workers = 4, 8, 8, min(args.workers, 2)
    tmp = tempfile.TemporaryDirectory(prefix="pml_mutual_decode_")
    original = write_cub(
        Path(tmp.name) / "CUB_200_2011",
        args.classes,
        args.images_per_class,
        args.image_width,
        args.image_height,
        args.workers,
    )
    t0 = time.perf_counter()
    resized = write_resized_cub(
        original,
        Path(tmp.name) / "CUB_200_2011_256",
        short_side=round(args.crop * 256 / 224),
        workers=args.workers,
    )
    copy_seconds = time.perf_counter() - t0
    n_batches = args.classes * args.images_per_class // args.batch
    rates = {}
    for name, root in (("original", original), ("resized", resized)):
        items = load_cub(root, split="official")[0]
        for transform in ("train", "test"):
            dataset = ImageListDataset(items, ProtocolTransform(transform == "train", "imagenet", args.crop))
            rates[f"{transform}_{name}"] = loader_images_per_second(
                dataset, args.batch, args.workers, n_batches, False
            )
    device = torch.device(args.device)
    test = ImageListDataset(
        load_cub(original, split="official")[0], ProtocolTransform(False, "imagenet", args.crop)
    )
    embed = {"workers": embed_images_per_second(test, args.batch, args.workers, device, "workers")}
    try:
        from pml_mutual.data.device_decode import require_torchvision_decoder

        require_torchvision_decoder()
        embed["device"] = embed_images_per_second(test, args.batch, args.workers, device, "device")
    except ImportError as e:
        print(f"device decoding not measured: {e}")
    result = {
        "images": f"{args.image_width}x{args.image_height}",
        "workers": args.workers,
        "batch": args.batch,
        "device": str(device),
        "embed_images_per_s": embed,
        "ratio_device_over_workers_embedding": embed["device"] / embed["workers"]
        if "device" in embed
        else None,
        "copy_seconds": copy_seconds,
        "images_per_s": rates,
        "ratio_resized_over_original": {
            t: rates[f"{t}_resized"] / rates[f"{t}_original"] for t in ("train", "test")
        },
    }
    for t in ("train", "test"):
        print(
            f"loader {t} transform: original {rates[f'{t}_original']:.0f} images/s, resized "
            f"{rates[f'{t}_resized']:.0f} images/s ({args.workers} workers)"
        )
    print(f"copy written in {copy_seconds:.1f}s ({args.classes * args.images_per_class} images)")
    for t, r in result["ratio_resized_over_original"].items():
        print(f"ratio: resized/original {t} {r:.2f}")
    print(
        f"embedding pass input on {device}: decoded by {args.workers} workers {embed['workers']:.0f} images/s"
        + (f", decoded on the device {embed['device']:.0f} images/s" if "device" in embed else "")
    )
    if "device" in embed:
        print(f"ratio: device/workers embedding decode {result['ratio_device_over_workers_embedding']:.2f}")
    write_result(args.out, result)
    tmp.cleanup()
    return result


COMMANDS = {
    "stage": (add_stage_arguments, stage, "one stage end to end against its training steps and forwards"),
    "extract": (
        add_extract_arguments,
        extract,
        "an embedding pass: worker tasks vs one model batch per task",
    ),
    "decode": (add_decode_arguments, decode, "loader images/s on a pre-resized copy; decoding on the device"),
}


if __name__ == "__main__":
    run_subcommands("perf_pipeline", __doc__, COMMANDS)
