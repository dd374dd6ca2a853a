import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_mutual.data.loaders import EmbeddingLoader
from pml_mutual.evaluation import (
    accuracy_matrix,
    average_forgetting,
    backward_transfer,
    extract_embeddings,
    load_json,
    recall_at_k,
    save_json,
    stage_recalls,
    summarize_run,
    to_markdown,
)
from pml_mutual.evaluation.results import stage_results_from_summary


def test_stage_recalls_split_old_new_all():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 10)
    emb = rng.standard_normal((60, 8)).astype(np.float32)
    c2s = {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    res = stage_recalls(emb, labels, c2s, stage=1, ks=(1, 2))
    old, new, seen = labels < 2, (labels >= 2) & (labels < 4), labels < 4
    assert res["old"] == recall_at_k(emb[old], labels[old], (1, 2))
    assert res["new"] == recall_at_k(emb[new], labels[new], (1, 2))
    assert res["all"] == recall_at_k(emb[seen], labels[seen], (1, 2))
    assert res["per_stage"] == [res["old"], res["new"]]
    assert stage_recalls(emb, labels, c2s, stage=0)["old"] is None
    with pytest.raises(ValueError, match="no stage"):
        stage_recalls(emb, labels, {0: 0}, stage=0)


HAND = [[0.9, None, None], [0.7, 0.8, None], [0.6, 0.75, 0.95]]


def test_forgetting_and_bwt_on_a_hand_made_matrix():
    # forgetting: stage 0: max(0.9, 0.7) − 0.6 = 0.3; stage 1: 0.8 − 0.75 = 0.05 → 0.175
    assert average_forgetting(HAND) == pytest.approx(0.175)
    # BWT: (0.6 − 0.9 + 0.75 − 0.8) / 2 = −0.175
    assert backward_transfer(HAND) == pytest.approx(-0.175)
    assert average_forgetting([[0.5]]) == 0.0 and backward_transfer([[0.5]]) == 0.0
    # Forgetting uses the best earlier value, not the first one.
    assert average_forgetting([[0.5, None, None], [0.8, 0.9, None], [0.6, 0.85, 0.9]]) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="missing"):
        average_forgetting([[0.5, None], [None, 0.9]])
    with pytest.raises(ValueError, match="square"):
        backward_transfer([[0.5, 0.2]])


def _fake_stage_results():
    out = []
    for i, row in enumerate(HAND):
        per = [{1: v, 2: min(1.0, v + 0.05)} for v in row[: i + 1]]
        out.append(
            {"stage": i, "old": per[0] if i else None, "new": per[-1], "all": per[0], "per_stage": per}
        )
    return out


def test_summary_json_round_trip_and_markdown(tmp_path):
    stage_results = _fake_stage_results()
    assert accuracy_matrix(stage_results) == HAND
    summary = summarize_run(stage_results, method="ours", ks=(1, 2))
    path = tmp_path / "r" / "results.json"
    save_json(summary, path)
    assert not list(path.parent.glob("*.tmp"))
    loaded = load_json(path)
    assert loaded == json.loads(json.dumps(summary))
    assert stage_results_from_summary(loaded) == stage_results
    assert loaded["average_forgetting"] == pytest.approx(0.175)
    md = to_markdown(loaded)
    assert "| 2 | 60.00 | 95.00 | 60.00 |" in md and "ours" in md
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="schema"):
        load_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        load_json(tmp_path / "missing.json")


def test_extract_embeddings_eval_mode_no_grad():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model.train()
    ds = torch.utils.data.TensorDataset(torch.randn(10, 4), torch.arange(10))
    emb, lab = extract_embeddings(model, ds, batch_size=3)
    assert emb.shape == (10, 3) and not emb.requires_grad and lab.tolist() == list(range(10))
    assert model.training  # restored
    model.eval()
    assert torch.allclose(emb, model(ds.tensors[0]), atol=1e-6)
    emb_amp, _ = extract_embeddings(model, ds, amp=True)
    assert emb_amp.dtype == torch.float32 and torch.allclose(emb_amp, emb, atol=0.05)


class _BatchSizes(torch.nn.Module):
    """Records the batch sizes it embeds; its output depends on the whole batch (the batch mean), so a
    regrouping that changed a model batch would change the embeddings."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.sizes = []

    def forward(self, x):
        self.sizes.append(len(x))
        return self.lin(x) + x.mean(0, keepdim=True)[:, :3]


@settings(deadline=None)
@given(
    n=st.integers(1, 60),
    batch=st.integers(1, 20),
    workers=st.integers(0, 4),
    tasks=st.integers(1, 8),
    min_task=st.integers(1, 8),
)
def test_small_worker_tasks_are_regrouped_into_the_same_model_batches(n, batch, workers, tasks, min_task):
    ds = torch.utils.data.TensorDataset(
        torch.randn(n, 4, generator=torch.Generator().manual_seed(n)), torch.arange(n)
    )
    # workers only sizes the tasks here: iterating in this process gives the same batches
    loader = EmbeddingLoader(ds, batch, num_workers=0, tasks_per_worker=tasks, min_task=min_task)
    loader.num_workers = workers
    size = loader.task_size(n)
    assert 1 <= size <= batch and (size == batch or size >= min(min_task, batch))
    if n >= batch * tasks * max(1, workers):
        assert size == batch  # long passes: whole batches
    elif min_task < size < batch:  # sized by the workers: at least half the tasks asked for (ceil rounding)
        wanted = tasks * max(1, workers)
        assert -(-n // size) >= (wanted + 1) // 2
    model = _BatchSizes()
    emb, labels = extract_embeddings(model, loader(), batch)
    assert model.sizes == [batch] * (n // batch) + ([n % batch] if n % batch else [])
    reference = _BatchSizes()
    reference.load_state_dict(model.state_dict())
    ref, _ = extract_embeddings(reference, ds, batch)  # one loader batch per model batch
    assert torch.equal(emb, ref) and labels.tolist() == list(range(n))


def test_a_pass_is_cut_into_several_tasks_per_worker():
    loader = EmbeddingLoader(torch.utils.data.TensorDataset(torch.zeros(6000, 1)), 192, tasks_per_worker=4)
    loader.num_workers = 14  # sizes the tasks only (no worker is started here)
    size = loader.task_size(6000)
    assert size == 108 and -(-6000 // size) >= 4 * 14  # not 32 tasks of 192 for 14 workers
    assert loader.task_size(100) == 16  # short passes: no task under min_task items
    assert EmbeddingLoader(loader.dataset, 192).task_size(6000) == 192  # the default: one model batch a task
