import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_mutual.evaluation import recall_at_k


def brute_scores(x: np.ndarray, distance: str) -> np.ndarray:
    x = x.astype(np.float64)
    if distance == "euclidean":
        score = -((x[:, None] - x[None]) ** 2).sum(-1)
    else:
        if distance == "cosine":
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
        score = x @ x.T
    np.fill_diagonal(score, -np.inf)
    return score


def brute_force(x: np.ndarray, y: np.ndarray, ks, distance: str) -> dict[int, float]:
    score = brute_scores(x, distance)
    order = np.argsort(-score, axis=1, kind="stable")[
        :, : len(y) - 1
    ]  # ties → lower index; self (−inf) last, cut
    return {k: float(np.mean([(y[order[i, :k]] == y[i]).any() for i in range(len(y))])) for k in ks}


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 80),
    st.integers(1, 6),
    st.sampled_from(["cosine", "inner_product", "euclidean"]),
    st.integers(0, 2**31 - 1),
)
def test_every_distance_equals_a_brute_force_search(n, d, distance, seed):
    rng = np.random.default_rng(seed)
    # rows of very different norms: where the three rankings part
    x = (rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=(n, 1))).astype(np.float32)
    y = rng.integers(0, 4, n)
    # the kernels score in float32 (cosine, inner product) or by another float64 formula (euclidean): the
    # rankings may differ from this float64 search only where two scores of a row nearly tie
    score = brute_scores(x, distance)
    scale = np.abs(score[np.isfinite(score)]).max() + 1e-30
    gaps = np.diff(np.sort(score, axis=1), axis=1)
    assume(not ((gaps > 0) & (gaps < 1e-5 * scale)).any())
    assert recall_at_k(x, y, (1, 2, 4), distance=distance) == brute_force(x, y, (1, 2, 4), distance)


def test_euclidean_recall_at_1_is_pml_accuracy_calculators_precision_at_1():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, 8)) * rng.uniform(0.1, 5, size=(300, 1))).astype(np.float32)
    y = np.repeat(np.arange(30), 10)  # every class has other items: PML leaves out no query
    pml = AccuracyCalculator(include=("precision_at_1",), k=1).get_accuracy(torch.tensor(x), torch.tensor(y))
    assert recall_at_k(x, y, (1,), distance="euclidean")[1] == pytest.approx(pml["precision_at_1"], abs=1e-12)
    # cosine: another number
    assert recall_at_k(x, y, (1,))[1] != recall_at_k(x, y, (1,), distance="euclidean")[1]


def test_an_unknown_distance_is_refused():
    with pytest.raises(ValueError, match="distance must be one of"):
        recall_at_k(np.eye(3, dtype=np.float32), np.arange(3), (1,), distance="l2")


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_rows_of_extreme_scale_keep_their_neighbours_and_zero_rows_are_warned(backend):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = rng.integers(0, 10, 300)
    base = recall_at_k(x, y, (1, 2), backend=backend)
    scaled = x.copy()
    scaled[:2] *= 1e20  # 0e3a6e5: these rows' squared norms overflowed float32 and they got other neighbours
    scaled[5] *= 1e-30
    assert recall_at_k(scaled, y, (1, 2), backend=backend) == base
    zero = x.copy()
    zero[0] = 0
    with pytest.warns(RuntimeWarning, match="1 embedding row"):
        recall_at_k(zero, y, (1,), backend=backend)


def test_complex_and_dimensionless_embeddings_are_refused():
    with pytest.raises(TypeError, match="must be real"):
        recall_at_k(np.ones((3, 2), dtype=np.complex64), np.arange(3), (1,))
    with pytest.raises(TypeError, match="must be real"):
        recall_at_k(torch.ones(3, 2, dtype=torch.complex64), np.arange(3), (1,))
    with pytest.raises(ValueError, match="no dimension"):
        recall_at_k(np.zeros((3, 0), dtype=np.float32), np.arange(3), (1,))
