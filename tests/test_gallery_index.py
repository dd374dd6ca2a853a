import faiss
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_mutual import DriftCompensator
from pml_mutual.gallery_index import update_index


def learned_compensator(stages: int, d: int, seed: int) -> DriftCompensator:
    """A learned-mode compensator fitted on a known linear drift between consecutive models."""
    g = torch.Generator().manual_seed(seed)
    comp = DriftCompensator(mode="learned")
    feats = [torch.randn(60, d, generator=g)]
    for _ in range(1, stages):
        feats.append(feats[-1] @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)))
    labels = torch.arange(60) % 6
    for s in range(stages):
        comp.add_stage(feats[s], labels + 6 * s)
        for t in comp.stages_to_measure():
            comp.update_drift(feats[t], feats[s], stage=t)
    return comp


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(2, 6), st.integers(1, 50), st.integers(1, 7), st.integers(0, 2**31 - 1))
def test_update_index_equals_recomputing_the_vectors_by_the_map(stages, d, n, batch, seed):
    comp = learned_compensator(stages, d, seed)
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, d)).astype(np.float32)
    stage_of = rng.integers(0, stages, n)
    want = vectors.copy()
    for s in range(stages):
        rows = stage_of == s
        if rows.any():
            want[rows] = comp.update_gallery(torch.from_numpy(vectors[rows]), s, method="learned").numpy()
    array = vectors.copy()
    report = update_index(array, stage_of, comp, batch_size=batch)
    np.testing.assert_allclose(array, want, rtol=0, atol=1e-6)  # the same map, batch rows in another order
    assert report["moved"] == int((stage_of != stages - 1).sum())
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(d))
    index.add_with_ids(vectors, ids)
    update_index(index, {int(i): int(s) for i, s in zip(ids, stage_of)}, comp, batch_size=batch)
    np.testing.assert_allclose(faiss.downcast_index(index.index).reconstruct_n(0, n), want, rtol=0, atol=1e-6)
    tensor = torch.from_numpy(vectors.copy())
    update_index(tensor, stage_of, comp, batch_size=batch)
    np.testing.assert_allclose(tensor.numpy(), want, rtol=0, atol=1e-6)


def test_bad_targets_and_stages_are_refused():
    comp = learned_compensator(2, 3, 0)
    with pytest.raises(TypeError, match="float32"):
        update_index(np.zeros((2, 3)), [0, 1], comp)
    with pytest.raises(ValueError, match="one stage per stored vector"):
        update_index(np.zeros((2, 3), np.float32), [0], comp)
    with pytest.raises(TypeError, match="over a flat index"):
        update_index(faiss.IndexIDMap(faiss.IndexHNSWFlat(3, 4)), {}, comp)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(3))
    index.add_with_ids(np.ones((2, 3), np.float32), np.array([5, 6], dtype=np.int64))
    with pytest.raises(ValueError, match=r"ids \[6\] of the index have no stage"):
        update_index(index, {5: 0}, comp)
