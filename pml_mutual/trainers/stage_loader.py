"""How a stage's trainer gets its batches: one loader for the whole stage (or the run's, from a
:class:`~pml_mutual.data.loaders.LoaderPool`), reseeded per epoch, batches moved to the device without a
host wait."""

from __future__ import annotations

import torch
from pytorch_metric_learning.utils import common_functions as c_f

from ..data.loaders import train_loader


class StageLoaderMixin:
    """For a PML trainer with ``loader_pool``, ``sampler``, ``dataset`` and ``device_type``: PML's
    ``initialize_dataloader`` / ``get_batch`` with persistent workers and per-epoch seeds."""

    def initialize_dataloader(self):
        """One loader for the whole stage: its workers persist from epoch to epoch, and each epoch's
        batches come from ``self.sampler`` (set by ``epoch_start_hook``) with augmentations seeded per
        batch from torch's generator as the epoch starts (see :mod:`pml_mutual.data.loaders`)."""
        if self.dataloader is None:
            if self.loader_pool is not None:  # the run's loader: its workers outlive this stage
                if self.loader_pool.batch_size != self.batch_size:
                    raise ValueError(
                        f"loader_pool batches {self.loader_pool.batch_size} items, the trainer "
                        f"{self.batch_size}"
                    )
                self.dataloader, self.batch_sampler, self.index_map = self.loader_pool.train(
                    self.dataset, self.collate_fn
                )
            else:
                self.dataloader, self.batch_sampler = train_loader(
                    self.dataset,
                    self.batch_size,
                    self.dataloader_num_workers,
                    pin_memory=self.device_type == "cuda",
                    collate_fn=self.collate_fn,
                )
                self.index_map = None
        # PML: shuffle
        sampler = self.sampler if self.sampler is not None else torch.utils.data.RandomSampler(self.dataset)
        # CPU generator: no GPU sync
        self.batch_sampler.set_epoch(sampler, int(torch.randint(2**62, ()).item()), self.index_map)
        self.dataloader_iter = iter(self.dataloader)

    def get_batch(self):
        self.dataloader_iter, curr_batch = c_f.try_next_on_generator(self.dataloader_iter, self.dataloader)
        data, labels = self.data_and_label_getter(curr_batch)
        labels = c_f.process_label(labels, self.label_hierarchy_level, self.label_mapper)
        # pinned host memory → device without blocking the host; the step queues behind the copy
        data = (
            data.to(self.data_device, dtype=self.dtype, non_blocking=True)
            if self.dtype
            else data.to(self.data_device, non_blocking=True)
        )
        labels = labels.to(self.data_device, non_blocking=True)
        return self.maybe_do_batch_mining(data, labels)

    def close_dataloader(self) -> None:
        """Let go of the loader: its workers end now (or stay with the ``loader_pool`` that owns them).
        Left to the garbage collector, their shutdown would run inside a later ``gc.collect``, where
        each worker is only terminated after DataLoader's 5 s status interval."""
        self.dataloader_iter = None
        self.dataloader = None
