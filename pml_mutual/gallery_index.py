"""A stored gallery moved into the latest model's space as an index operation, without images or old
models: the vectors of a FAISS ``IndexIDMap`` over a flat index, or of an embedding array, are replaced by
:meth:`~pml_mutual.DriftCompensator.update_gallery` of their stage, batch by batch, on a device."""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np
import torch

from .drift import DriftCompensator


def update_index(
    target,
    stages,
    compensator: DriftCompensator,
    method: str = "learned",
    batch_size: int = 65_536,
    device=None,
) -> dict:
    """Move every stored vector of ``target`` from the space of the model of its stage to the latest one's.

    ``target``: a ``faiss.IndexIDMap`` whose inner index is flat (``IndexFlatIP`` / ``IndexFlatL2``), or a
    float32 ``numpy`` array / torch tensor (N, D), updated in place. ``stages``: each vector's stage — an
    array aligned with the rows (arrays) or with the index's insertion order, or a mapping id → stage
    (FAISS ids). ``method``: ``"learned"`` (the forward maps) or ``"translation"`` (Eq. 4 forward).
    Vectors of the latest stage are left as they are. Returns ``{"seconds", "moved", "peak_batch_bytes"}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    vectors, write_back, ids = _vectors_of(target)
    stage_of = _stage_array(stages, ids, len(vectors))
    device = torch.device(device) if device is not None else torch.device("cpu")
    t0 = time.perf_counter()
    moved, peak = 0, 0
    latest = compensator.num_stages - 1
    for stage in np.unique(stage_of):
        if stage == latest:
            continue
        rows = np.flatnonzero(stage_of == stage)
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            batch = torch.as_tensor(vectors[part], device=device)
            new = compensator.update_gallery(batch, int(stage), method=method)
            vectors[part] = new.to("cpu", torch.float32).numpy()
            peak = max(peak, 2 * batch.numel() * batch.element_size())  # the batch and its moved copy
            moved += len(part)
    write_back(vectors)
    return {"seconds": time.perf_counter() - t0, "moved": moved, "peak_batch_bytes": peak}


def _vectors_of(target):
    """(a float32 (N, D) numpy array to update, a function storing it back, the FAISS ids or None)."""
    if isinstance(target, np.ndarray):
        if target.dtype != np.float32 or target.ndim != 2:
            raise TypeError(f"an embedding array must be float32 (N, D), got {target.dtype} {target.shape}")
        return target, lambda v: None, None  # updated in place already
    if torch.is_tensor(target):
        if target.dtype != torch.float32 or target.ndim != 2:
            raise TypeError(
                f"an embedding tensor must be float32 (N, D), got {target.dtype} {tuple(target.shape)}"
            )
        array = target.detach().cpu().numpy().copy()
        return array, lambda v: target.copy_(torch.from_numpy(v)), None
    import faiss

    if not isinstance(target, faiss.IndexIDMap):
        raise TypeError(
            f"target must be a faiss.IndexIDMap, a numpy array or a torch tensor, got {type(target).__name__}"
        )
    inner = faiss.downcast_index(target.index)
    if not isinstance(inner, faiss.IndexFlat):
        raise TypeError(
            f"only an IndexIDMap over a flat index can be updated in place, got {type(inner).__name__}"
        )
    n, d = inner.ntotal, inner.d
    vectors = faiss.vector_to_array(inner.codes).view(np.float32).reshape(n, d).copy()
    ids = faiss.vector_to_array(target.id_map)
    return (
        vectors,
        lambda v: faiss.copy_array_to_vector(np.ascontiguousarray(v).ravel().view(np.uint8), inner.codes),
        ids,
    )


def _stage_array(stages, ids, n: int) -> np.ndarray:
    if isinstance(stages, Mapping):
        if ids is None:
            raise TypeError(
                "a mapping id → stage needs a FAISS index (its ids); give an array aligned with the rows"
            )
        missing = [int(i) for i in ids if int(i) not in stages]
        if missing:
            raise ValueError(f"ids {missing[:5]} of the index have no stage in the mapping")
        return np.array([int(stages[int(i)]) for i in ids], dtype=np.int64)
    stage_of = np.asarray(stages if not isinstance(stages, Sequence) or len(stages) else [], dtype=np.int64)
    if stage_of.shape != (n,):
        raise ValueError(f"stages must give one stage per stored vector ({n}), got shape {stage_of.shape}")
    return stage_of
