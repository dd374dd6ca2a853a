"""DataLoaders built once and reused: persistent workers, reseeded per epoch without restarting them.

Starting DataLoader workers costs seconds at real image sizes (every start forks the training process,
CUDA context included), so the stage loop builds one training loader per stage and one embedding
loader per dataset, and changes only what they iterate over:

- :class:`EpochBatchSampler` yields the batches of the epoch's sampler (set by :meth:`set_epoch`), each
  tagged with a seed drawn from the epoch's seed;
- :class:`SeededBatches` fetches such a batch with torch's generator seeded from its tag, so random
  augmentations are a function of (epoch seed, batch number) alone — not of which worker process
  decodes the batch, how many workers there are, or what that worker decoded before. An epoch replays
  exactly after a resume, with persistent workers, with any ``num_workers``.
- :class:`EmbeddingLoader` iterates any index subset of one dataset in order, for embedding extraction.
- :class:`LoaderPool` keeps those loaders for a whole run: stage datasets that are subsets of one base
  dataset (what :func:`~pml_mutual.data.split_by_stage` makes) share the base's loader and its workers,
  so worker processes start once per run, not once per stage, and their shutdown (seconds with many
  workers forked from a process holding a CUDA context) happens once, at the end. Bases announced with
  :meth:`LoaderPool.share_embedding` (the prototype and the test datasets of a run) share one embedding
  loader, so drift measurement and evaluation start one set of workers between them, not one each.
"""

from __future__ import annotations

import ctypes
import gc
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset

from .device_decode import EncodedImageDataset, collate_encoded


def batch_seed(epoch_seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([epoch_seed, batch]).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochBatchSampler(Sampler):
    """Batches of ``batch_size`` consecutive indices of the current epoch's sampler, as ``(seed, indices)``;
    an incomplete last batch is dropped (as PML's trainers do)."""

    def __init__(self, batch_size: int):
        self.batch_size = int(batch_size)
        self.sampler: Iterable[int] | None = None
        self.epoch_seed = 0
        self.index_map: np.ndarray | None = None

    def set_epoch(self, sampler: Iterable[int], epoch_seed: int, index_map: np.ndarray | None = None) -> None:
        """``index_map[i]`` is the loader's item for the sampler's index ``i`` (a stage subset inside its
        base)."""
        self.sampler, self.epoch_seed, self.index_map = sampler, int(epoch_seed), index_map

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        if self.sampler is None:
            raise RuntimeError("EpochBatchSampler.set_epoch must be called before iterating")
        batch, number = [], 0
        index_map = self.index_map
        for i in self.sampler:
            batch.append(int(i) if index_map is None else int(index_map[i]))
            if len(batch) == self.batch_size:
                yield batch_seed(self.epoch_seed, number), batch
                batch, number = [], number + 1

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size if self.sampler is not None else 0


class SeededBatches(Dataset):
    """``dataset`` fetched a batch at a time: ``(seed, indices)`` → the items, drawn with torch's CPU
    generator seeded from ``seed`` (and restored afterwards, so a fetch in the main process leaves the
    training stream of random numbers untouched)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, seeded_batch: tuple[int, Sequence[int]]) -> list:
        seed, indices = seeded_batch
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return [self.dataset[i] for i in indices]

    def __getitem__(self, seeded_batch):
        return self.__getitems__(seeded_batch)


def train_loader(
    dataset: Dataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False, collate_fn=None
):
    """(loader, batch sampler): one loader for every epoch of a stage; call ``batch_sampler.set_epoch``
    before each ``iter(loader)``."""
    batches = EpochBatchSampler(batch_size)
    loader = DataLoader(
        SeededBatches(dataset),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
    return loader, batches


class _Tasks(Sampler):
    """Consecutive chunks of ``indices``, ``size`` items each (the last may be shorter): one worker task
    each."""

    def __init__(self):
        self.indices: Sequence[int] = []
        self.size = 1

    def __iter__(self):
        for start in range(0, len(self.indices), self.size):
            yield list(self.indices[start : start + self.size])

    def __len__(self) -> int:
        return -(-len(self.indices) // self.size)


class EmbeddingLoader:
    """A loader over ``dataset`` built once; ``loader(indices)`` iterates those items in order (all by
    default), reusing the same worker processes every time.

    A pass is cut into worker tasks of at most ``batch_size`` items and, when the pass is short enough,
    about ``tasks_per_worker`` tasks per worker (never under ``min_task`` items, so small items do not pay
    a task's overhead each): with one ``batch_size`` per task, 6,000 images on 14 workers are 32 tasks,
    three waves of which the last keeps 4 workers busy and 10 idle (``benchmarks/perf_pipeline.py extract
    --decode-sleep-ms 5 --workers 14 --crop 16``, a core per worker simulated: 0.75× the pass time with
    4 tasks per worker). :func:`~pml_mutual.evaluation.stages.extract_embeddings` joins the tasks into
    model batches of ``batch_size`` again, so the model sees the same batches either way; the join is a
    copy on the model's device: cheap on a GPU, a host memory copy on the CPU (where the forward, not
    decoding, bounds a pass). So a run cuts tasks finer only on CUDA (``OnlineLearner``), and
    ``tasks_per_worker=None`` (the default) keeps one ``batch_size`` per task. ``collate_fn``: the
    DataLoader's (e.g. :func:`~pml_mutual.data.device_decode.collate_encoded`).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
        tasks_per_worker: int | None = None,
        min_task: int = 16,
        collate_fn=None,
    ):
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.num_workers, self.tasks_per_worker, self.min_task = num_workers, tasks_per_worker, min_task
        self._tasks = _Tasks()
        self._loader = DataLoader(
            dataset,
            batch_sampler=self._tasks,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=pin_memory,
            collate_fn=collate_fn,
        )

    def task_size(self, n: int) -> int:
        """Items per worker task for a pass over ``n`` items."""
        if self.tasks_per_worker is None:
            return self.batch_size
        per_task = -(-n // (self.tasks_per_worker * max(1, self.num_workers)))
        return max(1, min(self.batch_size, max(self.min_task, per_task)))

    def __call__(self, indices: Sequence[int] | None = None) -> DataLoader:
        self._tasks.indices = range(len(self.dataset)) if indices is None else list(indices)
        self._tasks.size = self.task_size(len(self._tasks.indices))
        return self._loader


def base_indices(dataset: Dataset) -> tuple[Dataset, np.ndarray]:
    """(base dataset, indices into it) of a ``Subset`` (or a ``ConcatDataset`` of subsets) of one
    dataset, at any depth; any other dataset is its own base."""
    if isinstance(dataset, Subset):
        base, index = base_indices(dataset.dataset)
        return base, index[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, ConcatDataset) and dataset.datasets:
        parts = [base_indices(d) for d in dataset.datasets]
        if all(base is parts[0][0] for base, _ in parts):
            return parts[0][0], np.concatenate([index for _, index in parts])
    return dataset, np.arange(len(dataset))


class EmbeddingView:
    """``dataset`` through the :class:`EmbeddingLoader` that holds its base; ``index``: its items there."""

    def __init__(self, dataset: Dataset, loader: EmbeddingLoader, index: np.ndarray):
        self.dataset, self._loader, self._index = dataset, loader, index

    def __call__(self, indices: Sequence[int] | None = None) -> DataLoader:
        return self._loader(
            self._index if indices is None else self._index[np.asarray(indices, dtype=np.int64)]
        )


def return_free_heap() -> None:
    """Collect garbage and return the C heap's free pages to the system (glibc's ``malloc_trim``; a no-op
    where there is none), so that a process forked next does not share them."""
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return
    trim(0)


class LoaderPool:
    """The loaders of a run, each built once per base dataset and kept until :meth:`close`.

    ``train(dataset)`` → ``(loader, batch_sampler, index_map)`` for a stage's training set (the last
    base's loader is replaced, not kept, when a stage has another base); ``embed(dataset)`` → an
    :class:`EmbeddingView` for extraction, through the loader of its base, or the one loader that
    :meth:`share_embedding` built for several bases.

    ``decode_on_device``: embedding loaders hand image files over undecoded
    (:class:`~pml_mutual.data.device_decode.EncodedImageDataset`), and the batch is decoded on the
    model's device when :func:`~pml_mutual.evaluation.stages.extract_embeddings` moves it there.
    Every embedded base must then be an :class:`~pml_mutual.data.ImageListDataset` with a test
    :class:`~pml_mutual.data.ProtocolTransform` (else ``ValueError``, naming it).
    """

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        embed_tasks_per_worker: int | None = None,
        decode_on_device: bool = False,
    ):
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.embed_tasks_per_worker = embed_tasks_per_worker  # see EmbeddingLoader
        self.decode_on_device = decode_on_device
        self._train: tuple | None = None  # (base, loader, batch sampler, collate_fn)
        self._embed: dict[
            int, tuple[Dataset, EmbeddingLoader, int]
        ] = {}  # id(base) → (base, loader, its offset there)

    def train(self, dataset: Dataset, collate_fn=None):
        base, index = base_indices(dataset)
        if self._train is None or self._train[0] is not base or self._train[3] is not collate_fn:
            self._train = None  # the old base's workers end before new ones start
            loader, batches = train_loader(
                base, self.batch_size, self.num_workers, self.pin_memory, collate_fn
            )
            self._train = (base, loader, batches, collate_fn)
        return self._train[1], self._train[2], index

    def share_embedding(self, datasets: Iterable[Dataset]) -> None:
        """Embed all these datasets' bases through one loader over their concatenation: one set of worker
        processes, started on first use, serves all of them. Bases that already have a loader keep it.
        A batch never mixes bases (a view iterates only its own items), so their transforms may differ."""
        bases = []
        for dataset in datasets:
            base, _ = base_indices(dataset)
            if id(base) not in self._embed and all(base is not b for b in bases):
                bases.append(base)
        if len(bases) < 2:
            return
        loader = self._embedding_loader(ConcatDataset([self._encoded(b) for b in bases]))
        offsets = np.cumsum([0] + [len(b) for b in bases[:-1]])
        for base, offset in zip(bases, offsets):
            self._embed[id(base)] = (base, loader, int(offset))

    def _encoded(self, base: Dataset) -> Dataset:
        """``base`` as its embedding loader reads it: undecoded files when decoding on the device."""
        return EncodedImageDataset(base) if self.decode_on_device else base

    def _embedding_loader(self, dataset: Dataset) -> EmbeddingLoader:
        collate = collate_encoded if self.decode_on_device else None
        return EmbeddingLoader(
            dataset,
            self.eval_batch_size,
            self.num_workers,
            self.pin_memory,
            self.embed_tasks_per_worker,
            collate_fn=collate,
        )

    def embed(self, dataset: Dataset) -> EmbeddingView:
        base, index = base_indices(dataset)
        if id(base) not in self._embed:
            self._embed[id(base)] = (base, self._embedding_loader(self._encoded(base)), 0)
        _, loader, offset = self._embed[id(base)]
        return EmbeddingView(dataset, loader, index + offset)

    def start_workers(self, train: Dataset | None = None, embed: Iterable[Dataset] = ()) -> None:
        """Start now the worker processes of the loaders that :meth:`train` (``train``) and :meth:`embed`
        (each of ``embed``) will hand out, instead of at their first batch: a run calls this before it
        builds any network, so that workers fork from a small process. Every page shared with a worker
        at the fork is copied by the training process on its first write there: a BN-Inception step on
        the CPU took 0.9 s instead of 0.15 s right after its loader forked (90,000 page faults). The
        heap's free pages (a previous run's networks, in a script that runs several) are returned to
        the system first, for the same reason."""
        if self.num_workers == 0:
            return
        return_free_heap()
        if train is not None:
            loader, batches, _ = self.train(train)
            batches.set_epoch((), 0)  # nothing to fetch yet: the workers start and wait
            iter(loader)
        for dataset in embed:
            iter(self.embed(dataset)([]))

    def close(self) -> None:
        """End every worker process now."""
        self._train = None
        self._embed.clear()
