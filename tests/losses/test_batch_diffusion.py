import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from pytorch_metric_learning import losses

from pml_mutual.losses import BatchDiffusionSelfDistillationLoss, GramCorrelationLoss, batch_diffusion_target


def hand_target(t, alpha, tau, tau_d):
    """The OBD-SD target written out in NumPy float64 with an explicit inverse (fine for a reference)."""
    x = t.double().numpy()
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    S = x @ x.T
    # noqa: E731
    soft = lambda a: (  # noqa: E731
        np.exp(a - a.max(1, keepdims=True)) / np.exp(a - a.max(1, keepdims=True)).sum(1, keepdims=True)
    )
    base = soft(S / tau)
    P = soft((S - 1e9 * np.eye(len(S))) / tau_d)
    W = (1 - alpha) * np.linalg.inv(np.eye(len(S)) - alpha * P)
    return W, W @ base


def emb(b, d, seed):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed))


@given(
    st.floats(0.0, 0.99),
    st.floats(0.1, 5.0),
    st.floats(0.05, 5.0),
    st.integers(2, 12),
    st.integers(0, 10_000),
)
def test_target_matches_hand_formula_and_is_row_stochastic(alpha, tau, tau_d, b, seed):
    t = emb(b, 6, seed)
    W, want = hand_target(t, alpha, tau, tau_d)
    assert np.allclose(W.sum(1), 1.0, atol=1e-8) and (W > -1e-12).all()  # W is row-stochastic
    got = batch_diffusion_target(t, alpha, tau, tau_d)
    assert got.dtype == torch.float32
    assert np.allclose(got.numpy(), want, atol=1e-5)
    assert torch.allclose(got.sum(1), torch.ones(b), atol=1e-5)


def test_alpha_zero_is_psd():
    t, s = emb(8, 5, 1), emb(8, 5, 2)
    assert torch.allclose(
        batch_diffusion_target(t, 0.0, 1.0), torch.softmax(F.normalize(t) @ F.normalize(t).T, 1), atol=1e-6
    )
    obd = BatchDiffusionSelfDistillationLoss(
        base_loss=losses.TripletMarginLoss(), alpha=0.0, temperature=4.0, weight=1.0, miner=None
    )
    labels = torch.arange(4).repeat(2)
    # With α = 0 the distillation term is L_corr of this package at the same temperature.
    total = obd(s, labels, ref_emb=t)
    base = losses.TripletMarginLoss()(s, labels)
    assert (total - base).item() == pytest.approx(
        GramCorrelationLoss(temperature=4.0)(s, ref_emb=t).item(), rel=1e-4
    )


def test_zero_when_student_is_teacher_and_alpha_zero():
    s = emb(10, 4, 3)
    labels = torch.arange(5).repeat(2)
    loss = BatchDiffusionSelfDistillationLoss(
        base_loss=losses.TripletMarginLoss(margin=0.0), alpha=0.0, weight=100.0, miner=None
    )
    parts_total = loss(s, labels, ref_emb=s.clone())
    assert parts_total.item() == pytest.approx(
        losses.TripletMarginLoss(margin=0.0)(s, labels).item(), abs=1e-5
    )


def test_gradient_reaches_only_the_student():
    s = emb(8, 5, 4).requires_grad_(True)
    t = emb(8, 5, 5).requires_grad_(True)
    labels = torch.arange(4).repeat(2)
    BatchDiffusionSelfDistillationLoss(alpha=0.5, weight=10.0)(s, labels, ref_emb=t).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "s,t,labels",
    [
        (emb(6, 4, 6), emb(6, 4, 7), torch.zeros(6, dtype=torch.long)),  # one class
        (emb(1, 4, 6).repeat(6, 1), emb(1, 4, 7).repeat(6, 1), torch.arange(3).repeat(2)),  # duplicates
        (emb(2, 4, 8), emb(2, 4, 9), torch.tensor([0, 1])),  # B = 2
        (torch.zeros(4, 4), torch.zeros(4, 4), torch.tensor([0, 0, 1, 1])),  # zero vectors
    ],
)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.99])
def test_finite_on_degenerate_batches(s, t, labels, alpha):
    s = s.clone().requires_grad_(True)
    out = BatchDiffusionSelfDistillationLoss(alpha=alpha, weight=1000.0)(s, labels, ref_emb=t)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_sub_losses_and_weight_scale():
    s, t = emb(8, 5, 10), emb(8, 5, 11)
    labels = torch.arange(4).repeat(2)
    loss = BatchDiffusionSelfDistillationLoss(
        base_loss=losses.TripletMarginLoss(), alpha=0.3, weight=2.0, miner=None
    )
    assert loss.sub_loss_names() == ["base", "distill"]
    full = loss(s, labels, ref_emb=t).item()
    loss.weight_scale = 0.5
    half = loss(s, labels, ref_emb=t).item()
    base = losses.TripletMarginLoss()(s, labels).item()
    assert half - base == pytest.approx(0.5 * (full - base), rel=1e-5)


def test_bad_input():
    s = emb(4, 3, 0)
    labels = torch.arange(2).repeat(2)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            BatchDiffusionSelfDistillationLoss(alpha=bad)
        with pytest.raises(ValueError, match="alpha"):
            batch_diffusion_target(s, bad)
    with pytest.raises(ValueError, match="temperature"):
        BatchDiffusionSelfDistillationLoss(temperature=0)
    with pytest.raises(ValueError, match="diffusion_temperature"):
        BatchDiffusionSelfDistillationLoss(diffusion_temperature=-1)
    with pytest.raises(ValueError, match="same batch"):
        BatchDiffusionSelfDistillationLoss()(s, labels, ref_emb=emb(5, 3, 1))
    with pytest.raises(ValueError, match="ref_emb"):
        BatchDiffusionSelfDistillationLoss()(s, labels)
