import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from pytorch_metric_learning.reducers import SumReducer
from pytorch_metric_learning.utils.module_with_records import ModuleWithRecords

from pml_mutual.losses import GramCorrelationLoss, MutualGramLoss


def hand_kl_gram(teacher, student, T):
    """Eq. 1/5 written out with plain loops: (T²/B) Σ_i Σ_j p_ij log(p_ij / q_ij)."""

    def probs(x):
        x = x.double()
        n = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g = n @ n.T / T
        return torch.softmax(g, dim=1)

    p, q = probs(teacher), probs(student)
    B = p.shape[0]
    total = 0.0
    for i in range(B):
        for j in range(B):
            total += float(p[i, j]) * math.log(float(p[i, j]) / float(q[i, j]))
    return T * T * total / B


batches = st.tuples(st.integers(1, 12), st.integers(1, 16), st.integers(0, 2**31 - 1))


def make(b, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g) * scale, torch.randn(b, d, generator=g) * scale


@pytest.mark.parametrize("T", [1.0, 4.0, 0.5])
def test_gram_correlation_matches_hand_formula(T):
    s, t = make(6, 5, 1)
    got = GramCorrelationLoss(temperature=T)(s, ref_emb=t)
    assert got.item() == pytest.approx(hand_kl_gram(t, s, T), rel=1e-4, abs=1e-7)


def test_mutual_matches_hand_formula():
    p, s = make(7, 4, 2)
    got = MutualGramLoss(temperature=4.0)(p, ref_emb=s)
    want = 0.5 * (hand_kl_gram(p, s, 4.0) + hand_kl_gram(s, p, 4.0))
    assert got.item() == pytest.approx(want, rel=1e-4)


@given(batches, st.floats(0.1, 10.0))
def test_kl_nonnegative_and_zero_on_equal(bds, T):
    s, t = make(*bds)
    loss = GramCorrelationLoss(temperature=T)
    assert loss(s, ref_emb=t).item() >= -1e-6
    assert loss(s, ref_emb=s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert MutualGramLoss(temperature=T)(s, ref_emb=s.clone()).item() == pytest.approx(0.0, abs=1e-6)


@given(batches, st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_invariant_to_positive_rescaling(bds, a, b):
    s, t = make(*bds)
    for loss in (GramCorrelationLoss(), MutualGramLoss()):
        base = loss(s, ref_emb=t).item()
        # Rescaling changes the normalised rows by an ulp, the cosines by a few; each float32 log-softmax
        # entry is then exact to ~eps·(1/T + log B), and the loss carries a factor T² (Eq. 1).
        T, B = loss.temperature, s.shape[0]
        eps = float(torch.finfo(torch.float32).eps)
        assert loss(s * a, ref_emb=t * b).item() == pytest.approx(
            base, rel=1e-3, abs=T * T * 8 * eps * (1 / T + math.log(B))
        )


@given(batches)
def test_permutation_equivariance(bds):
    s, t = make(*bds)
    perm = torch.randperm(s.shape[0], generator=torch.Generator().manual_seed(bds[2]))
    for loss in (GramCorrelationLoss(), MutualGramLoss()):
        # A permuted batch sums each row's softmax in another order: each float32 log-softmax entry is
        # exact to ~eps·(1/T + log B), and the loss carries a factor T² (Eq. 1).
        T, B = loss.temperature, s.shape[0]
        tol = T * T * 8 * float(torch.finfo(torch.float32).eps) * (1 / T + math.log(B))
        assert loss(s[perm], ref_emb=t[perm]).item() == pytest.approx(
            loss(s, ref_emb=t).item(), rel=1e-4, abs=tol
        )


@given(batches, st.floats(0.2, 8.0))
def test_reverse_is_forward_with_arguments_swapped(bds, T):
    s, t = make(*bds)
    rev = GramCorrelationLoss(temperature=T, direction="reverse")(s, ref_emb=t).item()
    fwd = GramCorrelationLoss(temperature=T, direction="forward")(t, ref_emb=s).item()
    assert rev == pytest.approx(fwd, rel=1e-4, abs=1e-7)


@given(batches, st.sampled_from(["symmetric", "dml"]))
def test_mutual_is_symmetric(bds, mode):
    p, s = make(*bds)
    loss = MutualGramLoss(mode=mode)
    assert loss(p, ref_emb=s).item() == pytest.approx(loss(s, ref_emb=p).item(), rel=1e-5, abs=1e-7)


def test_teacher_gets_no_gradient_student_does():
    s, t = make(8, 6, 3)
    s.requires_grad_(True)
    t.requires_grad_(True)
    for direction in ("forward", "reverse"):
        s.grad = t.grad = None
        GramCorrelationLoss(direction=direction)(s, ref_emb=t).backward()
        assert t.grad is None
        assert s.grad is not None and s.grad.abs().sum() > 0


def test_mutual_gradient_conventions():
    p, s = make(8, 6, 4)
    p.requires_grad_(True)
    s.requires_grad_(True)

    def grads(loss_fn, sub):
        p.grad = s.grad = None
        loss_fn.reducer = SumReducer()  # keep sub-losses apart: compute each via compute_loss
        out = loss_fn.compute_loss(p, None, None, s, None)[sub]["losses"].sum()
        out.backward()
        return p.grad, s.grad

    # dml: kl_p_s = KL(σ(G_p).detach() ‖ σ(G_s)) trains s only; kl_s_p trains p only.
    gp, gs = grads(MutualGramLoss(mode="dml"), "kl_p_s")
    assert gp is None and gs.abs().sum() > 0
    gp, gs = grads(MutualGramLoss(mode="dml"), "kl_s_p")
    assert gs is None and gp.abs().sum() > 0
    # symmetric: both terms reach both students.
    for sub in ("kl_p_s", "kl_s_p"):
        gp, gs = grads(MutualGramLoss(mode="symmetric"), sub)
        assert gp.abs().sum() > 0 and gs.abs().sum() > 0


def test_mutual_dml_total_gradient_equals_symmetric_only_through_peer_terms():
    p, s = make(6, 5, 5)
    p.requires_grad_(True)
    s.requires_grad_(True)
    MutualGramLoss(mode="dml")(p, ref_emb=s).backward()
    g_dml = p.grad.clone()
    # In dml the gradient on p is exactly that of ½T²·KL(σ(G_s).detach() ‖ σ(G_p)).
    p.grad = None
    GramCorrelationLoss()(p, ref_emb=s).mul(0.5).backward()
    assert torch.allclose(g_dml, p.grad, atol=1e-7)


def test_sub_losses_visible_to_record_keeper():
    loss = MutualGramLoss()
    assert loss.sub_loss_names() == ["kl_p_s", "kl_s_p"]
    p, s = make(5, 4, 6)
    parts = loss.compute_loss(p, None, None, s, None)
    assert set(parts) == {"kl_p_s", "kl_s_p"}
    assert all(v["reduction_type"] == "element" and v["losses"].shape == (5,) for v in parts.values())
    assert isinstance(loss, ModuleWithRecords)


def test_pml_reducer_is_respected():
    s, t = make(6, 5, 7)
    mean = GramCorrelationLoss()(s, ref_emb=t)
    total = GramCorrelationLoss(reducer=SumReducer())(s, ref_emb=t)
    assert total.item() == pytest.approx(6 * mean.item(), rel=1e-5)


@pytest.mark.parametrize("loss_cls", [GramCorrelationLoss, MutualGramLoss])
@pytest.mark.parametrize(
    "s,t",
    [
        (torch.zeros(4, 3), torch.zeros(4, 3)),
        (torch.zeros(4, 3), torch.randn(4, 3)),
        (torch.randn(1, 3), torch.randn(1, 3)),
        (torch.randn(5, 3) * 1e30, torch.randn(5, 3) * 1e-30),
        (torch.randn(5, 3) * 1e-30, torch.randn(5, 3) * 1e30),
        (torch.ones(5, 3), torch.ones(5, 3) * 2),  # one-class-like batch: all rows equal
    ],
)
def test_finite_values_and_gradients_on_edge_cases(loss_cls, s, t):
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    out = loss_cls()(s, ref_emb=t)
    out.backward()
    assert torch.isfinite(out)
    assert torch.isfinite(s.grad).all()
    if t.grad is not None:
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss_cls", [GramCorrelationLoss, MutualGramLoss])
def test_half_precision_inputs_computed_in_float32(dtype, loss_cls):
    s32, t32 = make(16, 8, 8)
    s = s32.to(dtype).requires_grad_(True)
    t = t32.to(dtype)
    out = loss_cls()(s, ref_emb=t)
    assert out.dtype == torch.float32
    ref = loss_cls()(s.detach().float(), ref_emb=t.float())
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    out.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()


def test_float32_under_autocast():
    s, t = make(16, 8, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = GramCorrelationLoss()(s, ref_emb=t)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(GramCorrelationLoss()(s, ref_emb=t).item(), rel=1e-6)


@pytest.mark.parametrize("loss_cls", [GramCorrelationLoss, MutualGramLoss])
def test_bad_input_errors(loss_cls):
    loss = loss_cls()
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="ref_emb"):
        loss(x)
    with pytest.raises(ValueError, match="same batch"):
        loss(x, ref_emb=torch.randn(5, 3))
    with pytest.raises(ValueError, match="2-D"):
        loss(torch.randn(4), ref_emb=torch.randn(4))
    with pytest.raises(ValueError, match="NaN or inf"):
        loss(torch.tensor([[float("nan"), 1.0]]), ref_emb=torch.ones(1, 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        loss(torch.ones(1, 2), ref_emb=torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(ValueError, match="empty"):
        loss(torch.zeros(0, 3), ref_emb=torch.zeros(0, 3))
    with pytest.raises(TypeError, match="floating"):
        loss(torch.ones(2, 2, dtype=torch.long), ref_emb=torch.ones(2, 2))
    for bad in (0, -1.0, float("inf"), float("nan"), 3e3, True):
        with pytest.raises(ValueError, match="temperature"):
            loss_cls(temperature=bad)


def test_unknown_option_values():
    with pytest.raises(ValueError, match="direction"):
        GramCorrelationLoss(direction="sideways")
    with pytest.raises(ValueError, match="mode"):
        MutualGramLoss(mode="both")


def test_different_embedding_sizes_are_allowed():
    # The Gram matrices are B×B whatever D is: a teacher with another head size can still teach.
    s, t = torch.randn(6, 4), torch.randn(6, 9)
    assert torch.isfinite(GramCorrelationLoss()(s, ref_emb=t))


def test_matches_torch_kl_div_batchmean():
    s, t = make(10, 7, 10)
    T = 4.0
    gs = F.normalize(s) @ F.normalize(s).T
    gt = F.normalize(t) @ F.normalize(t).T
    want = F.kl_div(F.log_softmax(gs / T, 1), F.softmax(gt / T, 1), reduction="batchmean") * T * T
    assert GramCorrelationLoss(temperature=T)(s, ref_emb=t).item() == pytest.approx(want.item(), rel=1e-5)


@given(
    st.integers(1, 10),
    st.integers(2, 8),
    st.integers(1, 5),
    st.sampled_from(["forward", "reverse"]),
    st.floats(0.5, 8.0),
    st.integers(0, 10_000),
)
def test_sum_over_teachers_equals_the_sum_of_calls(b, d, n_teachers, direction, T, seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, d, generator=g, requires_grad=True)
    teachers = [torch.randn(b, d, generator=g) for _ in range(n_teachers)]
    loss = GramCorrelationLoss(temperature=T, direction=direction)
    fused = loss.sum_over_teachers(student, teachers)
    (g_fused,) = torch.autograd.grad(fused, student)
    looped = sum(loss(student, ref_emb=t) for t in teachers)
    (g_loop,) = torch.autograd.grad(looped, student)
    # Same math, different float32 summation order: the KL of near-equal logs amplifies rounding.
    assert fused.item() == pytest.approx(looped.item(), rel=1e-4, abs=1e-6)
    assert torch.allclose(g_fused, g_loop, atol=1e-5)
    # A non-default reducer takes the plain path, with the same value as calling it per teacher.
    summed = GramCorrelationLoss(temperature=T, direction=direction, reducer=SumReducer())
    assert summed.sum_over_teachers(student, teachers).item() == pytest.approx(
        sum(summed(student, ref_emb=t) for t in teachers).item(), rel=1e-5, abs=1e-7
    )


def test_sum_over_teachers_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        GramCorrelationLoss().sum_over_teachers(torch.randn(3, 2), [])
    with pytest.raises(ValueError, match="same batch"):
        GramCorrelationLoss().sum_over_teachers(torch.randn(3, 2), [torch.randn(4, 2)])
