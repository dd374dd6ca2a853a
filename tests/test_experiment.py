"""Experiments over finished runs: the fidelity of the virtual features against the real earlier models."""

import math

import numpy as np
import pytest

from pml_mutual import OnlineConfig
from pml_mutual.data import load_digits_splits, stage_assignment
from pml_mutual.evaluation import gap_closed
from pml_mutual.experiment import measure_fidelity, run_methods
from pml_mutual.models import EmbeddingMLP


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    train, test = load_digits_splits()
    configs = {
        m: OnlineConfig(
            method=m,
            epochs=1,
            iterations_per_epoch=20,
            batch_size=16,
            m_per_class=8,
            lr=1e-3,
            weight_decay=0.0,
            device="cpu",
            drift_mode="learned",
        )
        for m in ("initial", "ours")
    }
    _, learners = run_methods(
        EmbeddingMLP,
        train,
        test,
        stage_assignment(range(10), 4, 2),
        configs,
        tmp_path_factory.mktemp("runs"),
        return_learners=True,
    )
    return learners["ours"]


def test_fidelity_rows_bracket_every_mode_between_the_teacher_and_the_real_model(finished):
    rows = measure_fidelity(finished, modes=("none", "direct", "learned"))
    assert [(r["after_stage"], r["stage"]) for r in rows] == [(i, b) for i in (1, 2, 3) for b in range(i)]
    for r in rows:
        assert r["real"]["cosine"] == pytest.approx(1.0, abs=1e-5)  # the ceiling is the model itself
        # Eq. 6's extra targets: the teacher's own Gram target is 0 away from itself, any other estimate ≥ 0
        assert abs(r["teacher"]["gram_kl"]) < 1e-6 and r["real"]["gram_kl"] > 0
        assert all(r[m]["gram_kl"] >= -1e-6 for m in ("none", "direct", "learned"))
        # zero drift distils from the teacher feature itself (re-normalised: float32 rounding, ~1e-7 per
        # value)
        assert r["none"]["cosine"] == pytest.approx(r["teacher"]["cosine"], rel=1e-6)
        # a nearest neighbour may flip only on a tie within that rounding: at most a query of the smallest
        # stage (2 classes × ~90 test images)
        assert r["none"]["recall@1"] == pytest.approx(r["teacher"]["recall@1"], abs=1 / 170)
        for mode in ("direct", "learned"):
            assert -1.0 <= r[mode]["cosine"] <= 1.0 and 0.0 <= r[mode]["recall@1"] <= 1.0
    # what the learned maps are for: closer to the real features than the teacher feature is
    assert np.mean([gap_closed(r, "learned") for r in rows]) > 0.5
    assert all(math.isfinite(gap_closed(r, "direct")) for r in rows)


def test_a_gallery_left_as_stored_moved_or_re_embedded(finished):
    from pml_mutual.experiment import measure_gallery_update

    rows = measure_gallery_update(finished)
    assert [r["after_stage"] for r in rows] == [1, 2, 3]
    for r in rows:
        for k in ("stored", "translation", "learned", "reembedded"):
            assert 0.0 <= r[k] <= 1.0
        assert r["reembed_seconds"] > 0 and r["learned_seconds"] >= 0
    # the learned forward maps bring an old gallery closer to the new model's space than leaving it
    assert np.mean([r["learned"] - r["stored"] for r in rows]) > 0.1
