import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pml_mutual.evaluation import nearest_neighbours, recall_at_k


def brute_force_recall(emb, labels, ks):
    """Exact Recall@K by a full similarity matrix; self excluded by index; ties → lower index (stable
    sort)."""
    x = emb.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = (x.astype(np.float32) @ x.astype(np.float32).T).astype(np.float64)
    n = len(x)
    out = {}
    for k in ks:
        hits = 0
        for q in range(n):
            others = np.array([j for j in range(n) if j != q], dtype=np.int64)
            order = others[np.argsort(-sim[q, others], kind="stable")]
            hits += bool((labels[order[:k]] == labels[q]).any())
        out[k] = hits / n
    return out


@given(
    st.integers(1, 60),
    st.integers(1, 8),
    st.integers(2, 12),
    st.lists(st.integers(1, 20), min_size=1, max_size=4),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_matches_brute_force(n, n_classes, dim, ks, seed, duplicate):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    labels = rng.integers(0, n_classes, n)
    if duplicate and n > 3:
        # Exact duplicates of one row, with its label: ties that must not be mistaken for the query itself.
        emb[1:4] = emb[0]
        labels[1:4] = labels[0]
    got = recall_at_k(emb, labels, ks, chunk_size=7)
    want = brute_force_recall(emb, labels, ks)
    assert got == pytest.approx(want)


def test_duplicates_are_excluded_by_index_not_by_rank():
    # Two identical items of different classes: dropping "the first neighbour" would drop the wrong one.
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    labels = np.array([0, 1, 1, 0])
    nbrs = nearest_neighbours(emb, 3)
    assert nbrs[0].tolist() == [1, 2, 3] and nbrs[1].tolist() == [0, 2, 3]
    assert recall_at_k(emb, labels, (1, 2)) == pytest.approx(brute_force_recall(emb, labels, (1, 2)))
    # Each item's only same-class partner is its exact duplicate: found whichever copy is the query.
    twins = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    assert recall_at_k(twins, np.array([0, 0, 1, 1]), (1,)) == {1: 1.0}


def test_single_item_class_counts_as_a_miss():
    emb = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]], dtype=np.float32)
    labels = np.array([0, 0, 1])
    assert recall_at_k(emb, labels, (1, 2)) == {1: pytest.approx(2 / 3), 2: pytest.approx(2 / 3)}


def test_n_smaller_than_k_and_single_item():
    emb = torch.randn(3, 4)
    labels = torch.tensor([0, 0, 1])
    r = recall_at_k(emb, labels, (1, 8))
    assert r[8] == pytest.approx(2 / 3)
    assert recall_at_k(torch.randn(1, 4), torch.tensor([0]), (1,)) == {1: 0.0}


def test_accepts_tensors_and_arrays_alike():
    emb = torch.randn(50, 6)
    labels = torch.randint(0, 5, (50,))
    assert recall_at_k(emb, labels) == recall_at_k(emb.numpy(), labels.numpy())


def test_agrees_with_pml_precision_at_1():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((10, 16))
    labels = rng.integers(0, 10, 400)
    emb = (centres[labels] + 0.8 * rng.standard_normal((400, 16))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    calc = AccuracyCalculator(include=("precision_at_1",), k=1)
    pml = calc.get_accuracy(torch.tensor(emb), torch.tensor(labels), ref_includes_query=True)[
        "precision_at_1"
    ]
    ours = recall_at_k(emb, labels, (1,))[1]
    assert 0.2 < ours < 1.0  # a non-trivial case
    assert ours == pytest.approx(pml, abs=1e-9)


@pytest.mark.parametrize(
    "emb,labels,ks,err,match",
    [
        (np.ones((3, 2)), np.array([0, 1]), (1,), ValueError, "one entry per embedding"),
        (np.array([[np.nan, 1.0], [1.0, 0.0]]), np.array([0, 1]), (1,), ValueError, "NaN"),
        (np.zeros((0, 2)), np.zeros(0, dtype=int), (1,), ValueError, "empty"),
        (np.ones((3, 2)), np.array([0, 1, 1]), (0,), ValueError, "positive integer"),
        (np.ones((3, 2)), np.array([0, 1, 1]), (), ValueError, "at least one"),
        (np.ones(3), np.array([0, 1, 1]), (1,), ValueError, "2-D"),
        (np.ones((3, 2)), np.array([0.0, 1.0, 1.0]), (1,), TypeError, "integers"),
    ],
)
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_bad_input(emb, labels, ks, err, match, backend):
    with pytest.raises(err, match=match):
        recall_at_k(emb, labels, ks, backend=backend)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@given(st.integers(2, 40), st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_heavy_ties_with_mixed_labels_follow_lower_index_rule(backend, n_dup, k, seed):
    # Many identical rows of different classes: which neighbours are "nearest" is decided by index alone.
    rng = np.random.default_rng(seed)
    emb = np.concatenate([np.repeat(rng.standard_normal((1, 5)), n_dup, 0), rng.standard_normal((10, 5))])
    labels = rng.integers(0, 3, len(emb))
    assert recall_at_k(emb, labels, (1, k), chunk_size=16, backend=backend) == pytest.approx(
        brute_force_recall(emb, labels, (1, k))
    )


@given(st.integers(3, 60), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_cross_model_recall_matches_a_brute_force_reference(n, n_classes, seed):
    """Queries of one model against a gallery of another: row i is excluded from its own neighbours by
    index; equal to recall_at_k when both are the same embeddings."""
    from pml_mutual.evaluation import cross_recall_at_k

    rng = np.random.default_rng(seed)
    q = rng.choice([-0.5, 0.5], size=(n, 4)).astype(np.float32)  # unit rows, exact scores, many ties
    g = rng.choice([-0.5, 0.5], size=(n, 4)).astype(np.float32)
    labels = rng.integers(0, n_classes, n)
    ks = (1, 2, 4)
    sim = q.astype(np.float64) @ g.astype(np.float64).T
    want = {}
    for k in ks:
        hits = 0
        for i in range(n):
            others = np.delete(np.arange(n), i)
            order = others[np.argsort(-sim[i, others], kind="stable")][:k]
            hits += bool((labels[order] == labels[i]).any())
        want[k] = hits / n
    assert cross_recall_at_k(q, g, labels, ks, chunk_size=7) == want
    assert cross_recall_at_k(q, q, labels, ks) == recall_at_k(q, labels, ks, backend="torch")
