"""What the benchmark tools share: timing, memory, result files, the models and data they measure on, the
ops a function dispatches, and the subcommand skeleton. Only public ``pml_mutual`` API is used.

Every tool prints ``name: value`` and ``ratio:`` lines last (each ratio against a baseline measured in the
same run) and writes its figures as JSON where ``--out`` says (default: ``runs/benchmarks/``, git-ignored).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pml_mutual.models import BACKBONES, EmbeddingMLP, SmallCNN, build_backbone

RESULTS = Path("runs") / "benchmarks"  # git-ignored: a benchmark never writes into the source tree unasked


def sync(device=None) -> None:
    """Wait for a GPU's queued kernels (without this only their launches would be timed)."""
    if (device is not None and torch.device(device).type == "cuda") or (
        device is None and torch.cuda.is_initialized()
    ):
        torch.cuda.synchronize()


def timed(fn: Callable, device=None, warmup: int = 5, repeats: int = 30) -> tuple[float, float, float]:
    """(median, min, max) seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_result(out: Path | None, result: dict) -> None:
    """The run's figures as JSON at ``out`` (nothing if ``out`` is None)."""
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")


def build(model_name: str, device, image_size: int = 224):
    """(model, empty input of its shape); the paper's backbones take image_size² RGB (random weights: what is
    measured does not depend on them)."""
    if model_name == "mlp":
        return EmbeddingMLP().to(device), torch.randn(0, 64)
    if model_name in BACKBONES:
        return build_backbone(model_name).to(device), torch.randn(0, 3, image_size, image_size)
    return SmallCNN().to(device), torch.randn(0, 1, 32, 32)


MODELS = ("small_cnn", "mlp", *BACKBONES)


def write_cub(
    root: Path, classes: int, per_class: int, width: int, height: int, workers: int | None = None
) -> Path:
    """A CUB-format directory of JPEGs (``classes`` × ``per_class`` images of ``width`` × ``height``)."""
    from pml_mutual.data.fixtures import write_cub_fixture

    return write_cub_fixture(
        root, [per_class] * classes, size=(width, height), workers=workers or os.cpu_count() or 1
    )


# ---------------------------------------------------------------------------------------------------------
# The computing ops a function dispatches, seen on the CPU through torch's dispatcher: each would be at least
# one kernel launch on a GPU. Views and the CPU-only value checks of checks.py are left out (a view launches
# nothing; the checks do not run on a GPU).
VIEWS = {
    "detach",
    "alias",
    "view",
    "_unsafe_view",
    "_reshape_alias",
    "expand",
    "t",
    "transpose",
    "permute",
    "unsqueeze",
    "squeeze",
    "select",
    "slice",
    "unbind",
    "split",
    "as_strided",
}


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).removeprefix("aten.")
        if name not in VIEWS and not any(f.filename.endswith("checks.py") for f in traceback.extract_stack()):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def computing_ops(fn: Callable) -> collections.Counter:
    """How many times ``fn`` (forward and backward) dispatches each computing op."""
    with _CountOps() as mode:
        fn()
    return mode.ops


# ---------------------------------------------------------------------------------------------------------
def run_subcommands(tool: str, doc: str, commands: dict, argv=None):
    """One tool, several measurements: ``commands`` maps a subcommand to ``(add_arguments, run, help)``.
    Every subcommand takes ``--out`` (default ``runs/benchmarks/<tool>_<subcommand>.json``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(commands) + "}")
    for name, (add_arguments, run, help_text) in commands.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=(run.__doc__ or help_text),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(p)
        p.add_argument(
            "--out",
            type=Path,
            default=RESULTS / f"{tool}_{name}.json",
            help="result JSON (default: %(default)s)",
        )
        p.set_defaults(run=run, parser=p)
    args = parser.parse_args(argv)
    return args.run(args)
