"""torch.distributed (torchrun / gloo on CPU): the sampler, global-batch equivalence, and a 2-rank online
run."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from pml_mutual.distributed import DistributedMPerClassSampler, gather_rows, gather_with_grad

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from helpers import ddp_step  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@given(st.integers(2, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 10_000))
def test_ranks_split_one_global_class_balanced_batch(world, classes_per_rank, m, seed):
    labels = np.repeat(np.arange(world * classes_per_rank + 3), 5)
    batch = classes_per_rank * m
    steps = 4
    single = list(
        DistributedMPerClassSampler(labels, m, world * batch, steps * world * batch, 1, 0, seed=seed)
    )
    per_rank = [
        list(DistributedMPerClassSampler(labels, m, batch, steps * batch, world, r, seed=seed))
        for r in range(world)
    ]
    for t in range(steps):
        parts = [p[t * batch : (t + 1) * batch] for p in per_rank]
        # N ranks × B are exactly the images of one process with N·B, in rank order
        assert sum(parts, []) == single[t * world * batch : (t + 1) * world * batch]
        class_sets = [set(labels[q].tolist()) for q in parts]
        assert all(len(c) == classes_per_rank for c in class_sets)
        assert len(set().union(*class_sets)) == world * classes_per_rank  # disjoint across ranks
        for q in parts:
            assert all(np.sum(labels[q] == c) == m for c in set(labels[q].tolist()))


def test_sampler_refuses_batches_it_cannot_fill():
    with pytest.raises(ValueError, match="needs 8 classes"):
        DistributedMPerClassSampler(np.repeat(np.arange(5), 4), 2, 8, 80, num_replicas=2, rank_=0)
    with pytest.raises(ValueError, match="multiple"):
        DistributedMPerClassSampler(np.repeat(np.arange(5), 4), 3, 8, 80, num_replicas=1, rank_=0)


def test_helpers_are_identity_in_one_process():
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(x) is x and gather_rows(x, 4) is x


@pytest.mark.parametrize("gram_scope", ["global", "local"])
def test_two_ranks_match_one_process_with_the_global_batch(tmp_path, gram_scope):
    out = tmp_path / "two.pt"
    mp.spawn(
        ddp_step.spawned, args=(2, free_port(), ddp_step.run_step, str(out), gram_scope), nprocs=2, join=True
    )
    two = torch.load(out, weights_only=True)
    ddp_step.run_step(1, 0, str(tmp_path / "one.pt"))
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    assert set(two["grads"]) == set(one["grads"])
    if gram_scope == "global":
        # Two ranks embed half batches (other matmul blocking) and gather: every cosine of D-dim float32
        # embeddings may differ by up to ~D·eps. A row log-softmax moves by at most 2·max|ΔG|/T, so each
        # KL term by at most ~4·D·eps/T; Eq. 6 sums one term per teacher (real + virtual); a triplet term
        # (distances, no 1/T) by ~2·D·eps. The total carries the λ-weighted sum of these.
        eps, d, t = float(torch.finfo(torch.float32).eps), ddp_step.EMBEDDING_SIZE, 4.0
        kl = 4 * d * eps / t
        bound = {
            "metric_loss": 2 * d * eps,
            "support_metric_loss": 2 * d * eps,
            "mutual_loss": 2 * kl,
            "correlation_loss": ddp_step.CORRELATION_TERMS * kl,
        }
        bound["total_loss"] = sum(ddp_step.LOSS_WEIGHTS[k] * b for k, b in bound.items())
        for k, b in bound.items():
            assert abs(two["losses"][k] - one["losses"][k]) <= b, (k, two["losses"][k], one["losses"][k], b)
        for k, g in one["grads"].items():
            assert torch.allclose(two["grads"][k], g, rtol=1e-4, atol=1e-7), k
    else:  # each rank sees half the batch: the Gram terms differ from the global ones
        assert two["losses"]["correlation_loss"] != pytest.approx(one["losses"]["correlation_loss"], rel=1e-3)


def _torchrun(nproc, run_dir, *extra):
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_port",
        str(free_port()),
        str(ROOT / "examples" / "ddp_digits.py"),
        "--cpu",
        "--iterations",
        "4",
        "--run-dir",
        str(run_dir),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _final_weights(run_dir):
    return torch.load(run_dir / "stage_002" / "model.pt", map_location="cpu", weights_only=True)


def test_torchrun_two_ranks_agree_checkpoint_once_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    done = _torchrun(2, run_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "weights and drift identical across ranks: True" in done.stdout
    assert done.stdout.count("final Recall@1") == 1  # rank 0 alone reports
    stages = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
    assert stages == ["stage_000", "stage_001", "stage_002"]
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / "in_progress.pt").exists()
    finished = _final_weights(run_dir)
    # an interruption after stage 1: the rerun resumes at stage 2 and ends with the same weights
    for f in (run_dir / "stage_002").iterdir():
        f.unlink()
    (run_dir / "stage_002").rmdir()
    again = _torchrun(2, run_dir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming" in again.stdout
    resumed = _final_weights(run_dir)
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)
    # the same global batch in one process (1 × 16) trains the same network as 2 ranks × 8
    single = _torchrun(1, tmp_path / "single", "--batch-size", "16")
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    first_two = torch.load(run_dir / "stage_000" / "model.pt", map_location="cpu", weights_only=True)
    first_one = torch.load(
        tmp_path / "single" / "stage_000" / "model.pt", map_location="cpu", weights_only=True
    )
    # the first stage (8 Adam steps) agrees to float rounding; later stages drift apart slowly (rounding
    # differences of the all-reduce, amplified by Adam and by the miner's choices), not systematically
    assert all(torch.allclose(first_two[k], first_one[k], atol=1e-4) for k in first_two)
    one = _final_weights(tmp_path / "single")
    assert all(torch.allclose(finished[k], one[k], atol=2e-2) for k in finished)
    recall = lambda out: float(out.split("final Recall@1 all classes: ")[1].split()[0])  # noqa: E731
    assert abs(recall(done.stdout) - recall(single.stdout)) <= 1.0


def test_obdsd_trainer_on_two_ranks_matches_one_process(tmp_path):
    out = tmp_path / "two.pt"
    mp.spawn(ddp_step.spawned, args=(2, free_port(), ddp_step.run_obdsd_step, str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    ddp_step.run_obdsd_step(1, 0, str(tmp_path / "one.pt"))
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    assert two["losses"]["metric_loss"] == pytest.approx(one["losses"]["metric_loss"], rel=1e-5)
    assert one["losses"]["metric_loss"] > 0
    for k, g in one["grads"].items():
        assert torch.allclose(two["grads"][k], g, rtol=1e-4, atol=1e-7), k


def test_bad_gram_scope_is_refused():
    from pml_mutual import OnlineConfig

    with pytest.raises(ValueError, match="gram_scope must be one of"):
        OnlineConfig(gram_scope="everywhere")


@pytest.mark.parametrize("world", [1, 2])
def test_students_wrapped_only_with_ranks_to_sync_and_shutdown_ends_the_group(tmp_path, world):
    out = tmp_path / "seen.pt"
    mp.spawn(
        ddp_step.spawned,
        args=(world, free_port(), ddp_step.wrap_then_shutdown, str(out)),
        nprocs=world,
        join=True,
    )
    seen = torch.load(out, weights_only=True)
    assert seen["wrapped"]["teacher_trunk"] == "EmbeddingMLP"  # the frozen teacher is never synchronised
    assert seen["wrapped"]["trunk"] == ("DistributedDataParallel" if world > 1 else "EmbeddingMLP")
    assert seen["active_after"] is False
