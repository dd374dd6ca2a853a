"""Continual-learning summaries of an accuracy matrix R[i][j] = Recall@1 on stage j's classes after stage
i."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _square(matrix: Sequence[Sequence[float | None]]) -> np.ndarray:
    R = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square and non-empty, got shape {R.shape}")
    if np.isnan(R[np.tril_indices(len(R))]).any():
        raise ValueError("the accuracy matrix has a missing entry on or below the diagonal")
    return R


def accuracy_matrix(stage_results: Sequence[dict], k: int = 1) -> list[list[float | None]]:
    """R[i][j] from the per-stage results of :func:`stage_recalls` (None above the diagonal)."""
    n = len(stage_results)
    R: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i, res in enumerate(stage_results):
        for j, rec in enumerate(res["per_stage"]):
            R[i][j] = None if rec is None else rec[k]
    return R


def average_forgetting(matrix) -> float:
    """Mean over earlier stages j < T of max_{i<T} R[i][j] − R[T][j] (Chaudhry et al. 2018); 0 for one
    stage."""
    R = _square(matrix)
    T = len(R) - 1
    if T == 0:
        return 0.0
    return float(np.mean([np.max(R[j:T, j]) - R[T, j] for j in range(T)]))


def backward_transfer(matrix) -> float:
    """Mean over earlier stages j < T of R[T][j] − R[j][j] (Lopez-Paz & Ranzato 2017); 0 for one stage."""
    R = _square(matrix)
    T = len(R) - 1
    if T == 0:
        return 0.0
    return float(np.mean([R[T, j] - R[j, j] for j in range(T)]))
