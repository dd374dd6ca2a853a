"""Training on several processes with PyTorch's own engine (``torchrun``; NCCL on GPUs, gloo on CPUs).

Everything here is a no-op in a single process without an initialised process group, so the rest of
the package calls these helpers unconditionally:

- :func:`gather_with_grad` concatenates every rank's batch; the gradient reaching each rank's slice is the
  sum over ranks, which DDP's gradient averaging turns into exactly the gradient of one process holding
  the global batch (the trainers' ``gram_scope="global"``).
- :class:`DistributedMPerClassSampler` draws, per step, one global class-balanced batch from a generator
  seeded identically on every rank and hands each rank a disjoint slice of its classes: N ranks × B
  images are the same images as one process with N·B.
- :func:`gather_rows` assembles rows computed on disjoint shards (prototypes, drift, evaluation) so every
  rank holds the same tensors; :func:`broadcast_object` sends rank 0's result (FAISS evaluation) to all.
"""

from __future__ import annotations

import gc
import os
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

GRAM_SCOPES = ("global", "local")


def check_gram_scope(scope: str) -> str:
    if scope not in GRAM_SCOPES:
        raise ValueError(f"gram_scope must be one of {GRAM_SCOPES}, got {scope!r}")
    return scope


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    return rank() == 0


def default_device() -> str:
    """``"cuda"`` where torch sees a GPU (this rank's own under torchrun), else ``"cpu"``."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{torch.cuda.current_device()}" if is_active() else "cuda"


def barrier() -> None:
    if is_active():
        dist.barrier()


def init_from_env(backend: str | None = None) -> torch.device:
    """Initialise the process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, …) and
    return this process's device: ``cuda:LOCAL_RANK`` with NCCL when there is a GPU for every local rank,
    else the CPU with gloo. Without torchrun's variables nothing is initialised (a single process)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_ranks
    if "WORLD_SIZE" not in os.environ or is_active():
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = backend or ("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")


def shutdown(wait: bool = True) -> None:
    """End this process's part of the run: free what still references the process group (DDP wrappers,
    pending gloo work) while the interpreter is whole, wait for every rank (``wait``; not after an error,
    when other ranks may never arrive), destroy the group. Leaving that to interpreter exit can abort
    the process (SIGABRT) after a successful run."""
    if not is_active():
        return
    gc.collect()
    if wait:
        dist.barrier()
    dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    # All-gather forward; backward all-reduces the full gradient and keeps this rank's slice. Written out
    # (not torch.distributed.nn.all_gather) because gloo has no reduce-scatter.
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank order (equal sizes per rank), differentiable w.r.t. the local
    slice."""
    if not is_active() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (equal sizes) concatenated in rank order, without gradient."""
    if not is_active() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def shard(n: int) -> np.ndarray:
    """The indices of ``range(n)`` this rank handles (round-robin), for :func:`gather_rows`."""
    return np.arange(rank(), n, world_size())


def gather_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Reassemble the rows of ``range(n)`` computed round-robin on each rank (see :func:`shard`) on every
    rank."""
    if not is_active() or world_size() == 1:
        return rows
    per_rank = -(-n // world_size())
    padded = torch.zeros((per_rank,) + tuple(rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    out = torch.empty((n,) + tuple(rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    for r, part in enumerate(parts):
        idx = torch.arange(r, n, world_size())
        out[idx] = part[: len(idx)]
    return out


def broadcast_object(obj=None, src: int = 0):
    """``obj`` of rank ``src`` on every rank."""
    if not is_active() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class DistributedMPerClassSampler(Sampler[int]):
    """Class-balanced batches split across ranks: each step draws ``world_size · batch_size / m`` distinct
    classes and ``m`` images of each from one generator seeded identically everywhere (by default from
    NumPy's global RNG at ``__iter__``, which :func:`pml_mutual.online.seed_everything` sets per epoch);
    rank r yields the images of the r-th block of those classes. Classes with fewer than ``m`` images are
    sampled with replacement. In one process it is an ordinary m-per-class sampler.

    Args:
        labels: labels of the dataset, one per item.
        m: images per class in a batch; batch_size: images per rank per step (a multiple of ``m``).
        length_before_new_iter: indices this rank yields per epoch (whole batches are kept).
    """

    def __init__(
        self,
        labels: Sequence[int],
        m: int,
        batch_size: int,
        length_before_new_iter: int,
        num_replicas: int | None = None,
        rank_: int | None = None,
        seed: int | None = None,
    ):
        self.labels = np.asarray(labels)
        self.m, self.batch_size = int(m), int(batch_size)
        self.num_replicas = world_size() if num_replicas is None else int(num_replicas)
        self.rank = rank() if rank_ is None else int(rank_)
        self.seed = seed
        if self.m < 1 or self.batch_size % self.m:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of m ({m})")
        self.classes = np.unique(self.labels)
        self.per_step = self.num_replicas * self.batch_size // self.m
        if self.per_step > len(self.classes):
            raise ValueError(
                f"a global batch of {self.num_replicas} × {batch_size} with {m} per class needs "
                f"{self.per_step} classes, the dataset has {len(self.classes)}"
            )
        self.index_of = {c: np.flatnonzero(self.labels == c) for c in self.classes.tolist()}
        self.steps = max(1, int(length_before_new_iter) // self.batch_size)

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __iter__(self) -> Iterator[int]:
        seed = self.seed if self.seed is not None else int(np.random.randint(0, 2**31 - 1))
        rng = np.random.default_rng(seed)
        k = self.batch_size // self.m
        out = []
        for _ in range(self.steps):
            chosen = rng.choice(self.classes, size=self.per_step, replace=False)
            batch = []
            for c in chosen.tolist():
                pool = self.index_of[c]
                batch.append(rng.choice(pool, size=self.m, replace=len(pool) < self.m))
            out.extend(np.concatenate(batch[self.rank * k : (self.rank + 1) * k]).tolist())
        return iter(out)
