"""The Gram losses with PML's own parts: distances, reducers, regularisers, MultipleLosses, trainers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import distances, losses, miners, reducers, regularizers
from pytorch_metric_learning.trainers import MetricLossOnly
from torch.utils.data import TensorDataset

from pml_mutual import GramCorrelationLoss, MutualGramLoss
from pml_mutual.losses import MultipleLossesWithRef, gram_distillation_losses
from pml_mutual.trainers import MetricLossOnlyWithTeacher, TrainWithClassifierAndTeacher

EPS = torch.finfo(torch.float32).eps

DISTANCES = {
    "cosine": lambda: distances.CosineSimilarity(),
    "lp_unnormalised": lambda: distances.LpDistance(normalize_embeddings=False),
    "dot": lambda: distances.DotProductSimilarity(),
    "lp": lambda: distances.LpDistance(),
    "lp_squared": lambda: distances.LpDistance(power=2),
}
REDUCERS = {
    "mean": lambda: reducers.MeanReducer(),
    "sum": lambda: reducers.SumReducer(),
    "avg_nonzero": lambda: reducers.AvgNonZeroReducer(),
}
REGULARIZERS = {
    "none": lambda: None,
    "lp": lambda: regularizers.LpRegularizer(),
    "zero_mean": lambda: regularizers.ZeroMeanRegularizer(),
}


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(sorted(DISTANCES)),
    st.sampled_from(sorted(REDUCERS)),
    st.sampled_from(sorted(REGULARIZERS)),
    st.integers(2, 10),
    st.integers(1, 8),
    st.integers(0, 3),
    st.integers(0, 2**31 - 1),
)
def test_the_trainers_loss_values_and_gradients_equal_the_direct_calls(
    dist, red, reg, b, d, n_teachers, seed
):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, d, generator=g).requires_grad_()
    support = torch.randn(b, d, generator=g).requires_grad_()
    teachers = [torch.randn(b, d, generator=g) for _ in range(n_teachers)]
    make = lambda cls: cls(  # noqa: E731
        temperature=4.0,
        distance=DISTANCES[dist](),
        reducer=REDUCERS[red](),  # noqa: E731
        embedding_regularizer=REGULARIZERS[reg](),
    )
    corr, mutual = make(GramCorrelationLoss), make(MutualGramLoss)
    got = gram_distillation_losses(
        student, support, teachers or None, correlation_loss=corr, mutual_loss=mutual
    )
    want = {"mutual_loss": mutual(student, ref_emb=support)}
    if teachers:
        want["correlation_loss"] = sum(corr(student, ref_emb=t) for t in teachers)
    assert got.keys() == want.keys()
    # equal up to float32 summation order (the stacked form) or exactly (the calls)
    tol = 8 * EPS * (1 / 4 + math.log(b) + 1) * 16 * (n_teachers + 1)
    for k in want:
        assert abs(got[k].item() - want[k].item()) <= tol * max(1.0, abs(want[k].item())), k
    # allow_unused: AvgNonZeroReducer of all-zero losses is a constant
    grads = torch.autograd.grad(sum(got.values()), [student, support], allow_unused=True)
    expected = torch.autograd.grad(sum(want.values()), [student, support], allow_unused=True)
    for a, e, x in zip(grads, expected, (student, support)):
        a = torch.zeros_like(x) if a is None else a
        e = torch.zeros_like(x) if e is None else e
        assert (a - e).abs().max().item() <= tol / 4 / x.detach().norm(dim=1).min().item() * max(
            1.0, e.abs().max().item()
        )


def test_an_embedding_regulariser_is_not_dropped_by_the_stacked_path():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(20, 8, generator=g) * 3, torch.randn(20, 8, generator=g)
    corr = GramCorrelationLoss(embedding_regularizer=regularizers.LpRegularizer())
    assert not corr.fusable()
    got = gram_distillation_losses(student, teachers=[teacher], correlation_loss=corr)["correlation_loss"]
    assert got.item() == corr(student, ref_emb=teacher).item()  # on 0e3a6e5 the regulariser was dropped
    assert got.item() > GramCorrelationLoss()(student, ref_emb=teacher).item() + 1


def test_a_miners_indices_and_ref_labels_are_refused_and_labels_change_nothing():
    x, t = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    for loss in (GramCorrelationLoss(), MutualGramLoss()):
        with pytest.raises(ValueError, match="indices_tuple"):
            loss(x, labels, ("junk",), ref_emb=t)
        with pytest.raises(ValueError, match="ref_labels"):
            loss(x, labels, ref_emb=t, ref_labels=labels)
        assert loss(x, labels, ref_emb=t).item() == loss(x, ref_emb=t).item()


def test_multiple_losses_with_ref_passes_the_teacher_to_the_gram_losses_only():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    labels = torch.arange(12) % 3
    triplet, corr = losses.TripletMarginLoss(), GramCorrelationLoss()
    combined = MultipleLossesWithRef(
        [triplet, corr], miners=[miners.MultiSimilarityMiner(), None], weights=[1.0, 10.0]
    )
    want = triplet(x, labels, miners.MultiSimilarityMiner()(x, labels)) + 10.0 * corr(x, ref_emb=t)
    assert combined(x, labels, ref_emb=t).item() == pytest.approx(want.item(), rel=1e-6)
    named = MultipleLossesWithRef({"triplet": triplet, "corr": corr}, weights={"triplet": 1, "corr": 2})
    assert named(x, labels, ref_emb=t).item() == pytest.approx(
        (triplet(x, labels) + 2 * corr(x, ref_emb=t)).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="no miner"):
        MultipleLossesWithRef([triplet, corr], miners=[None, miners.MultiSimilarityMiner()])
    with pytest.raises(ValueError, match="ref_emb .* is required"):
        MultipleLossesWithRef([triplet, corr])(x, labels)


def _teacher_trainer(cls, **extra):
    torch.manual_seed(0)
    x = torch.randn(60, 6)
    y = torch.arange(60) % 4
    student, teacher = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    teacher_start = {k: v.clone() for k, v in teacher.state_dict().items()}
    models = {"trunk": student, "teacher_trunk": teacher, **extra.pop("models", {})}
    opts = {"trunk_optimizer": torch.optim.SGD(student.parameters(), lr=0.1), **extra.pop("optimizers", {})}
    trainer = cls(
        models=models,
        optimizers=opts,
        batch_size=20,
        dataset=TensorDataset(x, y),
        iterations_per_epoch=2,
        loss_funcs={
            "metric_loss": losses.TripletMarginLoss(),
            "correlation_loss": GramCorrelationLoss(),
            **extra.pop("loss_funcs", {}),
        },
        loss_weights={"metric_loss": 1, "correlation_loss": 10, **extra.pop("loss_weights", {})},
        dataloader_num_workers=0,
        **extra,
    )
    return trainer, x, teacher_start


@pytest.mark.parametrize("cls", [MetricLossOnlyWithTeacher, TrainWithClassifierAndTeacher])
def test_pml_trainers_with_a_teacher_add_the_correlation_loss_and_keep_the_teacher_frozen(cls):
    extra = {}
    if cls is TrainWithClassifierAndTeacher:
        clf = torch.nn.Linear(5, 4)
        extra = dict(
            models={"classifier": clf},
            optimizers={"classifier_optimizer": torch.optim.SGD(clf.parameters(), lr=0.1)},
            loss_funcs={"classifier_loss": torch.nn.CrossEntropyLoss()},
            loss_weights={"classifier_loss": 1},
        )
    trainer, x, teacher_start = _teacher_trainer(cls, **extra)
    seen = []
    original = trainer.loss_funcs["correlation_loss"].forward

    def spy(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        seen.append((embeddings.detach().clone(), ref_emb.detach().clone()))
        return original(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    trainer.loss_funcs["correlation_loss"].forward = spy
    trainer.train(1, 1)
    assert len(seen) == 2 and all(float(trainer.losses["correlation_loss"]) >= 0 for _ in seen)
    assert all(
        torch.equal(v, teacher_start[k]) for k, v in trainer.models["teacher_trunk"].state_dict().items()
    )
    assert not trainer.models["teacher_trunk"].training
    emb, ref = seen[-1]
    assert emb.shape == ref.shape == (20, 5) and not torch.equal(emb, ref)


def test_a_teacher_trainer_without_its_teacher_is_refused():
    with pytest.raises(ValueError, match="teacher_trunk"):
        MetricLossOnlyWithTeacher(
            models={"trunk": torch.nn.Linear(2, 2)},
            optimizers={},
            batch_size=4,
            loss_funcs={"metric_loss": losses.TripletMarginLoss()},
            dataset=None,
        )


def test_plain_pml_trainer_is_unchanged():
    assert not hasattr(MetricLossOnly, "_student_batch")
