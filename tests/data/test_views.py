"""Augmented views for drift measurement: AugmentedViews, the maps fitted on them, and
OnlineConfig(drift_views=...) in the stage loop."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset, TensorDataset

from pml_mutual import DriftCompensator, OnlineConfig, OnlineLearner
from pml_mutual.data import load_digits_splits, stage_assignment
from pml_mutual.data.views import AugmentedViews, check_views_differ
from pml_mutual.drift import fit_linear_map
from pml_mutual.evaluation import extract_embeddings
from pml_mutual.models import EmbeddingMLP


class Jittered(Dataset):
    """``(x + σ·noise, y)``: a random transform drawing from torch's generator, as torchvision's do."""

    def __init__(self, base: TensorDataset, sigma: float = 0.5):
        self.base, self.sigma = base, sigma
        self.targets = base.tensors[1]

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + self.sigma * torch.randn(x.shape), y


def test_views_are_seeded_by_position_and_leave_the_callers_generator_alone():
    data = Jittered(TensorDataset(torch.zeros(5, 3), torch.arange(5)))
    views = AugmentedViews(data, 3, seed=(7, 1))
    assert len(views) == 15
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    forward = [views[j][0] for j in range(15)]
    assert torch.equal(torch.random.get_rng_state(), before)
    backward = [views[j][0] for j in reversed(range(15))][::-1]  # any order: the same draws
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    assert [int(views[j][1]) for j in range(15)] == [0, 1, 2, 3, 4] * 3
    assert not torch.equal(forward[0], forward[5])  # item 0's views 0 and 1 differ
    assert not torch.equal(forward[0], AugmentedViews(data, 3, seed=(7, 2))[0][0])
    with pytest.raises(ValueError, match="views must be an integer ≥ 1"):
        AugmentedViews(data, 0)
    with pytest.raises(IndexError):
        views[15]


def test_a_deterministic_transform_is_refused_and_a_random_one_passes():
    plain = TensorDataset(torch.randn(8, 3), torch.arange(8))
    with pytest.raises(ValueError, match=r"stage-one.*same input twice.*drift_views=0"):
        check_views_differ(plain, "stage-one")
    check_views_differ(Jittered(plain), "stage-one")


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.05, 0.4))
def test_a_map_fitted_on_views_recovers_a_known_linear_drift_that_the_images_alone_cannot(seed, scale):
    # F_old(x) = x A, F_new(x) = F_old(x) M + c. With fewer images than dimensions, the images alone leave
    # directions of M undetermined (the fit shrinks them to the identity); their views span the space.
    dim, images, views = 12, 5, 8
    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    m = torch.eye(dim) + scale * torch.randn(dim, dim, generator=g)
    c = 0.1 * torch.randn(dim, generator=g)
    old_model = torch.nn.Linear(dim, dim, bias=False)
    old_model.weight.data = a.T.contiguous()
    new_model = torch.nn.Sequential(old_model, torch.nn.Linear(dim, dim))
    new_model[1].weight.data, new_model[1].bias.data = m.T.contiguous(), c
    data = Jittered(TensorDataset(torch.randn(images, dim, generator=g), torch.arange(images)))

    def fitted(dataset):
        (old, new), _ = extract_embeddings([old_model, new_model], dataset, batch_size=64)
        return fit_linear_map(old, new)

    w, b = fitted(AugmentedViews(data, views, seed=(seed,)))
    # float32 features, float64 solve on a well-conditioned scatter: the ridge's relative bias (≤ 1e-6 of
    # the mean eigenvalue) and float32 rounding are far below 1e-3
    assert torch.allclose(w, m, atol=1e-3) and torch.allclose(b, c, atol=1e-3)
    w_images, _ = fitted(AugmentedViews(data, 1, seed=(seed,)))
    assert (w_images - m).norm() > 10 * (w - m).norm()

    comp = DriftCompensator(mode="learned")  # the same fit through the compensator, forward and back
    (old, new), labels = extract_embeddings([old_model, new_model], AugmentedViews(data, views, (seed,)))
    comp.add_stage(old[:images], labels[:images])
    comp.add_stage(new[:images], labels[:images] + images)
    comp.update_drift(old, new, stage=0)
    assert torch.allclose(comp.forward_maps[0][0], m, atol=1e-3)


C2S = stage_assignment(range(10), 4, 3)


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits()


def learner_for(digits, run_dir, train=None, **kw):
    base_train, test = digits
    cfg = OnlineConfig(
        **{
            **dict(epochs=1, iterations_per_epoch=2, batch_size=16, m_per_class=8, lr=1e-3, device="cpu"),
            **kw,
        }
    )
    return OnlineLearner.from_class_assignment(
        EmbeddingMLP,
        train if train is not None else base_train,
        test,
        C2S,
        config=cfg,
        run_dir=run_dir,
        quiet=True,
        prototype_dataset=base_train,
    )


def test_the_stage_loop_fits_its_maps_on_the_prototype_images_and_the_views(digits, tmp_path):
    jittered = Jittered(digits[0], sigma=0.3)
    learner = learner_for(digits, tmp_path, jittered, drift_mode="learned", drift_views=2)
    learner.run()
    assert learner.run_identity()["config"]["drift_views"] == 2
    comp = learner.compensator
    # what the learned maps after the last stage were fitted on, rebuilt by hand
    models = [learner.load_stage_model(s) for s in range(3)]
    protos = learner.prototype_stages[2]
    views = AugmentedViews(learner.train_stages[2], 2, seed=(learner.config.seed, 2))
    for t in (0, 1):
        (old_p, new_p), _ = extract_embeddings([models[t], models[2]], protos)
        (old_v, new_v), _ = extract_embeddings([models[t], models[2]], views)
        w, b = fit_linear_map(torch.cat([old_p, old_v]), torch.cat([new_p, new_v]))
        # the stage loop embeds in other batches: float32 features differ by rounding only
        assert torch.allclose(comp.forward_maps[t][0], w, atol=1e-4)
        assert torch.allclose(comp.forward_maps[t][1], b, atol=1e-4)
    # prototypes are the prototype images' class means, views excluded
    (feats, labels) = extract_embeddings(models[2], protos)
    assert torch.allclose(
        comp.stage_prototypes[2], torch.stack([feats[labels == c].mean(0) for c in (7, 8, 9)])
    )


def test_views_of_their_own_leave_training_as_it_is(digits, tmp_path):
    # training on the images as they are, views through a random transform of the user's (view_dataset=)
    plain = learner_for(digits, tmp_path / "plain", drift_mode="learned", drift_views=0)
    viewed_own = OnlineLearner.from_class_assignment(
        EmbeddingMLP,
        digits[0],
        digits[1],
        C2S,
        config=dataclasses.replace(plain.config, drift_views=3),
        run_dir=tmp_path / "own",
        quiet=True,
        view_dataset=Jittered(digits[0]),
    )
    assert "view" in viewed_own.run_identity()["data"] and "view" not in plain.run_identity()["data"]
    plain.run()
    viewed_own.run()
    first = [plain.load_stage_model(0).state_dict(), viewed_own.load_stage_model(0).state_dict()]
    assert all(torch.equal(first[0][k], first[1][k]) for k in first[0])  # stage 0 measures no drift
    (a, b) = (plain.compensator.forward_maps[0][0], viewed_own.compensator.forward_maps[0][0])
    assert not torch.allclose(a, b, atol=1e-4)  # the views joined stage 1's measurement


def test_views_that_change_nothing_are_refused_before_training(digits, tmp_path):
    with pytest.raises(ValueError, match=r"view dataset of stage 1 .* gave the same input twice"):
        learner_for(digits, tmp_path / "a", drift_views=2)  # TensorDataset: no random transform
    jittered = Jittered(digits[0])
    with pytest.raises(ValueError, match="drift_views=2 has no effect: method 'finetune'"):
        learner_for(digits, tmp_path / "b", jittered, method="finetune", drift_views=2)
    with pytest.raises(ValueError, match="drift_views=2 has no effect"):
        learner_for(digits, tmp_path / "c", jittered, drift_mode="none", drift_views=2)
    learner_for(digits, tmp_path / "d", jittered, method="finetune", drift_views=2, gallery_report=True)
    with pytest.raises(ValueError, match="drift_views must be at least 0"):
        OnlineConfig(drift_views=-1)
    assert "drift_views" not in learner_for(digits, tmp_path / "e").run_identity()["config"]
