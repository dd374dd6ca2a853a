"""ProjectedDistillationLoss: ‖P·s + b − t‖² with a learnable linear P (the compatibility term)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_mutual.losses import ProjectedDistillationLoss


def test_zero_at_the_start_when_the_student_is_its_teacher():
    emb = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    assert ProjectedDistillationLoss(8)(emb, ref_emb=emb).item() == 0.0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), dim=st.integers(2, 12), rows=st.integers(2, 20))
def test_the_value_is_the_mean_squared_distance_and_the_true_map_is_a_stationary_point(seed, dim, rows):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, dim, generator=g)
    w, b = torch.randn(dim, dim, generator=g), torch.randn(dim, generator=g)
    loss_fn = ProjectedDistillationLoss(dim)
    with torch.no_grad():
        loss_fn.projection.weight.copy_(w)
        loss_fn.projection.bias.copy_(b)
    teacher = student @ w.T + b
    # at the map that relates the two spaces the loss and its gradient vanish (float32 rounding aside:
    # |s·w| ≲ dim·max|s||w|, each product rounded at 2^-24 relative)
    loss = loss_fn(student, ref_emb=teacher)
    loss.backward()
    scale = float((student.abs().max() * w.abs().max() * dim + b.abs().max()) ** 2)
    assert loss.item() <= 1e-10 * scale
    assert loss_fn.projection.weight.grad.abs().max().item() <= 1e-4 * scale
    # elsewhere it is the mean over rows of the squared distance
    other = teacher + torch.randn(rows, dim, generator=g)
    expected = ((student @ w.T + b - other) ** 2).sum(1).mean()
    assert loss_fn(student, ref_emb=other).item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradients_reach_the_student_and_P_but_not_the_teacher():
    student = torch.randn(6, 4, requires_grad=True)
    teacher = torch.randn(6, 4, requires_grad=True)
    loss_fn = ProjectedDistillationLoss(4)
    loss_fn(student, ref_emb=teacher).backward()
    assert student.grad.abs().sum() > 0 and loss_fn.projection.weight.grad.abs().sum() > 0
    assert teacher.grad is None


def test_float32_under_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ProjectedDistillationLoss(4)(torch.randn(5, 4), ref_emb=torch.randn(5, 4))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda f: f(torch.randn(4, 4)), "ref_emb"),
        (lambda f: f(torch.randn(4, 4), ref_emb=torch.randn(3, 4)), "same batch"),
        (lambda f: f(torch.randn(4, 5), ref_emb=torch.randn(4, 5)), "embedding_size=4"),
        (
            lambda f: f(torch.randn(4, 4), indices_tuple=(torch.arange(2),) * 3, ref_emb=torch.randn(4, 4)),
            "miner",
        ),
    ],
)
def test_bad_calls_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(ProjectedDistillationLoss(4))


@pytest.mark.parametrize("size", [0, -1, 2.0, True])
def test_embedding_size_must_be_a_positive_integer(size):
    with pytest.raises(ValueError, match="embedding_size"):
        ProjectedDistillationLoss(size)
