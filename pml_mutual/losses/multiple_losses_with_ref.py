"""PML's ``MultipleLosses`` that passes the other network's embeddings to the distillation losses."""

from __future__ import annotations

from pytorch_metric_learning.losses import MultipleLosses

from .gram import PairedGramLoss


class MultipleLossesWithRef(MultipleLosses):
    """``MultipleLosses([TripletMarginLoss(), GramCorrelationLoss()], weights=[1, 10])``, callable as
    ``loss(embeddings, labels, indices_tuple, ref_emb=teacher_embeddings)``.

    ``ref_emb`` goes to the Gram losses (:class:`~pml_mutual.GramCorrelationLoss`,
    :class:`~pml_mutual.MutualGramLoss`) only, as the other network's embeddings of the same batch; the
    metric losses get ``embeddings, labels, indices_tuple`` as in PML's ``MultipleLosses`` (for them PML's
    ``ref_emb`` would mean another set to compare against, which is not what the teacher's rows are). A
    miner given for a Gram loss is refused: they compare whole batches.
    """

    def __init__(self, losses, miners=None, weights=None):
        super().__init__(losses, miners=miners, weights=weights)
        for i, loss in self._items():
            if isinstance(loss, PairedGramLoss) and self.miners is not None and self._miner_of(i) is not None:
                raise ValueError(
                    f"loss {i!r} ({type(loss).__name__}) compares whole batches: give it no miner"
                )

    def _items(self):
        return self.losses.items() if self.is_dict else enumerate(self.losses)

    def _miner_of(self, i):
        if self.is_dict:
            return self.miners[i] if i in self.miners else None
        return self.miners[i]

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if ref_labels is not None:
            raise ValueError(
                "MultipleLossesWithRef takes no ref_labels: ref_emb is the other network's embeddings "
                "of the same batch, row for row"
            )
        if self.miners:
            assert indices_tuple is None
        total = 0
        for i, loss in self._items():
            if isinstance(loss, PairedGramLoss):
                value = loss(embeddings, labels, ref_emb=ref_emb)
            else:
                value = loss(embeddings, labels, self.get_indices_tuple(i, embeddings, labels, indices_tuple))
            total = total + value * self.weights[i]
        return total
