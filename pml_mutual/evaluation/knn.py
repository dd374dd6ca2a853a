"""Exact k-nearest-neighbour search of a set against itself: FAISS or plain torch, one semantics.

Both backends return, for every row, the indices of its k most similar *other* rows (inner product of
L2-normalised float32 rows; the row itself excluded by index), ordered by (score descending, index
ascending): exactly what a stable full sort of each row would give.

- ``"faiss"``: ``IndexFlatIP`` (on GPU when the installed faiss build has GPUs). FAISS returns *some*
  k of the items tied at the k-th score; rows whose list ends inside a tie are finished by the torch
  kernel on those rows alone.
- ``"torch"``: chunked ``matmul`` + ``topk`` on any torch device (CUDA when present): the GPU path that
  works with every torch build, including CUDA versions no faiss-gpu wheel exists for.
- ``"auto"``: FAISS on GPU if faiss sees one, else torch on CUDA if torch sees one, else FAISS on CPU.

Ties are resolved on the chunk's scores themselves (the items above the k-th score, then the lowest
indices among those tied at it), so memory stays O(chunk·N + N·k) whatever the data, a collapsed model
(all rows equal) included; on the CPU the scores come in blocks of gallery rows (O(chunk·block + N·k)).
"""

from __future__ import annotations

import contextlib
import warnings

import faiss
import numpy as np
import torch

from .exact_topk import exact_topk

BACKENDS = ("auto", "faiss", "torch")
# Bytes of working memory per score-matrix element: the float32 score, a boolean mask and a float32
# key (only for rows whose k-th score is tied beyond k).
_BYTES_PER_SCORE = 12
_CPU_BUDGET = 256 * 2**20
# On the CPU, queries are scored CPU_CHUNK_ROWS at a time against CPU_COLUMN_BLOCK gallery rows at a
# time, into one reused buffer (4 MiB), so the score matrix's memory no longer grows with N (measured:
# docs, Performance).
CPU_CHUNK_ROWS, CPU_COLUMN_BLOCK = 512, 2048
_GPU_RESOURCES = None


def faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_backend(
    backend: str = "auto", use_gpu: bool | None = None, device=None
) -> tuple[str, torch.device]:
    """(backend, torch device for the torch kernel) after applying ``"auto"`` and ``use_gpu``.

    ``use_gpu=False`` keeps everything on the CPU; ``use_gpu=True`` demands a GPU (FAISS's if the
    backend is ``"faiss"``, else torch's) and raises when there is none.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device is not None:
        device = torch.device(device)
    cuda = torch.cuda.is_available() and use_gpu is not False
    if backend == "faiss" or (backend == "auto" and faiss_has_gpu() and use_gpu is not False):
        if use_gpu and not faiss_has_gpu():
            raise RuntimeError(
                "use_gpu=True but this faiss build sees no GPU (use backend='torch', or install faiss-gpu)"
            )
        return "faiss", torch.device("cpu")
    if backend == "auto" and not cuda and device is None:
        if use_gpu:
            raise RuntimeError("use_gpu=True but neither faiss nor torch sees a GPU")
        return "faiss", torch.device("cpu")
    if device is None:
        device = torch.device("cuda") if cuda else torch.device("cpu")
    if use_gpu and device.type == "cpu":
        raise RuntimeError("use_gpu=True but torch sees no CUDA device")
    return "torch", device


def check_chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive integer or None (sized from memory), got {chunk_size!r}"
        )
    return int(chunk_size)


def auto_chunk_rows(n: int, device: torch.device, budget: int = _CPU_BUDGET) -> int:
    """Query rows per chunk: on the CPU :data:`CPU_CHUNK_ROWS` (scored in column blocks); elsewhere as
    many as let the chunk's whole score matrix and tie masks fit the working-memory budget."""
    if device.type == "cpu":
        return max(1, min(n, CPU_CHUNK_ROWS))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = max(budget, free // 4)  # a quarter of what is free: the caller's tensors stay
    return max(1, min(n, budget // (_BYTES_PER_SCORE * max(n, 1))))


def column_block(device: torch.device) -> int | None:
    """Gallery rows scored at a time on ``device`` (None: all of them, one matrix per chunk)."""
    return CPU_COLUMN_BLOCK if device.type == "cpu" else None


def normalized_rows(emb: np.ndarray) -> np.ndarray:
    """Float32 rows scaled to unit L2 norm in float64 (rows of 1e20 or 1e-30 keep their direction; zero
    rows stay zero, with a warning); NaN or inf is a ValueError."""
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or inf values")
    x = emb.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    warn_zero_rows(int((norms == 0).sum()))
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def warn_zero_rows(n: int) -> None:
    if n:
        warnings.warn(
            f"{n} embedding row(s) are all zero: they have no direction, so every item ties with them "
            "(a collapsed model?); Recall@K counts them by index order",
            RuntimeWarning,
            stacklevel=3,
        )


def _on_device(emb: np.ndarray, device: torch.device, normalize: bool) -> torch.Tensor:
    """``emb`` on ``device``; ``normalize``: finiteness checked and rows scaled to unit norm there (as
    :func:`normalized_rows` does on the host)."""
    x = torch.from_numpy(emb).to(device)
    if normalize:
        if not bool(torch.isfinite(x).all()):  # one read per evaluation
            raise ValueError("embeddings contain NaN or inf values")
        # scaled by the largest entry first: a row of 1e20 would overflow float32's norm, one of 1e-30 fall
        # under the clamp
        scale = x.abs().amax(dim=1, keepdim=True)
        warn_zero_rows(int((scale == 0).sum()))  # one read per evaluation
        x = x / torch.where(scale > 0, scale, torch.ones_like(scale))
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x


def _chunked_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    chunk_size: int | None,
    rows: torch.Tensor | None = None,
) -> np.ndarray:
    """:func:`exact_topk` of each query row i of ``rows`` (all by default) against ``gallery`` without
    its row i, in chunks (sized by :func:`auto_chunk_rows`, scored in the device's :func:`column_block`)."""
    device = queries.device
    n = queries.shape[0] if rows is None else len(rows)
    chunk = chunk_size or auto_chunk_rows(gallery.shape[0], device)
    out = torch.empty((n, k), dtype=torch.int64, device=device)
    with ieee_float32_matmul(device):
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            own = torch.arange(start, stop, device=device) if rows is None else rows[start:stop]
            q = queries[start:stop] if rows is None else queries[own]
            out[start:stop] = exact_topk(q, gallery, own, k, column_block(device))
    return out.cpu().numpy()


@contextlib.contextmanager
def ieee_float32_matmul(device: torch.device):
    """Float32 matmuls on ``device`` computed in float32 while the block runs, whatever precision the
    process chose for training speed: TF32 on CUDA (``torch.set_float32_matmul_precision("high")``,
    which torch and Lightning suggest on Ampere and later) keeps 10 mantissa bits, and the scores of an
    exact kNN would then order near-ties differently from FAISS's float32. The setting is restored
    after, through the API torch reads first (``fp32_precision``), so a process that set it either way
    reads back what it set."""
    backend = {"cuda": torch.backends.cuda.matmul, "cpu": getattr(torch.backends.mkldnn, "matmul", None)}.get(
        device.type
    )
    if hasattr(backend, "fp32_precision"):
        name, ieee = "fp32_precision", "ieee"
    elif device.type == "cuda":  # torch < 2.9: the one flag there (and no reduced precision on the CPU)
        name, ieee = "allow_tf32", False
    else:
        yield
        return
    before = getattr(backend, name)
    setattr(backend, name, ieee)
    try:
        yield
    finally:
        setattr(backend, name, before)


def torch_neighbours(
    emb: np.ndarray, k: int, device: torch.device, chunk_size: int | None = None, normalize: bool = False
) -> np.ndarray:
    """The torch kernel of a set against itself; ``normalize`` as in :func:`_on_device`."""
    x = _on_device(emb, device, normalize)
    return _chunked_topk(x, x, k, chunk_size)


def torch_cross_neighbours(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    device: torch.device,
    chunk_size: int | None = None,
    normalize: bool = True,
) -> np.ndarray:
    """Row i of ``queries`` against every row of ``gallery`` except row i (the same item embedded by
    another model), L2-normalised on ``device`` unless ``normalize=False``; same ordering and tie rule as
    :func:`torch_neighbours`."""
    return _chunked_topk(
        _on_device(queries, device, normalize), _on_device(gallery, device, normalize), k, chunk_size
    )


def make_index(dim: int, use_gpu: bool | None = None):
    """An exact inner-product FAISS index: on GPU when faiss has GPUs (and ``use_gpu`` is not False)."""
    global _GPU_RESOURCES
    index = faiss.IndexFlatIP(dim)
    if use_gpu and not faiss_has_gpu():
        raise RuntimeError(
            "use_gpu=True but this faiss build sees no GPU (use backend='torch', or install faiss-gpu)"
        )
    if faiss_has_gpu() and use_gpu is not False:
        if _GPU_RESOURCES is None:
            _GPU_RESOURCES = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)
    return index


def faiss_neighbours(
    emb: np.ndarray, k: int, chunk_size: int | None = None, use_gpu: bool | None = None
) -> np.ndarray:
    n = emb.shape[0]
    index = make_index(emb.shape[1], use_gpu)
    index.add(emb)
    chunk = chunk_size or 8192
    out = np.empty((n, k), dtype=np.int64)
    start, tie_heavy = 0, False
    while start < n:
        # a first, small chunk tells whether this data is tie-heavy before FAISS searches much of it
        stop = min(start + (chunk if start or chunk_size else min(chunk, 1024)), n)
        if tie_heavy:  # FAISS's lists would be discarded row by row: go straight to the exact kernel
            out[start:stop] = _exact_rows(emb, np.arange(start, stop), k)
        else:
            out[start:stop], tied = _faiss_chunk(index, emb, start, stop, k)
            tie_heavy = tied > (stop - start) // 2
        start = stop
    return out


def _exact_rows(emb: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The torch kernel on the CPU for ``rows`` of ``emb`` against all of it (FAISS's stand-in: small
    blocks, as FAISS's own search)."""
    x = torch.from_numpy(emb)
    return _chunked_topk(x, x, k, None, torch.from_numpy(np.asarray(rows, dtype=np.int64)))


def _faiss_chunk(index, emb: np.ndarray, start: int, stop: int, k: int) -> np.ndarray:
    n = emb.shape[0]
    width = min(k + 2, n)  # k others + possibly self + one past: tells whether the k-th score's tie continues
    scores, idx = index.search(emb[start:stop], width)
    own = np.arange(start, stop)[:, None]
    scores = np.where(idx == own, -np.inf, scores)  # self excluded by index
    order = np.lexsort((idx, -scores), axis=-1)
    idx = np.take_along_axis(idx, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    result = idx[:, :k].copy()
    if width > k:
        # scores[:, k] is the (k+1)-th other item whether or not self came back among the `width`
        open_tie = scores[:, k] == scores[:, k - 1]
    else:
        open_tie = np.zeros(stop - start, dtype=bool)
    rows = np.flatnonzero(open_tie)
    if len(rows):  # finish the tied rows exactly
        result[rows] = _exact_rows(emb, start + rows, k)
    return result, len(rows)
