"""Shared pieces of the Gram-matrix distillation losses (paper Eq. 1, 2, 5).

Both losses compare row-softmaxed similarity (Gram) matrices of one batch seen by two networks.
Everything here runs with autocast disabled: G in float32, the softmax of G / T and the KL in float64.
For a cosine Gram σ(G / T) is close to uniform, so each row's KL is a second-order difference of logs
near log B: in float32 the rounding of log B (≈ 5e-7) swamps it as T grows (0.4 % off at T = 10, 4.5 %
at T = 30, a factor of 7 at T = 500, measured on B = 80, D = 512); in float64 it is exact to ~1e-9
relative up to T = 1000. The B × B matrices are small: the cost is in the launches, not the arithmetic.
Rows are scaled by their largest entry before normalising (the cosine does not change), so rows of
1e19 or 1e-13 do not overflow or fall under the normalisation's epsilon.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import MeanReducer, MultipleReducers

from ..checks import check_embeddings


def check_pair(embeddings: torch.Tensor, ref_emb: torch.Tensor | None, ref_name: str = "ref_emb") -> None:
    if ref_emb is None:
        raise ValueError(
            f"{ref_name} is required: pass the other network's embeddings of the same batch "
            "(loss(emb, ref_emb=other_emb); inside a combination of losses use "
            "pml_mutual.losses.MultipleLossesWithRef, in a PML trainer pml_mutual.trainers.TeacherMixin)"
        )
    check_embeddings(embeddings, "embeddings")
    check_embeddings(ref_emb, ref_name)
    if ref_emb.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"embeddings and {ref_name} must describe the same batch: got {embeddings.shape[0]} and "
            f"{ref_emb.shape[0]} rows"
        )


MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1000.0


def check_temperature(temperature: float) -> float:
    """T in [0.001, 1000] (numpy scalars accepted). Beyond 1000 σ(G / T) is uniform to float32 resolution of G
    itself; below 0.001 the T² factor scales every loss to 1e-6 of its size and the softmax is one-hot."""
    if (
        isinstance(temperature, (bool, np.bool_))
        or not isinstance(temperature, (int, float, np.integer, np.floating))
        or not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE
    ):
        raise ValueError(
            f"temperature must be a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {temperature!r}"
        )
    return float(temperature)


def rescale_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with each row (along the last dimension) divided by its largest absolute entry (detached; zero
    rows kept): the same directions, norms near 1, so that a normalisation neither overflows (rows of 1e19)
    nor falls under its epsilon (rows of 1e-13). The gradient of a scale-invariant loss is unchanged."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True)
    return x / torch.where(scale > 0, scale, torch.ones_like(scale))


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def log_softmax_gram(embeddings: torch.Tensor, distance: BaseDistance, temperature: float) -> torch.Tensor:
    """log σ_T(G): the row log-softmax of the batch's similarity matrix divided by T; G in float32, the
    log-softmax in float64 (see the module docstring).

    G keeps its diagonal (as FECD and the authors' code do). A distance that is not a similarity
    (e.g. ``LpDistance``) is negated so that larger always means closer.
    """
    device_type = embeddings.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        x = embeddings.float()
        if distance.normalize_embeddings:  # a row's scale does not matter: keep the normalisation in range
            x = rescale_rows(x)
        gram = distance(x)
        if not distance.is_inverted:
            gram = -gram
        return F.log_softmax(gram.double() / temperature, dim=1)


def rowwise_kl(log_target: torch.Tensor, log_input: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ input) of each row, from log-probabilities; shape (B,). Exact zero when equal."""
    return F.kl_div(log_input, log_target, reduction="none", log_target=True).sum(dim=1)


class PairedGramLoss(BaseMetricLossFunction):
    """Base of the losses that compare the Gram matrices of two networks on one batch.

    Called as ``loss_fn(embeddings, ref_emb=other_embeddings)``; ``ref_emb`` is required and must
    have the same number of rows. Per-row KL values are "element" losses, reduced by default with
    ``MeanReducer`` (PyTorch's ``batchmean``). The default distance is cosine similarity.
    """

    ref_name = "ref_emb"

    def __init__(self, temperature: float = 4.0, **kwargs):
        kwargs.setdefault("distance", CosineSimilarity())
        super().__init__(**kwargs)
        self.temperature = check_temperature(temperature)
        self.add_to_recordable_attributes(list_of_names=["temperature"], is_stat=False)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """``labels`` are accepted (so PML's trainers and combinators may pass them) and do not change the
        value: the loss compares whole batches' Gram matrices, whatever their classes. A miner's
        ``indices_tuple`` and ``ref_labels`` have no meaning here and are refused."""
        if indices_tuple is not None:
            raise ValueError(
                f"{type(self).__name__} compares the whole batch's Gram matrices: a miner's indices_tuple "
                "has no meaning for it; call it without one (mine for the metric loss only)"
            )
        if ref_labels is not None:
            raise ValueError(
                f"{type(self).__name__} takes no ref_labels: ref_emb is the other network's embeddings of "
                "the same batch, row for row"
            )
        check_pair(embeddings, ref_emb, self.ref_name)
        # Cast up front: PML's reducers allocate the sub-loss vector in the embeddings' dtype.
        return super().forward(embeddings.float(), labels, indices_tuple, ref_emb.float(), ref_labels)

    def log_probs(self, embeddings: torch.Tensor) -> torch.Tensor:
        return log_softmax_gram(embeddings, self.distance, self.temperature)

    def get_default_reducer(self):
        return MeanReducer()

    def has_default_math(self) -> bool:
        """Cosine Gram (L2-normalised, power 1) and every sub-loss reduced by ``MeanReducer`` (summed
        over sub-losses, as PML's ``MultipleReducers`` does): what the stacked computation of
        :func:`~pml_mutual.losses.gram_distillation.gram_distillation_losses` reproduces."""
        distance, reducer = self.distance, self.reducer
        if type(reducer) is MultipleReducers:
            reducers = [
                reducer.reducers[k] if k in reducer.reducers else reducer.default_reducer
                for k in self.sub_loss_names()
            ]
        else:
            reducers = [reducer]
        # anything else the stacked form does not compute takes the plain calls: an embedding regulariser
        # (its sub-loss would be dropped), an unnormalised or powered distance, a changed forward
        return (
            all(type(r) is MeanReducer for r in reducers)
            and type(distance) is CosineSimilarity
            and (distance.p, distance.power, distance.normalize_embeddings) == (2, 1, True)
            and getattr(self, "embedding_regularizer", None) is None
            and type(self).forward is PairedGramLoss.forward
            and type(self).log_probs is PairedGramLoss.log_probs
        )
