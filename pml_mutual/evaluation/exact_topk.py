"""The exact top-k kernel of :mod:`pml_mutual.evaluation.knn` on torch: each query's k best gallery rows
other than itself, ordered by (score descending, index ascending), in blocks of gallery rows, with the
ties at the k-th score settled by index on the scores themselves."""

from __future__ import annotations

import torch


def exact_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    self_index: torch.Tensor,
    k: int,
    column_block: int | None = None,
) -> torch.Tensor:
    """Indices (c, k) of each query's k best gallery rows other than ``self_index``, ordered by
    (score desc, index asc). ``queries`` (c, D) and ``gallery`` (N, D) on one device; k ≤ N − 1.

    ``column_block``: gallery rows scored at a time (None: all N in one matrix, the GPU's shape). On the
    CPU one chunk × N matrix per chunk costs a fresh allocation and cache misses that small blocks
    reused in place do not (see ``pml_mutual.evaluation.knn.CPU_COLUMN_BLOCK``); each block's top k + 1
    are merged into the running top k + 1, which holds the same scores as one top-k over the whole row."""
    n = gallery.shape[0]
    width = min(k + 1, n)  # one past k tells whether the k-th score's tie continues beyond k
    scores = _ScoreBlocks(queries, gallery, self_index, column_block)
    values = idx = None
    for start, block in scores.blocks():
        v, i = block.topk(min(width, block.shape[1]), dim=1)
        i = i + start
        if values is not None:
            v, i = torch.cat([values, v], 1), torch.cat([idx, i], 1)
            v, pos = v.topk(min(width, v.shape[1]), dim=1)
            i = i.gather(1, pos)
        values, idx = v, i
    # Any item scored above the k-th score is in every top-k list, whatever the blocks; items tied at it
    # are chosen by topk arbitrarily: when the tie continues past k, the lowest indices tied there replace
    # them.
    idx = idx[:, :k]
    if width > k:
        open_tie = values[:, k - 1] == values[:, k]
        if bool(open_tie.any()):  # one host sync per chunk: evaluation, not a training step
            r = open_tie.nonzero().squeeze(1)
            kth = values[r, k - 1 : k]
            n_above = (values[r, :k] > kth).sum(1, keepdim=True)
            tied_first = _lowest_tied(scores, r, kth, k)
            j = torch.arange(k, device=idx.device)
            from_tie = tied_first.gather(1, (j - n_above).clamp(min=0))
            idx = idx.clone()
            idx[r] = torch.where(j < n_above, idx[r], from_tie)  # topk puts the items above the tie first
    values = values[:, :k]  # sorted: the tied positions already hold the k-th score
    idx, by_index = idx.sort(dim=1)
    order = values.gather(1, by_index).argsort(dim=1, descending=True, stable=True)
    return idx.gather(1, order)


class _ScoreBlocks:
    """Inner products of ``queries`` with blocks of ``column_block`` gallery rows, each query's own row
    (``self_index``) at −inf. One block of all N is kept for the tie scan; smaller blocks are computed
    into one reused buffer (also the tie scan's: its blocks are recomputed there), so a collapsed model's
    tie scan allocates no score matrix of its own on the CPU."""

    def __init__(
        self, queries: torch.Tensor, gallery: torch.Tensor, self_index: torch.Tensor, column_block: int | None
    ):
        self.queries, self.gallery, self.self_index = queries, gallery, self_index
        self.n = gallery.shape[0]
        self.block = self.n if column_block is None else max(1, min(int(column_block), self.n))
        self.whole: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None

    def compute(self, start: int, stop: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of ``rows`` (all queries by default) against gallery rows ``start:stop`` (at most one
        block): a view of the whole matrix, a copy of its rows, or the reused buffer, which the next call
        overwrites; the tie scan may write into what it gets with ``rows``."""
        if self.whole is not None:  # self already at −inf; with rows, a copy
            return self.whole[:, start:stop] if rows is None else self.whole[rows, start:stop]
        q = self.queries if rows is None else self.queries[rows]
        own = (self.self_index if rows is None else self.self_index[rows]) - start
        if self._buffer is None:  # sized for the widest block of all queries: every later call fits
            self._buffer = torch.empty(len(self.queries) * self.block, dtype=q.dtype, device=q.device)
        out = self._buffer[: len(q) * (stop - start)].view(len(q), stop - start)
        s = torch.matmul(q, self.gallery[start:stop].T, out=out)
        inside = (own >= 0) & (own < stop - start)
        at = own.clamp(0, stop - start - 1).unsqueeze(1)
        s.scatter_(1, at, torch.where(inside.unsqueeze(1), float("-inf"), s.gather(1, at)))
        return s

    def blocks(self):
        """(start, scores) of every block of columns, in order, for all queries."""
        if self.block == self.n:
            self.whole = self.compute(0, self.n)
            yield 0, self.whole
            return
        for start in range(0, self.n, self.block):
            yield start, self.compute(start, min(start + self.block, self.n))


def _lowest_tied(
    scores: _ScoreBlocks, rows: torch.Tensor, kth: torch.Tensor, k: int, first: int = 1024
) -> torch.Tensor:
    """The k lowest column indices, per row of ``rows``, whose score equals ``kth`` (len(rows), 1): columns
    scanned in order, a row leaving the scan once it has k. Heavy ties (a collapsed model: every item
    ties) are settled on the first ``first`` columns; other rows go on through the rest (all of it at
    once for a whole score matrix, else block by block)."""
    n = scores.n
    # a block of columns at most: it fits the buffer
    first = min(n if n <= 2 * first else first, scores.block)
    best = torch.full((len(rows), k), float("-inf"), device=kth.device)  # −index of the tied items found
    minus_inf = torch.full((), float("-inf"), device=kth.device)  # made on the device: no host copy per block
    found = torch.zeros(len(rows), dtype=torch.int64, device=kth.device)
    active = torch.arange(len(rows), device=kth.device)
    start, stop = 0, first
    while True:
        cols = scores.compute(start, stop, rows[active])
        tied = cols == kth[active]
        neg_index = -torch.arange(start, stop, device=cols.device, dtype=torch.float32)
        cand = torch.where(tied, neg_index, minus_inf, out=cols).topk(min(k, stop - start), dim=1).values
        best[active] = torch.cat([best[active], cand], 1).topk(k, dim=1).values
        found[active] += tied.sum(1)
        if stop == n:
            break
        active = active[found[active] < k]
        if len(active) == 0:
            break
        start, stop = stop, (n if scores.block == n else min(stop + scores.block, n))
    return (-best).clamp(max=n - 1).to(torch.int64)  # −inf: fewer ties than k, positions never read
