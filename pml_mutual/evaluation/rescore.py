"""One ranking whatever the search backend: candidates re-scored in float64, ties by index, certified.

FAISS and the torch kernel score in float32, each summing in its own order, so two neighbours whose
similarities differ by less than float32 rounding can come out in either order, and on near-collapsed or
near-duplicate data the two backends disagree (160 and 287 of 3,000 rows on quantised and near-duplicate
data). :func:`certified_neighbours` takes each backend's ``k + margin`` float32 candidates, re-scores them
in float64 and orders them by (score, index). A row is *certified* when no item outside its candidates
can reach its k-th float64 score: every such item scored at most the lowest candidate in float32, so at
most ``lowest candidate's float64 score + 2·error`` in float64, with the float32 dot-product error bound
``γ_D · |q| · max|g|`` (γ_D = D·u / (1 − D·u), u = 2⁻²⁴; γ_D + u for normalised rows). Rows that cannot be
certified (near-collapsed data) are searched again exactly in float64. The result is the float64 ranking
with ties by index, so both backends return the same neighbours.
"""

from __future__ import annotations

import numpy as np
import torch

MARGIN = 8  # extra float32 candidates per row: trained embeddings certify with them; collapsed ones do not
_U = 2.0**-24


def float32_dot_error(dim: int) -> float:
    """γ_D for a float32 dot product of length ``dim`` (relative to |q|·|g|), plus the normalisation's u."""
    return dim * _U / (1 - dim * _U) + 4 * _U


@torch.no_grad()
def certified_neighbours(
    emb: np.ndarray, candidates: np.ndarray, k: int, normalize: bool, device, chunk_rows: int = 1024
) -> np.ndarray:
    """(N, k) neighbours in float64 order, ties by lower index, from (N, k') float32 ``candidates`` (k' ≥ k,
    self
    excluded); rows that the candidates cannot certify are searched exactly in float64."""
    n = emb.shape[0]
    device = torch.device(device) if device is not None else torch.device("cpu")
    x = torch.from_numpy(emb).to(device, torch.float64)
    if normalize:
        norms = x.norm(dim=1, keepdim=True)
        x = x / torch.where(norms > 0, norms, torch.ones_like(norms))
    row_norms = x.norm(dim=1)
    err = float32_dot_error(x.shape[1]) * row_norms * row_norms.max()
    complete = candidates.shape[1] >= n - 1  # every other item is a candidate: nothing outside to fear
    cands = torch.from_numpy(np.ascontiguousarray(candidates)).to(device)
    out = torch.empty((n, k), dtype=torch.int64, device=device)
    uncertain = []
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        c = cands[rows]
        # elementwise products summed over D: each score a function of its two rows alone (a batched matmul
        # may sum a candidate's products in another order by its position, and split exact duplicates)
        scores = (x[rows][:, None, :] * x[c]).sum(dim=2)
        order = _by_score_then_index(scores, c)
        ranked_scores = torch.gather(scores, 1, order)
        out[rows] = torch.gather(c, 1, order[:, :k])
        if not complete:
            # an item outside the candidates scored ≤ the lowest candidate in float32: ≤ its float64 + 2·err
            reachable = ranked_scores[:, -1] + 2 * err[rows]
            bad = torch.nonzero(ranked_scores[:, k - 1] <= reachable).flatten() + start
            uncertain.append(bad)
    if uncertain:
        rows = torch.cat(uncertain)
        if len(rows):
            out[rows] = _exact_float64(x, rows, k)
    return out.cpu().numpy()


def _by_score_then_index(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Column order of each row: descending score, then ascending index (two stable sorts)."""
    by_index = torch.argsort(index, dim=1, stable=True)
    by_score = torch.argsort(-torch.gather(scores, 1, by_index), dim=1, stable=True)
    return torch.gather(by_index, 1, by_score)


def _exact_float64(x: torch.Tensor, rows: torch.Tensor, k: int, chunk_rows: int = 256) -> torch.Tensor:
    """The float64 ranking of ``rows`` against every other row, ties by index (a stable sort keeps index
    order).
    Scored against the distinct rows only and spread back, so that exact duplicates score exactly alike
    (a matrix product may round two equal columns differently)."""
    distinct, inverse = torch.unique(x, dim=0, return_inverse=True)
    out = []
    for start in range(0, len(rows), chunk_rows):
        r = rows[start : start + chunk_rows]
        scores = (x[r] @ distinct.T)[:, inverse]
        scores[torch.arange(len(r), device=x.device), r] = -torch.inf  # self excluded by index
        out.append(torch.argsort(-scores, dim=1, stable=True)[:, :k])
    return torch.cat(out)
