import multiprocessing
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset

from pml_mutual.data.loaders import LoaderPool


class Tagged(Dataset):
    """Item i is (tag, i, pid of the process that fetched it)."""

    def __init__(self, tag: int, n: int):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([self.tag, i, os.getpid()])


def fetched(view):
    return torch.cat(list(view())).tolist()


def test_shared_embedding_loader_serves_each_dataset_its_own_items_from_one_set_of_workers():
    prototypes, test = Tagged(0, 10), Tagged(1, 7)
    stage_a, stage_b = Subset(prototypes, [1, 4, 5]), Subset(prototypes, [9, 0])
    pool = LoaderPool(batch_size=2, eval_batch_size=3, num_workers=1)
    try:
        pool.share_embedding([stage_a, stage_b, test])
        views = [pool.embed(d) for d in (stage_a, stage_b, test)]
        rows = [fetched(v) for v in views]
        assert [[r[:2] for r in rs] for rs in rows] == [
            [[0, 1], [0, 4], [0, 5]],
            [[0, 9], [0, 0]],
            [[1, i] for i in range(7)],
        ]
        pids = {r[2] for rs in rows for r in rs}
        assert len(pids) == 1 and pids != {os.getpid()}  # one worker process fetched every item
        assert [r[:2] for r in fetched(views[0])] == [[0, 1], [0, 4], [0, 5]]  # again, after the others
        sub = views[2]([6, 2])  # a view's own indices map into its base inside the shared loader
        assert [r[:2] for r in torch.cat(list(sub)).tolist()] == [[1, 6], [1, 2]]
    finally:
        pool.close()


def test_without_sharing_each_base_has_its_own_workers():
    prototypes, test = Tagged(0, 4), Tagged(1, 4)
    pool = LoaderPool(batch_size=2, eval_batch_size=4, num_workers=1)
    try:
        a, b = fetched(pool.embed(prototypes)), fetched(pool.embed(test))
        assert {r[2] for r in a} != {r[2] for r in b}
        pool.share_embedding([prototypes, test])  # bases that already have a loader keep it
        assert {r[2] for r in fetched(pool.embed(test))} == {r[2] for r in b}
    finally:
        pool.close()


def test_offsets_follow_the_bases_in_the_order_given():
    bases = [Tagged(t, n) for t, n in enumerate([3, 1, 5])]
    pool = LoaderPool(batch_size=2, eval_batch_size=8, num_workers=0)
    pool.share_embedding(bases + [Subset(bases[2], [0])])  # a subset of a listed base adds nothing
    for base in bases:
        got = np.array(fetched(pool.embed(base)))
        assert (got[:, 0] == base.tag).all() and got[:, 1].tolist() == list(range(base.n))


def children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


def test_start_workers_forks_every_worker_before_the_first_batch_and_those_workers_serve_the_batches():
    base, test = Tagged(0, 8), Tagged(1, 4)
    stage = Subset(base, [6, 1, 3, 4])
    before = children()
    pool = LoaderPool(batch_size=2, eval_batch_size=4, num_workers=1)
    try:
        pool.start_workers(train=stage, embed=[test])
        started = children() - before
        assert len(started) == 2  # the training loader's worker and the embedding loader's
        loader, batches, index = pool.train(stage)
        batches.set_epoch(range(4), 0, index)
        trained = torch.cat(list(loader)).tolist()
        del loader, batches  # the pool's, from here on
        embedded = fetched(pool.embed(test))
        assert sorted(r[1] for r in trained) == [1, 3, 4, 6] and [r[1] for r in embedded] == [0, 1, 2, 3]
        assert {r[2] for r in trained + embedded} == started  # no worker started after start_workers
    finally:
        pool.close()
    assert not children() & started  # and they end with the pool


def test_start_workers_without_workers_starts_nothing():
    before = children()
    pool = LoaderPool(batch_size=2, eval_batch_size=4, num_workers=0)
    pool.start_workers(train=Tagged(0, 4), embed=[Tagged(1, 4)])
    assert children() == before
    assert [r[1] for r in fetched(pool.embed(Tagged(1, 3)))] == [0, 1, 2]


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim"
)
def test_return_free_heap_gives_freed_heap_pages_back_to_the_system():
    # in a process of its own: what a test suite's earlier tests left in this process's heap (free chunks
    # that the blocks below would reuse) is not this function's business
    script = """
import os, torch
from pml_mutual.data.loaders import return_free_heap
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
chunks = [torch.ones(16 * 1024) for _ in range(3200)]  # 200 MiB in 64 KiB blocks: heap, not mmap
pinned = torch.ones(16)  # allocated after them, so free() alone cannot shrink the heap past it
del chunks
held = rss()
return_free_heap()
print(held, rss())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=120
    )
    held, after = map(float, out.stdout.split())
    assert after < held - 100


def test_the_pool_cuts_embedding_passes_into_the_tasks_it_is_given_and_keeps_the_items():
    base = Tagged(0, 100)
    fine = LoaderPool(batch_size=2, eval_batch_size=32, num_workers=0, embed_tasks_per_worker=4)
    whole = LoaderPool(batch_size=2, eval_batch_size=32, num_workers=0)
    views = [pool.embed(Subset(base, list(range(3, 100, 2)))) for pool in (fine, whole)]
    assert [[len(b) for b in view()] for view in views] == [[16, 16, 16, 1], [32, 17]]
    assert fetched(views[0]) == fetched(views[1])  # same items, same order
