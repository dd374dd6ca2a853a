import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
from pytorch_metric_learning.reducers import MeanReducer, SumReducer

from pml_mutual.losses import GramCorrelationLoss, MutualGramLoss, gram_distillation_losses

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import computing_ops  # noqa: E402

EPS = torch.finfo(torch.float32).eps


def units(T: float, b: int, pairs: int) -> float:
    """Rounding scale of a KL loss summed over ``pairs`` pairs of networks, in float32. A row's log-softmax of
    G / T (|G| ≤ 1) is exact to ~eps·(1/T + log b + 1) per entry; a row's KL weighs those errors by
    probabilities summing to 1, and the loss is T² / b times the sum over b rows and all pairs."""
    return EPS * (1 / T + math.log(b) + 1) * T**2 * pairs


def called(student, support, teachers, corr, mutual):
    """What the modules give when called one by one: the definition the stacked computation must match."""
    out = {}
    if support is not None:
        out["mutual_loss"] = mutual(student, ref_emb=support)
    if teachers:
        out["correlation_loss"] = sum(corr(student, ref_emb=t) for t in teachers)
    return out


cases = st.fixed_dictionaries(
    {
        "b": st.integers(1, 12),
        "d": st.integers(1, 16),
        "teachers": st.integers(0, 4),
        "support": st.booleans(),
        "direction": st.sampled_from(["forward", "reverse"]),
        "T": st.floats(0.1, 10.0),
        "scale": st.sampled_from([1e-3, 1.0, 1e3]),
        "stacked": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
    }
).filter(lambda c: c["teachers"] or c["support"])


@given(cases)
def test_stacked_computation_equals_the_calls_in_value_and_gradient(c):
    g = torch.Generator().manual_seed(c["seed"])
    rand = lambda: torch.randn(c["b"], c["d"], generator=g) * c["scale"]  # noqa: E731
    student = rand().requires_grad_()
    support = rand().requires_grad_() if c["support"] else None
    teachers = [rand() for _ in range(c["teachers"])]
    corr = GramCorrelationLoss(temperature=c["T"], direction=c["direction"])
    mutual = MutualGramLoss(temperature=c["T"])
    assert corr.fusable() and mutual.fusable()
    # teachers as the trainer passes them (the real one, then a stack of virtual ones, empty at stage 2) or
    # as separate tensors
    rest = torch.stack(teachers[1:]) if len(teachers) > 1 else torch.zeros(0, c["b"], c["d"])
    given_teachers = ([teachers[0], rest] if c["stacked"] else teachers) if teachers else None
    got = gram_distillation_losses(
        student, support, given_teachers, correlation_loss=corr, mutual_loss=mutual
    )
    want = called(student, support, teachers, corr, mutual)
    assert got.keys() == want.keys()
    pairs = c["teachers"] + c["support"]
    tol = 8 * units(c["T"], c["b"], pairs)
    for k in want:
        assert abs(got[k].item() - want[k].item()) <= tol, k
    inputs = [student] + ([support] if support is not None else [])
    got_grads = torch.autograd.grad(sum(got.values()), inputs)
    want_grads = torch.autograd.grad(sum(want.values()), inputs, allow_unused=True)
    for x, a, b in zip(inputs, got_grads, want_grads):
        b = torch.zeros_like(x) if b is None else b  # the support gets no gradient from L_corr
        # ∂/∂x of a normalised x scales as 1 / |x|: one T fewer than the value, over the smallest row norm
        grad_tol = 8 * units(c["T"], c["b"], pairs) / c["T"] / x.detach().norm(dim=1).min().item()
        assert (a - b).abs().max().item() <= grad_tol


@given(st.integers(1, 10), st.integers(1, 8), st.floats(0.5, 8.0), st.integers(0, 10_000))
def test_zero_for_identical_networks(b, d, T, seed):
    x = torch.randn(b, d, generator=torch.Generator().manual_seed(seed))
    got = gram_distillation_losses(
        x,
        x.clone(),
        [x.clone(), x.clone()[None]],
        correlation_loss=GramCorrelationLoss(temperature=T),
        mutual_loss=MutualGramLoss(temperature=T),
    )
    # zero up to rounding: the batched Gram of two equal slices need not be bitwise equal
    assert abs(got["mutual_loss"].item()) <= 8 * units(T, b, 1)
    assert abs(got["correlation_loss"].item()) <= 8 * units(T, b, 2)


class ScaledCorrelation(GramCorrelationLoss):
    def compute_loss(self, *args, **kwargs):
        out = super().compute_loss(*args, **kwargs)
        out["loss"]["losses"] = 3 * out["loss"]["losses"]
        return out


@pytest.mark.parametrize(
    "corr, mutual",
    [
        (GramCorrelationLoss(reducer=SumReducer()), MutualGramLoss()),
        (GramCorrelationLoss(), MutualGramLoss(mode="dml")),
        (GramCorrelationLoss(), MutualGramLoss(reducer=SumReducer())),
        (GramCorrelationLoss(temperature=2.0), MutualGramLoss(temperature=4.0)),
        (GramCorrelationLoss(distance=DotProductSimilarity()), MutualGramLoss()),
        (GramCorrelationLoss(distance=CosineSimilarity(power=2)), MutualGramLoss()),
        (ScaledCorrelation(), MutualGramLoss()),
    ],
)
def test_any_other_configuration_is_the_calls_themselves(corr, mutual):
    g = torch.Generator().manual_seed(3)
    student, support = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    teachers = [torch.randn(6, 5, generator=g) for _ in range(3)]
    assert not (corr.fusable() and mutual.fusable() and corr.temperature == mutual.temperature)
    got = gram_distillation_losses(student, support, teachers, correlation_loss=corr, mutual_loss=mutual)
    want = called(student, support, teachers, corr, mutual)
    assert {k: v.item() for k, v in got.items()} == {k: v.item() for k, v in want.items()}


def test_fusable_follows_the_reducer_of_every_sub_loss():
    assert MutualGramLoss(reducer=MeanReducer()).fusable()
    assert not MutualGramLoss(reducer=SumReducer()).fusable()


def test_a_teacher_of_another_width_is_called_not_stacked():
    g = torch.Generator().manual_seed(4)
    student, wide = torch.randn(6, 4, generator=g), torch.randn(6, 9, generator=g)
    corr = GramCorrelationLoss()
    got = gram_distillation_losses(student, teachers=[wide], correlation_loss=corr)["correlation_loss"]
    assert got.item() == corr(student, ref_emb=wide).item()


def test_bad_input_is_named():
    corr, mutual, x = GramCorrelationLoss(), MutualGramLoss(), torch.randn(4, 3)
    with pytest.raises(ValueError, match="at least one teacher"):
        gram_distillation_losses(x, teachers=[], correlation_loss=corr)
    with pytest.raises(ValueError, match="same batch"):
        gram_distillation_losses(x, teachers=[torch.randn(5, 3)], correlation_loss=corr)
    with pytest.raises(ValueError, match="peer.*same batch"):
        gram_distillation_losses(x, torch.randn(5, 3), correlation_loss=corr, mutual_loss=mutual)
    with pytest.raises(ValueError, match="without a correlation_loss"):
        gram_distillation_losses(x, teachers=[x])
    with pytest.raises(ValueError, match="without a mutual_loss"):
        gram_distillation_losses(x, x)
    with pytest.raises(TypeError, match="teachers must be tensors"):
        gram_distillation_losses(x, teachers=[[1.0, 2.0]], correlation_loss=corr)
    with pytest.raises(ValueError, match="2-D"):
        gram_distillation_losses(x, teachers=[torch.randn(2, 2, 4, 3)], correlation_loss=corr)
    with pytest.raises(ValueError, match="NaN"):
        gram_distillation_losses(x, teachers=[torch.full((4, 3), float("nan"))], correlation_loss=corr)


def test_launches_do_not_grow_with_the_number_of_virtual_teachers():
    """Eq. 6 over many virtual teachers costs the GPU no more kernel launches than one teacher: the
    teachers are rows of one stacked computation, not a Python loop."""
    g = torch.Generator().manual_seed(5)
    student, support = (torch.randn(16, 32, generator=g).requires_grad_() for _ in range(2))
    corr, mutual = GramCorrelationLoss(), MutualGramLoss()

    def step(n_teachers):
        teachers = [torch.randn(16, 32), torch.randn(n_teachers - 1, 16, 32)]

        def run():
            student.grad = support.grad = None  # the next backward writes the gradients, adds nothing
            out = gram_distillation_losses(
                student, support, teachers, correlation_loss=corr, mutual_loss=mutual
            )
            (out["correlation_loss"] + out["mutual_loss"]).backward()

        return computing_ops(run)

    two, five = step(2), step(5)
    assert two == five

    # and fewer than half of what the modules dispatch when called one by one (141 at this writing; 66 here)
    def calls():
        student.grad = support.grad = None
        sum(called(student, support, [torch.randn(16, 32)], corr, mutual).values()).backward()

    assert 2 * sum(step(1).values()) < sum(computing_ops(calls).values())
