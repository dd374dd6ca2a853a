"""An epoch's loss terms kept on their device, and the error a non-finite term raises."""

from __future__ import annotations

import torch


class LossLog:
    """An epoch's loss terms, kept on their device: per term, the sum and the first iteration at which it
    was not finite. The tensor terms of a step are stacked into one vector, so a step adds a fixed
    handful of ops (kernel launches on a GPU) however many terms there are, and nothing is read back
    until :meth:`sums` or :meth:`first_not_finite` (one read each). Sums accumulate in the terms' own
    order and float32, as adding each term to its own sum would."""

    def __init__(self):
        self._groups: dict[tuple[str, ...], list] = {}  # names of a step's tensor terms → [sums, first bad]
        self._plain: dict[str, float] = {}  # terms that were not tensors (PML's 0 before a term is computed)

    def add(self, losses: dict, iteration: int) -> None:
        names = tuple(k for k, v in losses.items() if torch.is_tensor(v))
        for k, v in losses.items():
            if not torch.is_tensor(v):
                self._plain[k] = self._plain.get(k, 0.0) + float(v)
        if not names:
            return
        values = torch.stack([losses[k].detach().reshape(()).float() for k in names])
        # x − x is 0 for finite x and NaN for NaN and ±inf: 2 ops, where torch.isfinite dispatches 4
        bad = (values - values) != 0
        group = self._groups.get(names)
        if group is None:
            self._groups[names] = [values, torch.where(bad, iteration, -1)]
            return
        sums, first_bad = group
        group[0] = sums + values
        group[1] = torch.where(bad & (first_bad < 0), iteration, first_bad)

    def sums(self) -> dict[str, float]:
        out = dict(self._plain)
        for names, (sums, _) in self._groups.items():
            for k, v in zip(names, sums.tolist()):  # one read per group of terms (one group in practice)
                out[k] = out.get(k, 0.0) + v
        return out

    def first_not_finite(self) -> dict[str, int]:
        """Term → the first iteration at which it was NaN or inf, or −1."""
        out: dict[str, int] = {}
        for names, (_, first) in self._groups.items():
            for k, i in zip(names, first.tolist()):
                if i >= 0 and (out.get(k, -1) < 0 or i < out[k]):
                    out[k] = i
                else:
                    out.setdefault(k, -1)
        return out


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf during training."""
