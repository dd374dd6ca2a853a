import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from pml_mutual import DriftCompensator, GramCorrelationLoss
from pml_mutual.drift import feature_drift, prototype_drift, prototypes, similarity_weights, virtual_features

SIMS = ["cosine_relu", "gaussian", "cosine"]


def clustered(n_classes, per_class, dim, seed, spread=0.1):
    """Unit features around well-separated class centres (all in the positive orthant, so raw cosine
    works)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(n_classes, dim, generator=g) + 0.5
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    feats = centres[labels] + spread * torch.rand(len(labels), dim, generator=g)
    return F.normalize(feats, dim=1), labels


def test_prototypes_are_class_means():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    ids, means = prototypes(x, torch.tensor([5, 5, 2]))
    assert ids.tolist() == [2, 5]
    assert torch.allclose(means, torch.tensor([[0.0, 2.0], [2.0, 0.0]]))


@given(st.integers(0, 10_000), st.sampled_from(SIMS), st.integers(2, 6), st.integers(2, 8))
def test_translation_round_trip(seed, sim, k, d):
    """Eq. 3/4: a pure translation by v gives drift v for every prototype and virtual features = old
    features."""
    old, labels = clustered(k, 5, d, seed)
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed + 1)) * 0.3
    new = old + v
    _, mu = prototypes(old, labels)
    drift = prototype_drift(old, new, mu, sim)
    assert torch.allclose(drift, v.expand_as(drift), atol=1e-5)
    recovered = virtual_features(new, mu + drift, drift, sim, normalize=False)
    assert torch.allclose(recovered, old, atol=1e-5)
    assert torch.allclose(feature_drift(new, mu + drift, drift, sim), -v.expand_as(new), atol=1e-5)


@given(st.integers(0, 10_000), st.sampled_from(["cosine_relu", "gaussian"]), st.integers(1, 5))
def test_drift_is_a_convex_combination(seed, sim, k):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(12, 4, generator=g)
    new = torch.randn(12, 4, generator=g)
    mu = torch.randn(k, 4, generator=g)
    w = similarity_weights(old, mu, sim, dim=0)
    assert torch.all(w >= 0)
    assert torch.allclose(w.sum(0), torch.ones(k), atol=1e-5)
    drift = prototype_drift(old, new, mu, sim)
    delta = new - old
    # Within the axis-aligned bounding box of the per-feature drifts (a consequence of convexity).
    assert torch.all(drift <= delta.max(0).values + 1e-5)
    assert torch.all(drift >= delta.min(0).values - 1e-5)
    fd = feature_drift(new, mu + drift, drift, sim)
    assert torch.all(-fd <= drift.max(0).values + 1e-5) and torch.all(-fd >= drift.min(0).values - 1e-5)


@given(st.integers(0, 10_000), st.sampled_from(SIMS))
def test_no_drift_when_models_agree(seed, sim):
    old, labels = clustered(3, 4, 5, seed)
    _, mu = prototypes(old, labels)
    drift = prototype_drift(old, old.clone(), mu, sim)
    assert torch.count_nonzero(drift) == 0
    assert torch.allclose(virtual_features(old, mu, drift, sim), old, atol=1e-6)


def test_cosine_relu_falls_back_when_every_weight_is_zero():
    # Every feature is orthogonal/opposite to the prototype: weights are all eps, i.e. a plain average.
    old = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    new = old + torch.tensor([[0.2, 0.0], [0.0, 0.4]])
    drift = prototype_drift(old, new, torch.tensor([[1.0, 0.0]]), "cosine_relu")
    assert torch.allclose(drift, torch.tensor([[0.1, 0.2]]))
    with pytest.raises(ValueError, match="~0"):
        prototype_drift(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), new, torch.tensor([[1.0, 0.0]]), "cosine")


def test_gaussian_far_features_do_not_underflow():
    old = torch.tensor([[100.0, 0.0], [101.0, 0.0]])
    drift = prototype_drift(old, old + 1.0, torch.tensor([[-100.0, 0.0]]), "gaussian")
    assert torch.isfinite(drift).all() and torch.allclose(drift, torch.ones(1, 2))


def three_stages(mode, shifts):
    """Stages of disjoint classes; each new model is the previous one translated by shifts[i]."""
    comp = DriftCompensator(mode=mode)
    models = [torch.zeros(4)]
    for s in shifts:
        models.append(models[-1] + s)
    data = [clustered(3, 6, 4, seed=i) for i in range(len(models))]
    for i, (x, y) in enumerate(data):
        comp.add_stage(x + models[i], y + 10 * i)
        for t in comp.stages_to_measure():
            old_model = models[t] if mode == "direct" else models[i - 1]
            comp.update_drift(x + old_model, x + models[i], stage=t)
    return comp, models


@pytest.mark.parametrize("mode", ["direct", "chained"])
def test_translated_stages_give_exact_drift(mode):
    shifts = [torch.tensor([0.1, 0.0, -0.2, 0.05]), torch.tensor([0.0, 0.3, 0.1, 0.0])]
    comp, models = three_stages(mode, shifts)
    for t in range(2):
        assert torch.allclose(comp.prototype_drifts[t], (models[2] - models[t]).expand(3, 4), atol=1e-5)


def test_chained_equals_direct_for_translations():
    shifts = [
        torch.tensor([0.1, 0.0, -0.2, 0.05]),
        torch.tensor([0.0, 0.3, 0.1, 0.0]),
        torch.tensor([0.2, 0.2, 0, 0]),
    ]
    direct, _ = three_stages("direct", shifts)
    chained, _ = three_stages("chained", shifts)
    teacher = torch.randn(7, 4)
    for a, b in zip(direct.virtual_features(teacher), chained.virtual_features(teacher)):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(direct.prototype_drifts, chained.prototype_drifts):
        assert torch.allclose(a, b, atol=1e-5)


def test_virtual_features_recover_earlier_models_under_translation():
    shifts = [torch.tensor([0.1, 0.0, -0.2, 0.05]), torch.tensor([0.0, 0.3, 0.1, 0.0])]
    comp = DriftCompensator(mode="direct", normalize=False)
    models = [torch.zeros(4), shifts[0], shifts[0] + shifts[1]]
    for i in range(3):
        x, y = clustered(3, 6, 4, seed=i)
        comp.add_stage(x + models[i], y + 10 * i)
        for t in comp.stages_to_measure():
            comp.update_drift(x + models[t], x + models[i], stage=t)
    probe = torch.rand(5, 4)
    virt = comp.virtual_features(probe + models[2])
    assert len(virt) == 2
    for t in range(2):
        assert torch.allclose(virt[t], probe + models[t], atol=1e-5)


def test_correlation_loss_sums_real_and_virtual_teachers():
    comp, _ = three_stages(
        "direct", [torch.tensor([0.1, 0.0, -0.2, 0.05]), torch.tensor([0.0, 0.3, 0.1, 0.0])]
    )
    student, teacher = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4)
    got = GramCorrelationLoss().sum_over_teachers(student, [teacher, comp.virtual_feature_stack(teacher)])
    loss = GramCorrelationLoss()
    want = loss(student, ref_emb=teacher) + sum(
        loss(student, ref_emb=v) for v in comp.virtual_features(teacher)
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-5)  # fused batched sum vs loop: rounding only
    got.backward()
    assert student.grad is not None
    single = DriftCompensator()
    single.add_stage(*clustered(3, 4, 4, 0))
    assert GramCorrelationLoss().sum_over_teachers(
        student, [teacher, single.virtual_feature_stack(teacher)]
    ).item() == pytest.approx(loss(student, ref_emb=teacher).item(), rel=1e-5)


def test_mode_none_keeps_one_term_per_stage_without_drift():
    comp = DriftCompensator(mode="none")
    for i in range(3):
        x, y = clustered(3, 6, 4, seed=i)
        comp.add_stage(x, y + 10 * i)
        assert comp.stages_to_measure() == []  # no earlier checkpoint is ever loaded
    with pytest.raises(ValueError, match="none"):
        comp.update_drift(torch.randn(6, 4), torch.randn(6, 4), stage=0)
    teacher = torch.randn(8, 4) * 3
    virt = comp.virtual_features(teacher)
    assert len(virt) == 2 and all(torch.allclose(v, F.normalize(teacher, dim=1)) for v in virt)
    # the same virtual features as a direct-mode compensator whose models never moved
    still, _ = three_stages("direct", [torch.zeros(4), torch.zeros(4)])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(still.virtual_features(teacher), virt))
    student = torch.randn(8, 4, requires_grad=True)
    one = GramCorrelationLoss()(student, ref_emb=teacher)
    assert GramCorrelationLoss().sum_over_teachers(
        student, [teacher, comp.virtual_feature_stack(teacher)]
    ).item() == pytest.approx(3 * one.item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["direct", "chained", "none", "learned_chained"])
def test_state_dict_round_trip(mode, tmp_path):
    comp, _ = three_stages(mode, [torch.tensor([0.1, 0.0, -0.2, 0.05]), torch.tensor([0.0, 0.3, 0.1, 0.0])])
    path = tmp_path / "drift.pt"
    torch.save(comp.state_dict(), path)
    other = DriftCompensator(mode=mode)
    other.load_state_dict(torch.load(path, weights_only=True))
    teacher = torch.randn(6, 4)
    assert other.num_stages == 3
    for a, b in zip(comp.virtual_features(teacher), other.virtual_features(teacher)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="mode"):
        DriftCompensator(mode="chained" if mode == "direct" else "direct").load_state_dict(comp.state_dict())


def test_bad_input():
    x, y = clustered(3, 4, 5, 0)
    with pytest.raises(ValueError, match="similarity"):
        prototype_drift(x, x, x[:2], "dot")
    with pytest.raises(ValueError, match="similarity"):
        DriftCompensator(similarity="dot")
    with pytest.raises(ValueError, match="mode"):
        DriftCompensator(mode="sideways")
    with pytest.raises(ValueError, match="embedding sizes"):
        prototype_drift(x, x, torch.randn(2, 7))
    with pytest.raises(ValueError, match="embedding sizes"):
        feature_drift(x, torch.randn(2, 7), torch.randn(2, 7))
    with pytest.raises(ValueError, match="same images"):
        prototype_drift(x, x[:3], x[:2])
    with pytest.raises(ValueError, match="NaN"):
        prototype_drift(x, x * float("nan"), x[:2])
    with pytest.raises(ValueError, match="2-D"):
        prototypes(torch.randn(5), torch.arange(5))
    with pytest.raises(ValueError, match="empty"):
        prototypes(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        prototypes(x, y.float())
    with pytest.raises(ValueError, match="one entry per embedding"):
        prototypes(x, y[:3])
    comp = DriftCompensator()
    comp.add_stage(x, y)
    with pytest.raises(ValueError, match="disjoint"):
        comp.add_stage(x, y)
    with pytest.raises(ValueError, match="embedding size"):
        comp.add_stage(torch.randn(4, 7), torch.tensor([7, 7, 8, 8]))
    with pytest.raises(ValueError, match="two stages"):
        comp.update_drift(x, x, stage=0)
    comp.add_stage(x, y + 10)
    with pytest.raises(ValueError, match="stage must be one of"):
        comp.update_drift(x, x, stage=1)


@given(
    classes=st.lists(st.integers(1, 7), min_size=2, max_size=5),
    dim=st.integers(2, 9),
    similarity=st.sampled_from(["cosine_relu", "gaussian"]),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_batched_virtual_features_equal_eq4_stage_by_stage(classes, dim, similarity, normalize, seed):
    """One padded computation for all earlier stages (the training step's path) gives Eq. 4 of each
    stage as the pure function computes it, whatever the class counts per stage."""
    g = torch.Generator().manual_seed(seed)
    comp = DriftCompensator(similarity=similarity, normalize=normalize)
    first = 0
    for k in classes:
        comp.add_stage(
            F.normalize(torch.randn(3 * k, dim, generator=g), dim=1), torch.arange(first, first + k).repeat(3)
        )
        first += k
        for t in comp.stages_to_measure():
            old = F.normalize(torch.randn(3 * k, dim, generator=g), dim=1)
            comp.update_drift(old, old + 0.3 * torch.randn(3 * k, dim, generator=g), stage=t)
    teacher = torch.randn(5, dim, generator=g)
    got = comp.virtual_feature_stack(teacher)
    assert got.shape == (len(classes) - 1, 5, dim)
    for t in range(len(classes) - 1):
        want = virtual_features(
            teacher,
            comp.drifted_prototypes(t),
            comp.prototype_drifts[t],
            similarity,
            normalize=normalize,
            sigma=comp.sigma,
            eps=comp.eps,
        )
        # the same sums over a stage's classes, padded with exact zeros; only the order of float32
        # additions may differ: a few eps per term of the K-term and D-term sums, relative to the drift
        scale = 1 + comp.prototype_drifts[t].abs().max().item()
        bound = (
            8
            * (max(classes) + dim)
            * torch.finfo(torch.float32).eps
            * scale
            * (1 if normalize else 1 + teacher.abs().max().item())
        )
        assert (got[t] - want).abs().max().item() <= bound


def test_load_state_dict_refuses_bad_state():
    comp, _ = three_stages(
        "direct", [torch.tensor([0.1, 0.0, -0.2, 0.05]), torch.tensor([0.0, 0.3, 0.1, 0.0])]
    )
    good = comp.state_dict()

    def broken(**change):
        state = {k: (list(v) if isinstance(v, list) else v) for k, v in good.items()}
        for k, v in change.items():
            if v is None:
                del state[k]
            else:
                state[k] = v(state) if callable(v) else v
        return state

    cases = {
        "missing key 'prototype_drifts'": broken(prototype_drifts=None),
        "stage_prototypes\\[1\\].*shape": broken(
            stage_prototypes=lambda s: [s["stage_prototypes"][0], torch.zeros(3, 5), s["stage_prototypes"][2]]
        ),
        "prototype_drifts\\[0\\].*shape": broken(
            prototype_drifts=lambda s: [torch.zeros(2, 4)] + s["prototype_drifts"][1:]
        ),
        "stage_prototypes\\[2\\].*NaN": broken(
            stage_prototypes=lambda s: (
                s["stage_prototypes"][:2] + [torch.full_like(s["stage_prototypes"][2], float("nan"))]
            )
        ),
        "class_ids\\[0\\].*classes": broken(class_ids=lambda s: [torch.arange(7)] + s["class_ids"][1:]),
        "sigma": broken(sigma=float("inf")),
        "differ in length": broken(class_ids=lambda s: s["class_ids"][:2]),
    }
    for message, state in cases.items():
        fresh = DriftCompensator()
        with pytest.raises(ValueError, match=message):
            fresh.load_state_dict(state)
        assert fresh.num_stages == 0  # nothing half-loaded


# ----------------------------------------------------------------- learned drift (LDC-style maps)
from pml_mutual.drift import fit_linear_map  # noqa: E402


@given(n=st.integers(20, 60), dim=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_a_learned_map_recovers_a_linear_drift(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    a = torch.eye(dim) + 0.3 * torch.randn(dim, dim, generator=g)
    c = 0.1 * torch.randn(dim, generator=g)
    w, b = fit_linear_map(x, x @ a + c)
    # the smallest ridge (1e-6 of the mean eigenvalue) wins on exact data: W = A + O(λ/σ_min)
    scale = torch.linalg.svdvals(x - x.mean(0)).min().item() ** 2
    tol = 1e-3 + 2e-6 * (x - x.mean(0)).pow(2).sum().item() / dim / max(scale, 1e-12) * a.abs().max().item()
    assert torch.allclose(w, a, atol=tol) and torch.allclose(b, c, atol=tol)


@given(n=st.integers(1, 40), dim=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_a_learned_map_is_the_identity_when_nothing_changed_and_finite_when_rank_deficient(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w, b = fit_linear_map(x, x)
    assert torch.allclose(w, torch.eye(dim), atol=1e-5) and torch.allclose(b, torch.zeros(dim), atol=1e-5)
    w, b = fit_linear_map(x, torch.randn(n, dim, generator=g))  # n < D included: ridge keeps it solvable
    assert torch.isfinite(w).all() and torch.isfinite(b).all()


def test_learned_mode_virtual_features_are_the_maps_and_the_loss_sums_them():
    g = torch.Generator().manual_seed(0)
    comp = DriftCompensator(mode="learned")
    maps = [torch.eye(4) + 0.2 * torch.randn(4, 4, generator=g) for _ in range(2)]
    models = [torch.eye(4), maps[0], maps[0] @ maps[1]]  # F_s(x) = x @ models[s]
    for s in range(3):
        x = torch.randn(40, 4, generator=g)
        comp.add_stage(x @ models[s], torch.arange(10 * s, 10 * s + 4).repeat(10))
        for t in comp.stages_to_measure():
            comp.update_drift(x @ models[t], x @ models[s], stage=t)
    assert comp.stages_to_measure() == [0, 1]
    probe = torch.randn(6, 4, generator=g)
    teacher = probe @ models[2]
    virt = comp.virtual_features(teacher)
    for t in range(2):  # F_t of the same images, from the teacher feature alone (re-normalised)
        assert torch.allclose(virt[t], F.normalize(probe @ models[t], dim=1), atol=1e-3)
    student = torch.randn(6, 4, requires_grad=True)
    loss = GramCorrelationLoss()
    want = loss(student, ref_emb=teacher) + sum(loss(student, ref_emb=v) for v in virt)
    assert GramCorrelationLoss().sum_over_teachers(
        student, [teacher, comp.virtual_feature_stack(teacher)]
    ).item() == pytest.approx(want.item(), rel=1e-5)
    other = DriftCompensator(mode="learned")
    other.load_state_dict(comp.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.virtual_features(teacher), virt))
    state = comp.state_dict()
    state["maps"][0] = [torch.full((4, 4), float("nan")), torch.zeros(4)]
    with pytest.raises(ValueError, match=r"maps\[0\].*NaN"):
        DriftCompensator(mode="learned").load_state_dict(state)


@given(stages=st.integers(2, 5), dim=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_learned_chained_composes_step_maps_into_the_direct_maps(stages, dim, seed):
    """With linear models F_s(x) = x A_s, the maps composed stage to stage (previous model only) are the
    maps fitted against every earlier model: same virtual features, same gallery updates."""
    g = torch.Generator().manual_seed(seed)
    models = [torch.eye(dim)]
    for _ in range(stages - 1):
        models.append(models[-1] @ (torch.eye(dim) + 0.1 * torch.randn(dim, dim, generator=g)))
    comps = {m: DriftCompensator(mode=m) for m in ("learned", "learned_chained")}
    for s in range(stages):
        x = torch.randn(60, dim, generator=g)
        for comp in comps.values():
            comp.add_stage(x @ models[s], torch.arange(10 * s, 10 * s + 4).repeat(15))
            for t in comp.stages_to_measure():
                comp.update_drift(x @ models[t], x @ models[s], stage=t)
    assert comps["learned_chained"].stages_to_measure() == [stages - 2]
    assert comps["learned"].stages_to_measure() == list(range(stages - 1))
    probe = torch.randn(7, dim, generator=g)
    direct, chained = (c.virtual_feature_stack(probe @ models[-1]) for c in comps.values())
    assert torch.allclose(chained, direct, atol=1e-3)
    for t in range(stages - 1):
        want = comps["learned"].update_gallery(probe @ models[t], t, "learned")
        assert torch.allclose(
            comps["learned_chained"].update_gallery(probe @ models[t], t, "learned"), want, atol=1e-3
        )
        assert torch.allclose(
            comps["learned_chained"].prototype_drifts[t], comps["learned"].prototype_drifts[t], atol=1e-3
        )
    with pytest.raises(ValueError, match="previous stage"):
        comps["learned_chained"].update_drift(probe, probe, stage=0 if stages > 2 else 5)


# ----------------------------------------------------------------- gallery update (stored embeddings, no
# images)
def test_gallery_update_by_translation_is_exact_for_a_translated_model():
    comp = DriftCompensator(mode="direct", normalize=False)
    models = [torch.zeros(4), torch.tensor([0.1, 0.0, -0.2, 0.05])]
    models.append(models[1] + torch.tensor([0.0, 0.3, 0.1, 0.0]))
    for i in range(3):
        x, y = clustered(3, 6, 4, seed=i)
        comp.add_stage(x + models[i], y + 10 * i)
        for t in comp.stages_to_measure():
            comp.update_drift(x + models[t], x + models[i], stage=t)
    probe, _ = clustered(3, 2, 4, seed=9)
    for t in range(3):
        moved = comp.update_gallery(probe + models[t], stage=t)
        assert torch.allclose(moved, probe + models[2], atol=1e-5)
    with pytest.raises(ValueError, match="learned"):
        comp.update_gallery(probe, stage=0, method="learned")


def test_gallery_update_by_the_learned_map_is_exact_for_a_linear_drift():
    g = torch.Generator().manual_seed(1)
    comp = DriftCompensator(mode="learned")
    models = [torch.eye(4)]
    for _ in range(2):
        models.append(models[-1] @ (torch.eye(4) + 0.2 * torch.randn(4, 4, generator=g)))
    for s in range(3):
        x = torch.randn(40, 4, generator=g)
        comp.add_stage(x @ models[s], torch.arange(10 * s, 10 * s + 4).repeat(10))
        for t in comp.stages_to_measure():
            comp.update_drift(x @ models[t], x @ models[s], stage=t)
    probe = torch.randn(7, 4, generator=g)
    for t in range(2):
        moved = comp.update_gallery(probe @ models[t], stage=t, method="learned")
        assert torch.allclose(moved, F.normalize(probe @ models[2], dim=1), atol=1e-3)
    restored = DriftCompensator(mode="learned")
    restored.load_state_dict(comp.state_dict())
    assert torch.equal(restored.update_gallery(probe, 0, "learned"), comp.update_gallery(probe, 0, "learned"))


def test_arguments_are_checked_with_messages_that_say_what_to_pass():
    import numpy as np

    from pml_mutual.evaluation import stage_recalls

    for kw in (dict(eps=0), dict(eps=float("nan")), dict(sigma=float("inf")), dict(sigma=True)):
        with pytest.raises(ValueError, match=r"must be a finite number > 0"):
            DriftCompensator(**kw)
    g = torch.Generator().manual_seed(0)
    comp = DriftCompensator(mode="direct")
    labels = torch.arange(12) % 3
    comp.add_stage(torch.randn(12, 4, generator=g), labels)
    comp.add_stage(torch.randn(12, 4, generator=g), labels + 3)
    comp.update_drift(torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g), stage=0)
    x = torch.randn(5, 4, generator=g)
    assert comp.update_gallery(x, np.int64(0)).shape == (5, 4)  # numpy integers are stages too
    for stage in (True, 0.5, "0", None, 2, -1):
        with pytest.raises(ValueError, match="stage must be"):
            comp.update_gallery(x, stage)
    with pytest.raises(ValueError, match="method must be 'translation' or 'learned'"):
        comp.update_gallery(x, 0, method="bogus")
    with pytest.raises(ValueError, match="5 columns"):
        comp.update_gallery(torch.randn(5, 5), 0)
    none = DriftCompensator(mode="none")
    none.add_stage(torch.randn(12, 4, generator=g), labels)
    none.add_stage(torch.randn(12, 4, generator=g), labels + 3)
    with pytest.raises(ValueError, match="mode='none' measures no drift"):
        none.update_gallery(x, 0)
    emb, lab = torch.randn(24, 4, generator=g), torch.cat([labels, labels + 3])
    for stage in (5, -1, 0.5):
        with pytest.raises(
            ValueError, match=r"stage must be an integer of the class → stage map's stages \(0–1\)"
        ):
            stage_recalls(emb, lab, {c: c // 3 for c in range(6)}, stage, ks=(1,))
