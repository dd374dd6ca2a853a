"""The FAISS and torch kNN backends: same neighbours, same recalls, O(chunk·N) memory under ties."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pml_mutual.evaluation import knn, nearest_neighbours, recall_at_k


def exact_data(rng, n, dim):
    """Rows with four entries ±0.5 (unit norm): every inner product is a multiple of 0.25, exact in
    float32 whatever the summation order, so both backends see the same scores and the same ties."""
    x = np.zeros((n, dim), dtype=np.float32)
    for i in range(n):
        cols = rng.choice(dim, size=4, replace=False)
        x[i, cols] = rng.choice([-0.5, 0.5], size=4)
    return x


def stable_sort_reference(emb, k):
    """Each row's k nearest other rows by a stable full sort of exact (float64) scores."""
    sim = emb.astype(np.float64) @ emb.astype(np.float64).T
    out = []
    for q in range(len(emb)):
        others = np.delete(np.arange(len(emb)), q)
        out.append(others[np.argsort(-sim[q, others], kind="stable")][:k])
    return np.array(out, dtype=np.int64).reshape(len(emb), k)


@given(
    st.integers(2, 70), st.integers(4, 9), st.integers(1, 12), st.integers(1, 9), st.integers(0, 2**31 - 1)
)
def test_backends_return_the_stable_sort_neighbours(n, dim, k, chunk, seed):
    emb = exact_data(np.random.default_rng(seed), n, dim)  # few distinct rows: ties everywhere
    want = stable_sort_reference(emb, min(k, n - 1))
    for backend in ("faiss", "torch"):
        for chunk_size in (None, chunk):
            got = nearest_neighbours(emb, k, chunk_size=chunk_size, backend=backend)
            np.testing.assert_array_equal(got, want, err_msg=f"{backend}, chunk_size={chunk_size}")


@given(st.integers(3, 80), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_backends_agree_on_recall_with_duplicates_and_lone_queries(n, n_classes, seed):
    rng = np.random.default_rng(seed)
    emb = exact_data(rng, n, 6)
    emb[: n // 3] = emb[0]  # a block of exact duplicates
    labels = rng.integers(0, n_classes, n)
    labels[-1] = n_classes  # a lone query: a miss for every K
    ks = (1, 2, 4, 8)
    faiss_r = recall_at_k(emb, labels, ks, backend="faiss", chunk_size=5)
    torch_r = recall_at_k(emb, labels, ks, backend="torch", chunk_size=7)
    assert faiss_r == torch_r
    assert max(torch_r.values()) <= (n - 1) / n  # the lone query never counts as a hit


def test_a_collapsed_model_keeps_the_lower_index_rule_in_small_chunks():
    n = 3000
    emb = np.tile(np.array([[0.6, 0.8]], dtype=np.float32), (n, 1))
    for backend in ("faiss", "torch"):
        nbrs = nearest_neighbours(emb, 4, backend=backend, chunk_size=256)
        assert nbrs[0].tolist() == [1, 2, 3, 4]
        assert nbrs[2].tolist() == [0, 1, 3, 4]
        assert nbrs[n - 1].tolist() == [0, 1, 2, 3]


def test_tie_resolution_memory_follows_the_chunk_not_n_squared():
    # On the CPU the automatic chunk is scored in column blocks: chunk × block × (bytes per score) stays
    # inside the budget whatever N; a device scoring whole rows gets a chunk that fits chunk × N in it.
    cpu = torch.device("cpu")
    for n in (1_000, 88_000, 1_000_000):
        rows, block = knn.auto_chunk_rows(n, cpu), knn.column_block(cpu)
        assert 1 <= rows <= n and block is not None
        assert rows * min(n, block) * knn._BYTES_PER_SCORE <= knn._CPU_BUDGET
    assert knn.column_block(torch.device("cuda")) is None


@given(
    st.integers(2, 60),
    st.integers(4, 9),
    st.integers(1, 12),
    st.integers(1, 70),
    st.integers(1, 60),
    st.integers(0, 2**31 - 1),
)
def test_the_kernel_in_column_blocks_returns_the_stable_sort_neighbours(n, dim, k, block, rows, seed):
    """Blocks of any width (one column to more than N), query chunks of any size: each block's top
    k + 1 merged, and a tie continuing past k settled by scanning recomputed blocks, give the stable sort."""
    rng = np.random.default_rng(seed)
    emb = exact_data(rng, n, dim)
    if n > 4:
        emb[: n // 2] = emb[0]  # a collapsed half: ties wider than any small block
    k = min(k, n - 1)
    want = stable_sort_reference(emb, k)
    x = torch.from_numpy(emb)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        got = knn.exact_topk(x[start:stop], x, torch.arange(start, stop), k, column_block=block)
        np.testing.assert_array_equal(
            got.numpy(), want[start:stop], err_msg=f"block {block}, rows {start}:{stop}"
        )


def test_blocked_tie_scan_leaves_rows_once_settled_and_scans_the_rest_in_blocks():
    """N beyond the tie scan's first 1,024 columns, blocks of 300: rows settled on the first columns
    (a collapsed majority) and rows whose tied items lie only in later blocks (a duplicate group at the
    end)."""
    rng = np.random.default_rng(1)
    n, k = 2600, 8
    emb = exact_data(rng, n, 8)
    emb[:1500] = emb[0]
    emb[-20:] = emb[-1]
    emb[1200:1203] = emb[-1]  # three members between the first columns and the end
    want = stable_sort_reference(emb, k)
    x = torch.from_numpy(emb)
    for rows in (slice(0, 40), slice(1190, 1210), slice(n - 25, n)):
        idx = torch.arange(n)[rows]
        got = knn.exact_topk(x[idx], x, idx, k, column_block=300)
        np.testing.assert_array_equal(got.numpy(), want[rows])


def test_backend_choice_and_errors():
    assert knn.resolve_backend("torch", device="cpu") == ("torch", torch.device("cpu"))
    assert knn.resolve_backend("faiss")[0] == "faiss"
    if not torch.cuda.is_available() and not knn.faiss_has_gpu():
        assert knn.resolve_backend("auto")[0] == "faiss"  # CPU: FAISS, as before
        with pytest.raises(RuntimeError, match="GPU"):
            knn.resolve_backend("auto", use_gpu=True)
        with pytest.raises(RuntimeError, match="CUDA"):
            knn.resolve_backend("torch", use_gpu=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        recall_at_k(np.eye(3, dtype=np.float32), np.array([0, 0, 1]), backend="annoy")


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
def test_chunk_size_must_be_a_positive_integer(chunk_size):
    emb, labels = np.eye(4, dtype=np.float32), np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        recall_at_k(emb, labels, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        nearest_neighbours(emb, 2, chunk_size=chunk_size)


def test_bare_integer_ks_names_the_problem():
    with pytest.raises(TypeError, match="sequence of positive integers"):
        recall_at_k(np.eye(4, dtype=np.float32), np.array([0, 0, 1, 1]), ks=4)


@pytest.mark.parametrize("chunk_size", [None, 700])
def test_wide_ties_settled_in_the_first_columns_or_scanned_in_full(chunk_size):
    """N beyond the tie kernel's first block of columns: rows whose tie is settled among the first
    columns (a collapsed majority), rows whose tied items all lie beyond them (a duplicate group at
    the end), and distinct rows — all equal to the stable sort, on both backends, including the FAISS
    path's switch to the exact kernel on tie-heavy data."""
    rng = np.random.default_rng(0)
    n, k = 2600, 8
    emb = exact_data(rng, n, 8)
    emb[:1800] = emb[0]  # collapsed majority: settled on the first block
    emb[-30:] = emb[-1]  # a duplicate group beyond the first block: scanned in full
    emb[1000:1003] = emb[-1]  # ... with three members inside it (fewer than k): still scanned in full
    want = stable_sort_reference(emb, k)
    for backend in ("faiss", "torch"):
        got = nearest_neighbours(emb, k, chunk_size=chunk_size, backend=backend)
        np.testing.assert_array_equal(got, want, err_msg=backend)


@pytest.fixture
def matmul_precision_restored():
    """The process-wide float32 matmul settings, as they were before the test."""
    backends = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    before = [b.fp32_precision for b in backends]
    yield
    for b, value in zip(backends, before):
        b.fp32_precision = value


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_ieee_matmul_scope_sets_float32_and_restores_either_api(device, matmul_precision_restored):
    backend = torch.backends.cuda.matmul if device == "cuda" else torch.backends.mkldnn.matmul
    torch.set_float32_matmul_precision("medium")  # the legacy API: TF32 on CUDA, bfloat16 through oneDNN
    set_before = backend.fp32_precision
    assert set_before != "ieee"
    with pytest.raises(KeyError):
        with knn.ieee_float32_matmul(torch.device(device)):
            assert backend.fp32_precision == "ieee"
            raise KeyError("restored on the way out too")
    assert backend.fp32_precision == set_before and torch.get_float32_matmul_precision() == "medium"
    backend.fp32_precision = "tf32" if device == "cuda" else "bf16"  # the newer API
    with knn.ieee_float32_matmul(torch.device(device)):
        assert backend.fp32_precision == "ieee"
    assert backend.fp32_precision == ("tf32" if device == "cuda" else "bf16")


def test_torch_kernel_scores_in_float32_under_a_reduced_matmul_precision(
    monkeypatch, matmul_precision_restored
):
    """``set_float32_matmul_precision("medium")`` makes float32 CPU matmuls bfloat16 on CPUs with AMX /
    AVX-512 BF16 (errors of ~0.1 on unit-variance products here): the kNN kernel must not inherit it."""
    emb = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    want = nearest_neighbours(emb, 8, backend="torch")
    torch.set_float32_matmul_precision("medium")
    seen, matmul = [], torch.matmul

    def recording_matmul(*args, **kwargs):
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        return matmul(*args, **kwargs)

    monkeypatch.setattr(torch, "matmul", recording_matmul)
    got = nearest_neighbours(emb, 8, backend="torch")
    assert seen and set(seen) == {"ieee"}
    np.testing.assert_array_equal(got, want)  # the same float32 arithmetic: bit-equal scores
    assert torch.get_float32_matmul_precision() == "medium"


def test_ieee_matmul_scope_on_a_torch_without_fp32_precision_uses_allow_tf32(monkeypatch):
    from types import SimpleNamespace

    old_cuda = SimpleNamespace(allow_tf32=True)  # torch < 2.9 has only this flag
    monkeypatch.setattr(torch.backends.cuda, "matmul", old_cuda)
    monkeypatch.setattr(torch.backends.mkldnn, "matmul", SimpleNamespace(), raising=False)
    with knn.ieee_float32_matmul(torch.device("cuda")):
        assert old_cuda.allow_tf32 is False
    assert old_cuda.allow_tf32 is True
    with knn.ieee_float32_matmul(torch.device("cpu")):  # nothing to set there
        pass
