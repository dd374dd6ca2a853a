"""Exact Recall@K (the paper's retrieval protocol), searched with FAISS or torch (see :mod:`.knn`).

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

``recall_at_k(..., distance=...)`` also ranks by the raw inner product (``"inner_product"``) or the
Euclidean distance of the raw rows (``"euclidean"``, PML's ``AccuracyCalculator`` default with its
FAISS L2 search); on embeddings that are not unit-norm these give other neighbours than the cosine.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from . import knn, rescore
from .knn import make_index  # noqa: F401  (public since the first release)


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{name} must be real, got a {x.dtype} tensor")
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    x = np.asarray(x)
    if np.iscomplexobj(x):
        raise TypeError(f"{name} must be real, got {x.dtype}")
    return x


def check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    if isinstance(ks, (int, np.integer)) and not isinstance(ks, bool):
        raise TypeError(
            f"ks must be a sequence of positive integers, e.g. ({ks},), got the bare integer {ks!r}"
        )
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"every K in ks must be a positive integer, got {k!r}")
    return tuple(int(k) for k in ks)


def check_inputs(embeddings, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (float32 C-contiguous (N, D), int64 (N,)); values are checked where the
    search runs (see :func:`prepare`)."""
    emb = _to_numpy(embeddings, "embeddings")
    lab = _to_numpy(labels, "labels")
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {emb.shape}")
    if emb.shape[0] == 0:
        raise ValueError("embeddings is an empty set: nothing to evaluate")
    if emb.shape[1] == 0:
        raise ValueError(f"embeddings have no dimension (shape {emb.shape}): nothing to compare")
    if lab.ndim != 1 or lab.shape[0] != emb.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one entry per embedding ({emb.shape[0]}), got shape {lab.shape}"
        )
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"labels must be integers, got {lab.dtype}")
    return np.ascontiguousarray(emb, dtype=np.float32), lab.astype(np.int64, copy=False)


def prepare(embeddings, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (float32 L2-normalised C-contiguous (N, D), int64 (N,))."""
    emb, lab = check_inputs(embeddings, labels)
    return knn.normalized_rows(emb), lab


def nearest_neighbours(
    emb,
    k: int,
    chunk_size: int | None = None,
    use_gpu: bool | None = None,
    backend: str = "auto",
    device=None,
    normalize: bool = False,
) -> np.ndarray:
    """Indices (N, min(k, N−1)) of each row's nearest other rows, self excluded by index, ranked by float64
    similarity with ties → lower index, the same whichever backend searched (:mod:`.rescore`).

    ``backend``: ``"auto"`` (FAISS GPU, else torch on CUDA, else FAISS CPU), ``"faiss"`` or ``"torch"``
    (``device`` picks the torch device; default CUDA when present). Queries go in chunks
    (``chunk_size`` rows; None sizes them from free memory), so memory is O(chunk·N + N·k) (on the CPU,
    in column blocks: O(chunk·2,048 + N·k)): never an N×N matrix, also when every row ties.
    ``normalize``: refuse NaN/inf and scale rows to unit norm first, where the search runs (on the torch
    device, not on the host first).
    """
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    chunk_size = knn.check_chunk_size(chunk_size)
    if not (isinstance(emb, np.ndarray) and emb.dtype == np.float32 and emb.flags.c_contiguous):
        emb = np.ascontiguousarray(_to_numpy(emb, "embeddings"), dtype=np.float32)
    n = emb.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    backend, torch_device = knn.resolve_backend(backend, use_gpu, device)
    # float32 candidates with a margin, then one float64 ranking (ties by index) whatever the backend
    k_search = min(k + rescore.MARGIN, n - 1)
    if backend == "torch":
        candidates = knn.torch_neighbours(emb, k_search, torch_device, chunk_size, normalize=normalize)
    else:
        candidates = knn.faiss_neighbours(
            knn.normalized_rows(emb) if normalize else emb, k_search, chunk_size, use_gpu
        )
        torch_device = torch.device("cpu")
    return rescore.certified_neighbours(emb, candidates, k, normalize, torch_device)


def _recalls(nbrs: np.ndarray, lab: np.ndarray, ks: tuple[int, ...]) -> dict[int, float]:
    """Recall@K from each query's ranked neighbours: a hit when a same-class item is among the first K."""
    if nbrs.shape[1] == 0:  # a single item has no neighbour to find
        return {k: 0.0 for k in ks}
    same = lab[nbrs] == lab[:, None]
    # first_hit[q] = rank of the first same-class neighbour (or a sentinel beyond every K).
    first_hit = np.where(same.any(1), same.argmax(1), np.iinfo(np.int64).max)
    return {k: float(np.mean(first_hit < k)) for k in ks}


DISTANCES = ("cosine", "inner_product", "euclidean")


def recall_at_k(
    embeddings,
    labels,
    ks: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int | None = None,
    use_gpu: bool | None = None,
    backend: str = "auto",
    device=None,
    distance: str = "cosine",
) -> dict[int, float]:
    """Exact Recall@K of ``embeddings`` (N, D) against themselves; fractions in [0, 1], keyed by K.

    ``distance``: ``"cosine"`` (the paper's protocol: rows L2-normalised, default), ``"inner_product"``
    (raw rows) or ``"euclidean"`` (raw rows, as PML's ``AccuracyCalculator`` searches by default; exact
    search by the torch kernel, in float64). Accepts tensors or arrays. When N − 1 < K, every other item
    is a neighbour. ``backend``, ``device``, ``chunk_size`` and ``use_gpu`` choose the search (see
    :func:`nearest_neighbours`); every backend gives the same result.
    """
    ks = check_ks(ks)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    chunk_size = knn.check_chunk_size(chunk_size)
    emb, lab = check_inputs(embeddings, labels)
    if distance != "cosine" and not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or inf values")
    if distance == "euclidean":
        return _recalls(_euclidean_neighbours(emb, max(ks), chunk_size, device), lab, ks)
    nbrs = nearest_neighbours(
        emb, max(ks), chunk_size, use_gpu, backend, device, normalize=distance == "cosine"
    )
    return _recalls(nbrs, lab, ks)


def _euclidean_neighbours(emb: np.ndarray, k: int, chunk_size: int | None, device) -> np.ndarray:
    """Nearest rows by L2 distance, self excluded by index: ranking by −‖q − g‖² is ranking by
    q·g − ‖g‖²/2, the inner product of [q, 1] with [g, −‖g‖²/2] (float64: no cancellation to speak of)."""
    n = emb.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    x = emb.astype(np.float64)
    queries = np.ascontiguousarray(np.concatenate([x, np.ones((n, 1))], axis=1))
    gallery = np.ascontiguousarray(np.concatenate([x, -0.5 * (x * x).sum(1, keepdims=True)], axis=1))
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    return knn.torch_cross_neighbours(queries, gallery, k, dev, chunk_size, normalize=False)


def cross_recall_at_k(
    queries, gallery, labels, ks: Sequence[int] = (1, 2, 4, 8), chunk_size: int | None = None, device=None
) -> dict[int, float]:
    """Recall@K of ``queries`` (N, D) against ``gallery`` (N, D) embedded by another model: item i is the
    query of row i and the gallery entry of row i, and is excluded from its own neighbours by index, as
    in :func:`recall_at_k` (same ties → lower index, lone queries are misses). With ``gallery is
    queries`` it equals ``recall_at_k`` on the torch backend. Exact search in torch (CUDA when present)."""
    ks = check_ks(ks)
    chunk_size = knn.check_chunk_size(chunk_size)
    q, lab = check_inputs(queries, labels)
    g, _ = check_inputs(gallery, labels)
    if q.shape != g.shape:
        raise ValueError(f"queries and gallery must hold the same items: shapes {q.shape} and {g.shape}")
    k = min(max(ks), q.shape[0] - 1)
    if k <= 0:
        return {kk: 0.0 for kk in ks}
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    return _recalls(knn.torch_cross_neighbours(q, g, k, dev, chunk_size), lab, ks)
