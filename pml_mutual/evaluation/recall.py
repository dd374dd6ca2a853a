"""Exact Recall@K with FAISS (the paper's retrieval protocol).

Recall@K (the paper's metric, Song et al. 2016): the fraction of queries with at least one item of
their own class among their K nearest neighbours. Query set = gallery = one set of test embeddings;
each query's own item is excluded *by index* (not by dropping the first neighbour, which would be wrong
when embeddings are duplicated). Similarity is the cosine (inner product of L2-normalised rows).

This differs from PML's ``precision_at_k`` (the fraction of the K neighbours that share the class);
the two coincide only for K = 1, where both equal PML's ``precision_at_1``.

A query whose class has no other test item cannot be matched: its recall is 0 and it is counted
(the paper's protocol evaluates every test image). PML's AccuracyCalculator leaves such "lone"
queries out instead, so the two agree only when every class has at least two items.

Ties at equal similarity are broken toward the lower gallery index, so results are deterministic.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import faiss
import numpy as np
import torch

_GPU_RESOURCES = None


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"every K in ks must be a positive integer, got {k!r}")
    return tuple(int(k) for k in ks)


def prepare(embeddings, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (float32 L2-normalised C-contiguous (N, D), int64 (N,))."""
    emb = _to_numpy(embeddings, "embeddings")
    lab = _to_numpy(labels, "labels")
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {emb.shape}")
    if emb.shape[0] == 0:
        raise ValueError("embeddings is an empty set: nothing to evaluate")
    if lab.ndim != 1 or lab.shape[0] != emb.shape[0]:
        raise ValueError(f"labels must be 1-D with one entry per embedding ({emb.shape[0]}), got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"labels must be integers, got {lab.dtype}")
    emb = emb.astype(np.float32, copy=False)
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or inf values")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.ascontiguousarray(emb / np.maximum(norms, 1e-12), dtype=np.float32)
    return emb, lab.astype(np.int64, copy=False)


def make_index(dim: int, use_gpu: bool | None = None):
    """An exact inner-product index: on GPU when faiss has GPUs (and ``use_gpu`` is not False)."""
    global _GPU_RESOURCES
    index = faiss.IndexFlatIP(dim)
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu and not has_gpu:
        raise RuntimeError("use_gpu=True but this faiss build sees no GPU (install faiss-gpu on a CUDA machine)")
    if has_gpu and use_gpu is not False:
        if _GPU_RESOURCES is None:
            _GPU_RESOURCES = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)
    return index


def nearest_neighbours(
    emb: np.ndarray, k: int, chunk_size: int = 8192, use_gpu: bool | None = None
) -> np.ndarray:
    """Indices (N, min(k, N−1)) of each row's nearest other rows, self excluded by index, ties → lower index.

    Queries go in chunks, so memory is O(N·k + chunk·k) on top of the index: never an N×N matrix.
    """
    n = emb.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    index = make_index(emb.shape[1], use_gpu)
    index.add(emb)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        idx = _search_past_ties(index, emb[start:stop], k + 1, n)
        is_self = idx == np.arange(start, stop)[:, None]
        # Drop self where it was returned; otherwise keep the first k.
        drop = np.where(is_self.any(1), is_self.argmax(1), k)
        keep = np.ones_like(idx, dtype=bool)
        keep[np.arange(stop - start), drop] = False
        out[start:stop] = idx[keep].reshape(stop - start, -1)[:, :k]
    return out


def _search_past_ties(index, queries: np.ndarray, k: int, n: int) -> np.ndarray:
    """Top-k indices per query ordered by (score desc, index asc), exactly as a stable full sort would.

    faiss returns *some* k of the items tied at the k-th score; when a row's list ends inside a tie,
    that row is searched again with twice the k until the tie is fully inside, then cut after sorting.
    """
    width = min(k, n)
    kk = min(k + 1, n)  # one past k: tells whether the k-th score's tie continues
    scores, idx = index.search(queries, kk)
    rows = np.arange(len(queries))
    result = np.empty((len(queries), width), dtype=np.int64)
    while True:
        order = np.lexsort((idx, -scores), axis=-1)
        idx = np.take_along_axis(idx, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        if kk < n:
            open_tie = scores[:, -1] == scores[:, width - 1]
        else:
            open_tie = np.zeros(len(rows), dtype=bool)
        result[rows[~open_tie]] = idx[~open_tie, :width]
        if not open_tie.any():
            return result
        rows = rows[open_tie]
        kk = min(2 * kk, n)
        scores, idx = index.search(queries[rows], kk)


def recall_at_k(
    embeddings,
    labels,
    ks: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int = 8192,
    use_gpu: bool | None = None,
) -> dict[int, float]:
    """Exact Recall@K of ``embeddings`` (N, D) against themselves; fractions in [0, 1], keyed by K.

    Accepts tensors or arrays. When N − 1 < K, every other item is a neighbour.
    """
    ks = check_ks(ks)
    emb, lab = prepare(embeddings, labels)
    nbrs = nearest_neighbours(emb, max(ks), chunk_size, use_gpu)
    if nbrs.shape[1] == 0:  # a single item has no neighbour to find
        return {k: 0.0 for k in ks}
    same = lab[nbrs] == lab[:, None]
    # first_hit[q] = rank of the first same-class neighbour (or a sentinel beyond every K).
    first_hit = np.where(same.any(1), same.argmax(1), np.iinfo(np.int64).max)
    return {k: float(np.mean(first_hit < k)) for k in ks}
