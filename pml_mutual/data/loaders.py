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
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def batch_seed(epoch_seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([epoch_seed, batch]).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochBatchSampler(Sampler):
    """Batches of ``batch_size`` consecutive indices of the current epoch's sampler, as ``(seed, indices)``;
    an incomplete last batch is dropped (as PML's trainers do)."""

    def __init__(self, batch_size: int):
        self.batch_size = int(batch_size)
        self.sampler: Iterable[int] | None = None
        self.epoch_seed = 0

    def set_epoch(self, sampler: Iterable[int], epoch_seed: int) -> None:
        self.sampler, self.epoch_seed = sampler, int(epoch_seed)

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        if self.sampler is None:
            raise RuntimeError("EpochBatchSampler.set_epoch must be called before iterating")
        batch, number = [], 0
        for i in self.sampler:
            batch.append(int(i))
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


def train_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False, collate_fn=None):
    """(loader, batch sampler): one loader for every epoch of a stage; call ``batch_sampler.set_epoch``
    before each ``iter(loader)``."""
    batches = EpochBatchSampler(batch_size)
    loader = DataLoader(
        SeededBatches(dataset), batch_sampler=batches, num_workers=num_workers, collate_fn=collate_fn,
        persistent_workers=num_workers > 0, pin_memory=pin_memory,
    )
    return loader, batches


class _Indices(Sampler):
    def __init__(self, n: int):
        self.indices: Sequence[int] = range(n)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EmbeddingLoader:
    """A loader over ``dataset`` built once; ``loader(indices)`` iterates those items in order (all by
    default), reusing the same worker processes every time."""

    def __init__(self, dataset: Dataset, batch_size: int = 256, num_workers: int = 0, pin_memory: bool = False):
        self.dataset = dataset
        self._order = _Indices(len(dataset))
        self._loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self._order, num_workers=num_workers,
            persistent_workers=num_workers > 0, pin_memory=pin_memory,
        )

    def __call__(self, indices: Sequence[int] | None = None) -> DataLoader:
        self._order.indices = range(len(self.dataset)) if indices is None else list(indices)
        return self._loader
