"""Per-stage retrieval evaluation: old / new / all classes and each earlier stage (paper Tables 2–3)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .recall import _to_numpy, check_ks, cross_recall_at_k, recall_at_k


@torch.no_grad()
def extract_embeddings(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    dataset: Dataset | DataLoader,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    amp: bool = False,
    num_workers: int = 0,
) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
    """Embed a ``(x, label)`` dataset in eval mode without gradients; returns float32 CPU (N, D) and (N,).

    ``model`` may be a list of models: each batch is then decoded once and embedded by every one of
    them, and the first value returned is the list of their embeddings (drift measurement embeds the
    same images with the new and an old model). ``dataset`` may be a ready DataLoader (e.g. an
    :class:`~pml_mutual.data.loaders.EmbeddingLoader`'s, whose workers persist between calls);
    ``num_workers`` then does not apply. The model embeds ``batch_size`` items at a time (default 256,
    or a given loader's batches as they come): consecutive loader batches are joined on the device and
    cut into model batches of exactly that size, so a loader with small worker tasks gives the model the
    same batches as one loader batch per model batch. The models' train/eval modes are restored
    afterwards. ``amp`` runs the forward under autocast (bfloat16, or float16 on a GPU without
    bfloat16); the embeddings are returned in float32 either way. Batches are copied to the device
    without blocking and the embeddings gathered there: one copy back at the end.
    """
    models = [model] if isinstance(model, torch.nn.Module) else list(model)
    loader = dataset
    if not isinstance(loader, DataLoader):
        loader = DataLoader(dataset, batch_size=batch_size or 256, shuffle=False, num_workers=num_workers)
    if len(loader.dataset) == 0 or len(loader) == 0:
        raise ValueError("cannot extract embeddings of an empty dataset")
    device = torch.device(device) if device is not None else next(models[0].parameters()).device
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    chunks, labels = [[] for _ in models], []

    def embed(x):
        for m, out in zip(models, chunks):
            with torch.autocast(device.type, enabled=amp, dtype=autocast_dtype(device)):
                out.append(m(x).float())

    try:
        pending, n_pending = [], 0  # loader batches on the device, not yet embedded
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            labels.append(torch.as_tensor(y))
            if batch_size is None:
                embed(x)
                continue
            pending.append(x)
            n_pending += len(x)
            while n_pending >= batch_size:
                joined = pending[0] if len(pending) == 1 else torch.cat(pending)
                embed(joined[:batch_size])
                pending = [joined[batch_size:]] if n_pending > batch_size else []
                n_pending -= batch_size
        if pending:
            embed(pending[0] if len(pending) == 1 else torch.cat(pending))
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    embeddings = [torch.cat(c).cpu() for c in chunks]
    return (embeddings[0] if isinstance(model, torch.nn.Module) else embeddings), torch.cat(
        labels
    ).cpu().long()


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 (no loss scaling needed) on CPU and on GPUs that have it; float16 on older GPUs."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _recall_on(emb, lab, mask, ks, backend):
    if not mask.any():
        return None
    return recall_at_k(emb[mask], lab[mask], ks, backend=backend)


def _by_stage(item_stage: np.ndarray, stage: int, recall_on, last: int) -> dict:
    """The per-stage layout of a stage's results: ``recall_on(mask)`` on old / new / all seen classes and
    on each stage's classes; ``last``: the last stage of the class → stage map."""
    if (
        isinstance(stage, (bool, np.bool_))
        or not isinstance(stage, (int, np.integer))
        or not 0 <= stage <= last
    ):
        raise ValueError(
            f"stage must be an integer of the class → stage map's stages (0–{last}), got {stage!r}"
        )
    return {
        "stage": int(stage),
        "old": recall_on(item_stage < stage),
        "new": recall_on(item_stage == stage),
        "all": recall_on(item_stage <= stage),
        "per_stage": [recall_on(item_stage == j) for j in range(stage + 1)],
    }


def _item_stages(lab: np.ndarray, class_to_stage: Mapping[int, int]) -> np.ndarray:
    unknown = set(np.unique(lab).tolist()) - set(class_to_stage)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)[:10]} have no stage in class_to_stage")
    return np.array([class_to_stage[int(c)] for c in lab], dtype=np.int64)


def stage_recalls(
    embeddings,
    labels,
    class_to_stage: Mapping[int, int],
    stage: int,
    ks: Sequence[int] = (1, 2, 4, 8),
    backend: str = "auto",
) -> dict:
    """Recall@K after ``stage`` on: old classes (earlier stages), new classes (this stage), all classes
    seen so far, and each stage's classes (``per_stage[j]``). Test items of later stages are ignored.

    Each subset is its own query = gallery set, as in the paper. Missing subsets (no old classes at
    stage 0) are ``None``. ``backend`` is the kNN search's (see :func:`~pml_mutual.evaluation.recall_at_k`).
    """
    ks = check_ks(ks)
    emb = _to_numpy(embeddings, "embeddings")
    lab = _to_numpy(labels, "labels")
    return _by_stage(
        _item_stages(lab, class_to_stage),
        stage,
        lambda mask: _recall_on(emb, lab, mask, ks, backend),
        max(class_to_stage.values()),
    )


def cross_stage_recalls(
    queries, gallery, labels, class_to_stage: Mapping[int, int], stage: int, ks: Sequence[int] = (1, 2, 4, 8)
) -> dict:
    """:func:`stage_recalls` across two embeddings of the same items: row i of ``queries`` (e.g. the latest
    model's) searches ``gallery`` (e.g. a stored gallery embedded by older models), its own row excluded
    (:func:`~pml_mutual.evaluation.cross_recall_at_k`); old / new / all classes and each stage's, each
    subset its own query and gallery set. ``gallery is queries`` gives :func:`stage_recalls`' numbers."""
    ks = check_ks(ks)
    q = _to_numpy(queries, "queries")
    g = _to_numpy(gallery, "gallery")
    lab = _to_numpy(labels, "labels")

    def on(mask):
        return cross_recall_at_k(q[mask], g[mask], lab[mask], ks) if mask.any() else None

    return _by_stage(_item_stages(lab, class_to_stage), stage, on, max(class_to_stage.values()))
