"""Checks that need a CUDA GPU (run on a GPU machine; skipped elsewhere).

A GPU is lent rarely, so CI rehearses this file on the CPU (``PML_MUTUAL_CUDA_REHEARSAL=1``, run by
tests/test_cuda_rehearsal.py): ``DEVICE`` is then the CPU and the CUDA-only calls below do nothing. That
proves only that the code runs, not what it asserts about a GPU, but a typo found here costs no GPU time.
"""

import contextlib
import os

import numpy as np
import pytest
import torch

REHEARSAL = os.environ.get("PML_MUTUAL_CUDA_REHEARSAL") == "1"
DEVICE = "cpu" if REHEARSAL else "cuda"
pytestmark = pytest.mark.skipif(not REHEARSAL and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def synchronize():
    if not REHEARSAL:
        torch.cuda.synchronize()


def hold_the_queue(cycles: int):
    """A kernel that keeps the GPU busy for ``cycles`` clock cycles: whatever is queued after it waits."""
    if not REHEARSAL:
        torch.cuda._sleep(cycles)


@contextlib.contextmanager
def host_syncs_raise():
    """torch's sync detector set to raise inside the block."""
    if REHEARSAL:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_gram_losses_are_float32_under_float16_autocast():
    from pml_mutual import GramCorrelationLoss, MutualGramLoss

    a, b = torch.randn(64, 512, device=DEVICE), torch.randn(64, 512, device=DEVICE)
    reference = GramCorrelationLoss()(a, ref_emb=b)
    with torch.autocast(DEVICE, dtype=torch.float16):
        p, t = (a @ torch.eye(512, device=DEVICE)), (b @ torch.eye(512, device=DEVICE))
        assert p.dtype == torch.float16
        corr = GramCorrelationLoss()(p, ref_emb=t)
        mutual = MutualGramLoss()(p, ref_emb=t)
    assert corr.dtype == torch.float32 and mutual.dtype == torch.float32
    assert torch.isfinite(corr) and torch.isfinite(mutual)
    assert torch.allclose(corr, reference, rtol=2e-2, atol=1e-5)


def test_amp_run_on_cuda_scales_float16_only_and_learns(tmp_path):
    """bfloat16 autocast where the GPU has it (no GradScaler, no per-step sync), float16 + GradScaler
    elsewhere."""
    from pml_mutual import OnlineConfig, OnlineLearner
    from pml_mutual.data import load_digits_splits, stage_assignment
    from pml_mutual.evaluation.stages import autocast_dtype
    from pml_mutual.models import EmbeddingMLP
    from pml_mutual.trainers import IncrementalTrainer

    scalers = []
    original = IncrementalTrainer.custom_setup

    def spy(self):
        original(self)
        scalers.append(self.grad_scaler)

    IncrementalTrainer.custom_setup = spy
    try:
        train, test = load_digits_splits()
        cfg = OnlineConfig(
            method="ours",
            epochs=2,
            iterations_per_epoch=20,
            batch_size=16,
            m_per_class=8,
            lr=1e-3,
            weight_decay=0.0,
            device=DEVICE,
            amp=True,
            freeze_batchnorm=False,
        )
        learner = OnlineLearner.from_class_assignment(
            EmbeddingMLP,
            train,
            test,
            stage_assignment(range(10), 4, 2),
            config=cfg,
            run_dir=tmp_path,
            quiet=True,
        )
        summary = learner.run()
    finally:
        IncrementalTrainer.custom_setup = original
    bf16 = autocast_dtype(torch.device(DEVICE)) == torch.bfloat16
    assert scalers and all((s is None) == bf16 for s in scalers)
    final = summary["stages"][-1]["all"][1]
    assert np.isfinite(final) and final > 0.5  # 10 classes: chance is 0.1


def test_faiss_gpu_matches_cpu_when_available():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("this faiss build has no GPU support")
    from pml_mutual.evaluation import recall_at_k

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2000, 64)).astype("float32")
    labels = rng.integers(0, 50, 2000)
    assert recall_at_k(emb, labels, (1, 2, 4), use_gpu=True) == pytest.approx(
        recall_at_k(emb, labels, (1, 2, 4), use_gpu=False)
    )


def test_distillation_losses_and_virtual_features_never_sync_the_host():
    """Eq. 1–2 and Eq. 4–6 on the GPU, forward and backward, under torch's sync detector set to raise."""
    import torch.nn.functional as F

    from pml_mutual import DriftCompensator, GramCorrelationLoss, MutualGramLoss

    comp = DriftCompensator()
    for s in range(5):
        feats = F.normalize(torch.randn(60, 32, device=DEVICE), dim=1)
        comp.add_stage(feats, torch.arange(10 * s, 10 * s + 10, device=DEVICE).repeat(6))
        for t in comp.stages_to_measure():
            comp.update_drift(feats, F.normalize(feats + 0.1, dim=1), stage=t)
    p = torch.randn(48, 32, device=DEVICE, requires_grad=True)
    s_ = torch.randn(48, 32, device=DEVICE, requires_grad=True)
    o = torch.randn(48, 32, device=DEVICE)
    corr, mutual = GramCorrelationLoss(), MutualGramLoss()
    # first call builds the device copy of the prototypes
    corr.sum_over_teachers(p, [o, comp.virtual_feature_stack(o)])
    with host_syncs_raise():
        total = (
            corr.sum_over_teachers(p, [o, comp.virtual_feature_stack(o)])
            + mutual(p, ref_emb=s_)
            + corr(p, ref_emb=o)
        )
        total.backward()
    assert torch.isfinite(total).item()


def test_a_whole_default_ours_training_step_never_syncs_the_host():
    """The stage's step with the default metric loss (BatchHardTripletLoss, no PML miner), three networks,
    AMP and virtual features of 4 stages: forward, losses, backward and both fused Adam updates under
    torch's sync detector set to raise."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from perf_training import make_trainer, stage5_compensator

    x = torch.randn(16, 1, 32, 32, device=DEVICE)
    y = torch.arange(4, device=DEVICE).repeat_interleave(4)
    from pml_mutual.models import SmallCNN

    dim = SmallCNN()(x[:2].cpu()).shape[1]
    trainer = make_trainer(
        "ours", "small_cnn", (x, y), torch.device(DEVICE), stage5_compensator(dim, DEVICE), amp=True
    )
    trainer.forward_and_backward()  # first step: optimiser state, cuDNN plans
    with host_syncs_raise():
        for _ in range(2):
            trainer.forward_and_backward()
    assert torch.isfinite(trainer.losses["total_loss"]).item()


def test_torch_knn_on_cuda_equals_faiss_on_cpu():
    from pml_mutual.evaluation import nearest_neighbours, recall_at_k

    rng = np.random.default_rng(0)
    emb = np.zeros((3000, 8), dtype=np.float32)  # entries ±0.5: exact scores, ties everywhere
    for i in range(len(emb)):
        emb[i, rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    emb[:1500] = emb[0]
    labels = rng.integers(0, 40, len(emb))
    assert np.array_equal(
        nearest_neighbours(emb, 8, backend="torch", device=DEVICE),
        nearest_neighbours(emb, 8, backend="faiss"),
    )
    assert recall_at_k(emb, labels, backend="auto") == recall_at_k(emb, labels, backend="faiss")


def test_gallery_report_and_chained_learned_maps_on_cuda(tmp_path):
    """The stage loop's gallery report with the updates on the GPU, and learned_chained virtual features in
    training on CUDA: the report's re-embedded gallery is the run's own evaluation, the updates finite."""
    from pml_mutual import OnlineConfig, OnlineLearner
    from pml_mutual.data import load_digits_splits, stage_assignment
    from pml_mutual.gallery import GALLERIES
    from pml_mutual.models import EmbeddingMLP

    train, test = load_digits_splits()
    cfg = OnlineConfig(
        method="ours",
        epochs=1,
        iterations_per_epoch=15,
        batch_size=16,
        m_per_class=8,
        lr=1e-3,
        weight_decay=0.0,
        device=DEVICE,
        drift_mode="learned_chained",
        gallery_report=True,
    )
    summary = OnlineLearner.from_class_assignment(
        EmbeddingMLP, train, test, stage_assignment(range(10), 4, 2), config=cfg, run_dir=tmp_path, quiet=True
    ).run()
    for s in summary["stages"]:
        g = s["gallery"]
        assert g["reembedded"]["all"][1] == pytest.approx(s["all"][1], abs=1 / 300)
        assert all(0 <= g[n]["all"][1] <= 1 for n in GALLERIES)
    assert np.isfinite(summary["stages"][-1]["all"][1])


def test_perf_e2e_perf_checkpoint_and_perf_extract_run_on_cuda(tmp_path):
    """The CUDA paths of the two benchmarks: the stage's own steps timed by CUDA events (no sync added),
    workers forked at the run's start with pinned memory, the checkpoint snapshot copied off the GPU."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).parents[1] / "benchmarks"
    subprocess.run(
        [
            sys.executable,
            str(bench / "perf_pipeline.py"),
            "stage",
            "--quick",
            "--device",
            DEVICE,
            "--rounds",
            "3",
            "--out",
            str(tmp_path / "e.json"),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    res = json.loads((tmp_path / "e.json").read_text())
    for r in res["rounds"]:
        assert 0 < r["first_step_in_stage_s"] <= r["steps_in_stage_s"] < r["phases_s"]["train"]
    subprocess.run(
        [
            sys.executable,
            str(bench / "perf_run.py"),
            "checkpoint",
            "--quick",
            "--device",
            DEVICE,
            "--out",
            str(tmp_path / "c.json"),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["device"] == DEVICE and 2.9 < res["mid_stage"]["bytes"] / res["last_epoch"]["bytes"] < 3.1
    subprocess.run(
        [
            sys.executable,
            str(bench / "perf_pipeline.py"),
            "extract",
            "--quick",
            "--device",
            DEVICE,
            "--out",
            str(tmp_path / "x.json"),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    res = json.loads((tmp_path / "x.json").read_text())
    assert res["device"] == DEVICE and res["tasks_per_pass"]["tasks"] > res["tasks_per_pass"]["whole_batch"]


def test_jpegs_decoded_by_nvjpeg_stay_close_to_pillows(tmp_path):
    """nvJPEG is another decoder than libjpeg-turbo (Pillow's, and torchvision's on the CPU, bit-equal to
    it): its pixels are not bit-equal; the bound asserted is a mean under one level of 255."""
    pytest.importorskip("torchvision")
    from pml_mutual.data import ImageListDataset, ProtocolTransform, load_cub
    from pml_mutual.data.device_decode import EncodedImageDataset, collate_encoded
    from pml_mutual.data.fixtures import write_cub_fixture

    root = write_cub_fixture(tmp_path / "CUB_200_2011", [6] * 4, size=(500, 375))
    items, _ = load_cub(root)
    ds = ImageListDataset(items, ProtocolTransform(False, "bgr255", 224))  # bgr255: one unit = one level
    enc = EncodedImageDataset(ds)
    batch, _ = collate_encoded([enc[i] for i in range(len(enc))])
    got = batch.to(DEVICE).cpu()
    expected = torch.stack([ds[i][0] for i in range(len(ds))])
    diff = (got - expected).abs()
    print(f"nvJPEG + resize on CUDA vs Pillow: mean {diff.mean():.3f} levels, max {diff.max():.0f}")
    assert got.shape == expected.shape and diff.mean() < 1.0


def test_device_decoding_never_writes_memory_that_queued_kernels_still_read():
    """pytorch/vision#9606: torchvision's CUDA decoder allocates on the caller's stream and writes from a
    private one that does not wait for it, so it can be handed blocks whose readers are still queued. The
    harness queues readers behind a long kernel, frees their tensors (blocks of exactly the decoded images'
    size) and decodes at once: every reader must still see its own values. The plain torchvision call is
    run the same way and only printed (whether it corrupts depends on the GPU and driver)."""
    pytest.importorskip("torchvision")
    import io

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    from pml_mutual.data import ProtocolTransform
    from pml_mutual.data.device_decode import EncodedImage, decode_jpegs

    rng = np.random.default_rng(0)
    images = []
    for _ in range(4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        images.append(EncodedImage(data, True, "noise.jpg", None, ProtocolTransform(False, "imagenet", 224)))
    cuda = torch.device(DEVICE)

    def corrupted(decode, tries=20):
        bad = 0
        for _ in range(tries):
            victims = [torch.full((3, 375, 500), 7, dtype=torch.uint8, device=cuda) for _ in range(8)]
            synchronize()
            hold_the_queue(200_000_000)  # the readers below run only after this, long after the decode
            sums = [v.sum(dtype=torch.int64) for v in victims]
            del victims
            decoded = decode()
            synchronize()
            bad += any(int(s) != 7 * 3 * 375 * 500 for s in sums)
            del decoded
        return bad

    plain = corrupted(lambda: decode_jpeg([im.data for im in images], mode=ImageReadMode.RGB, device=cuda))
    ours = corrupted(lambda: decode_jpegs(images, cuda))
    print(f"tries with a corrupted reader: torchvision's decode_jpeg {plain}/20, decode_jpegs {ours}/20")
    assert ours == 0
    # the pixels are the decoder's own: the same call with nothing queued gives the same bytes
    synchronize()
    expected = decode_jpeg([im.data for im in images], mode=ImageReadMode.RGB, device=cuda)
    assert all(torch.equal(g, e) for g, e in zip(decode_jpegs(images, cuda), expected))


def test_an_embedding_pass_decoded_on_the_gpu_feeds_each_forward_its_own_pixels(tmp_path):
    """The pattern in which the stream hazard above bites: loader batches decoded on the device, joined
    into model batches, freed while that forward is still queued (here held back by a long kernel). The
    model records a checksum of each input image as its first kernels; each must equal the checksum of
    the same loader batch decoded with nothing in flight. bgr255 pixels are whole numbers (levels minus
    whole means), so the float64 sums are exact in any summation order."""
    pytest.importorskip("torchvision")
    from torch.utils.data import DataLoader

    from pml_mutual.data import ImageListDataset, ProtocolTransform, load_cub
    from pml_mutual.data.device_decode import EncodedImageDataset, collate_encoded
    from pml_mutual.data.fixtures import write_cub_fixture
    from pml_mutual.evaluation.stages import extract_embeddings

    root = write_cub_fixture(tmp_path / "CUB_200_2011", [8] * 4, size=(500, 375))
    items, _ = load_cub(root)
    encoded = EncodedImageDataset(ImageListDataset(items, ProtocolTransform(False, "bgr255", 224)))
    cuda = torch.device(DEVICE)

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.sums = []

        def forward(self, x):
            hold_the_queue(50_000_000)  # the forward waits in the queue while the next batches decode
            self.sums.append(x.double().sum(dim=(1, 2, 3)))
            return self.conv(x).mean(dim=(2, 3))

    model = Recorder().to(cuda)
    loader = DataLoader(encoded, batch_size=4, collate_fn=collate_encoded)
    extract_embeddings(model, loader, batch_size=8, device=cuda)
    synchronize()
    seen = torch.cat(model.sums).cpu()
    alone = []
    for batch, _ in loader:
        alone.append(batch.to(cuda).double().sum(dim=(1, 2, 3)).cpu())  # .cpu(): nothing left in flight
    assert len(seen) == len(encoded) and torch.equal(seen, torch.cat(alone))
