import pytest
import torch
from helpers.host_reads import host_reads
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.miners import BatchHardMiner

from pml_mutual.losses import BatchHardTripletLoss


def pml_batch_hard(emb, labels, margin, distance=None):
    kw = {} if distance is None else {"distance": distance}
    miner, loss = BatchHardMiner(**kw), TripletMarginLoss(margin=margin, **kw)
    return loss(emb, labels, miner(emb, labels))


batches = st.tuples(
    st.integers(0, 2**31 - 1),  # embeddings' seed: continuous values, no ties
    st.lists(st.integers(0, 5), min_size=2, max_size=24),  # labels: singletons, one class, many classes
    st.sampled_from([0.0, 0.05, 0.2, 1.0]),
    st.sampled_from(["l2", "l2_unnormalized", "cosine"]),
)


def distance_of(name):
    return {
        "l2": None,
        "l2_unnormalized": LpDistance(normalize_embeddings=False),
        "cosine": CosineSimilarity(),
    }[name]


@settings(max_examples=150, deadline=None)
@given(batches)
def test_equals_pml_triplet_margin_loss_on_batch_hard_miner_triplets(batch):
    seed, labels, margin, dist = batch
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(labels)
    x = torch.randn(len(labels), 8, generator=g, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = BatchHardTripletLoss(
        margin=margin, **({} if distance_of(dist) is None else {"distance": distance_of(dist)})
    )(x1, labels)
    theirs = pml_batch_hard(x2, labels, margin, distance_of(dist))
    # float64: the same few terms summed in another order
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12, abs=1e-15)
    (ours + 0 * x1.sum()).backward()
    (theirs + 0 * x2.sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-14)


def test_no_anchor_with_a_positive_and_a_negative_gives_zero_with_a_gradient_path():
    x = torch.randn(4, 8, requires_grad=True)
    for labels in (torch.arange(4), torch.zeros(4, dtype=torch.long)):  # all singletons; one class
        loss = BatchHardTripletLoss()(x, labels)
        assert loss.item() == 0.0 and pml_batch_hard(x, labels, 0.05).item() == 0.0
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_reads_nothing_back_to_the_host_while_pml_pair_does():
    """On a GPU a host read is a synchronisation: the pair PML composes needs several per call."""
    labels = torch.arange(4).repeat_interleave(4)
    x = torch.randn(16, 8, requires_grad=True)
    assert host_reads(lambda: BatchHardTripletLoss(margin=0.1)(x, labels).backward()) == []
    assert len(host_reads(lambda: pml_batch_hard(x, labels, 0.1).backward())) >= 3


def test_refuses_mined_triplets_and_missing_labels():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="without a miner"):
        BatchHardTripletLoss()(
            x, torch.tensor([0, 0, 1, 1]), (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
        )
    with pytest.raises(ValueError, match="labels"):
        BatchHardTripletLoss()(x)


def test_a_nan_embedding_makes_the_loss_nan():
    """So the trainer's finiteness check stops the step before NaN gradients reach the weights."""
    x = torch.randn(8, 4)
    x[5] = float("nan")
    assert torch.isnan(BatchHardTripletLoss()(x, torch.arange(4).repeat(2)))
