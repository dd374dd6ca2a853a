"""Time per training step of each method against the method's compute limit.

    python benchmarks/perf_step.py [--quick] [--device cuda] [--model small_cnn|mlp|bninception|resnet50|vit_b16]

One process, one model, one batch: the median time (and spread) of a full IncrementalTrainer step
(forward, losses, backward, optimiser) for finetune, fecd, ours (one-task) and ours at stage 5
(virtual features of 4 earlier stages). The compute limit of `ours` is what three networks cost by
construction: teacher forward + two students' forward and backward. With b = backward/forward time of
the model (measured here, not assumed), limit / finetune = (1 + 2(1 + b)) / (1 + b). Also printed: the
share of the step spent in GramCorrelationLoss + MutualGramLoss + virtual features.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pml_mutual import DriftCompensator, GramCorrelationLoss, IncrementalTrainer, MutualGramLoss
from pml_mutual.losses import BatchHardTripletLoss, gram_distillation_losses
from pml_mutual.online import adam
from pml_mutual.models import BACKBONES, EmbeddingMLP, SmallCNN, build_backbone



def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out), min(out), max(out)


def build(model_name, device, image_size=224):
    """(model, empty input of its shape); the paper's backbones take image_size² RGB (random weights: the
    cost does not depend on them)."""
    if model_name == "mlp":
        return EmbeddingMLP().to(device), torch.randn(0, 64)
    if model_name in BACKBONES:
        return build_backbone(model_name).to(device), torch.randn(0, 3, image_size, image_size)
    return SmallCNN().to(device), torch.randn(0, 1, 32, 32)


def make_trainer(method, model_name, batch, device, compensator=None, amp=False):
    student, _ = build(model_name, device, batch[0].shape[-1])
    models = {"trunk": student}
    # the stage's defaults (OnlineLearner): batch-hard triplets mined on the device, fused Adam
    loss_funcs = {"metric_loss": BatchHardTripletLoss(margin=0.1)}
    weights = {"metric_loss": 1.0}
    if method != "finetune":
        teacher, _ = build(model_name, device, batch[0].shape[-1])
        models["teacher_trunk"] = teacher
        loss_funcs["correlation_loss"] = GramCorrelationLoss()
        weights["correlation_loss"] = 10.0
    if method.startswith("ours"):
        models["support_trunk"], _ = build(model_name, device, batch[0].shape[-1])
        loss_funcs["mutual_loss"] = MutualGramLoss()
        weights.update(support_metric_loss=1.0, mutual_loss=8.0)
    optimizers = {f"{k}_optimizer": adam(m.parameters(), lr=1e-5, weight_decay=5e-4) for k, m in models.items() if k != "teacher_trunk"}
    trainer = IncrementalTrainer(
        models=models, optimizers=optimizers, batch_size=len(batch[1]), loss_funcs=loss_funcs, dataset=None,
        mining_funcs={}, iterations_per_epoch=1, data_device=device,
        loss_weights=weights, freeze_trunk_batchnorm=True, drift_compensator=compensator, quiet=True, amp=amp,
    )
    trainer.get_batch = lambda: batch  # the same batch every step: data loading is not what is measured
    trainer.set_to_train()
    return trainer


def stage5_compensator(dim: int, device) -> DriftCompensator:
    """ours at stage 5: 5 stages in the compensator → 4 sets of virtual features per batch."""
    comp = DriftCompensator()
    for s in range(5):
        feats = F.normalize(torch.randn(200, dim, device=device), dim=1)
        comp.add_stage(feats, torch.arange(10 * s, 10 * s + 10, device=device).repeat(20))
        for t in comp.stages_to_measure():
            comp.update_drift(feats, F.normalize(feats + 0.1, dim=1), stage=t)
    return comp


def sync_audit(trainer, steps: int = 3) -> dict[str, int]:
    """Host-synchronising CUDA calls of ``steps`` training steps, counted per source line (CUDA only):
    torch flags each one when ``set_sync_debug_mode`` is on."""
    import traceback
    import warnings

    counts: dict[str, int] = {}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                trainer.forward_and_backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{Path(w.filename).name}:{w.lineno}"
            counts[where] = counts.get(where, 0) + 1
    return {k: v / steps for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["small_cnn", "mlp", *BACKBONES], default="small_cnn")
    p.add_argument("--batch-size", type=int, default=80)
    p.add_argument("--image-size", type=int, default=224, help="input size for bninception / resnet50 / vit_b16")
    p.add_argument("--classes-per-batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast training steps (default: on for cuda, off for cpu)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sync-audit", action="store_true", help="CUDA: list the host syncs of one step of each method")
    p.add_argument("--out", type=Path, default=Path("runs") / "benchmarks" / "perf_step.json")  # git-ignored
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.batch_size, args.classes_per_batch = 3, 1, 16, 4
    device = torch.device(args.device)
    amp = args.amp if args.amp is not None else device.type == "cuda"
    torch.manual_seed(0)
    _, shape_probe = build(args.model, device, args.image_size)
    x = torch.randn(args.batch_size, *shape_probe.shape[1:], device=device)
    y = torch.arange(args.classes_per_batch, device=device).repeat_interleave(args.batch_size // args.classes_per_batch)
    y = torch.cat([y, y[: args.batch_size - len(y)]])
    batch = (x, y)

    # backward / forward ratio of the model itself.
    model, _ = build(args.model, device, args.image_size)
    model.train()
    fwd = timed(lambda: model(x), device, args.warmup, args.repeats)[0]
    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    fb = timed(fwd_bwd, device, args.warmup, args.repeats)[0]
    b = (fb - fwd) / fwd
    limit = (1 + 2 * (1 + b)) / (1 + b)

    dim = model(x).shape[1]
    comp = stage5_compensator(dim, device)
    results, audit = {}, {}
    for name, c in (("finetune", None), ("fecd", None), ("ours", None), ("ours_stage5", comp)):
        trainer = make_trainer(name, args.model, batch, device, c, amp)
        results[name] = timed(trainer.forward_and_backward, device, args.warmup, args.repeats)
        if args.sync_audit and device.type == "cuda":
            audit[name] = sync_audit(trainer)
            print(f"host syncs per step, {name}: {sum(audit[name].values()):.0f}  " +
                  ", ".join(f"{k}×{v:g}" for k, v in audit[name].items()), flush=True)

    # The loss part alone: L_corr over real + virtual teachers and L_mutual, forward + backward, on embeddings.
    emb = lambda: torch.randn(args.batch_size, dim, device=device)  # noqa: E731
    p_emb, s_emb, o_emb = emb().requires_grad_(), emb().requires_grad_(), emb()
    corr, mutual = GramCorrelationLoss(), MutualGramLoss()
    def loss_part(compensator):
        # the trainer's path: the virtual features (Eq. 4), then L_mutual and L_corr over the real and virtual
        # teachers (Eq. 6) as one stacked computation
        teachers = [o_emb] if compensator is None else [o_emb, compensator.virtual_feature_stack(o_emb)]
        out = gram_distillation_losses(p_emb, s_emb, teachers, correlation_loss=corr, mutual_loss=mutual)
        (8 * out["mutual_loss"] + 10 * out["correlation_loss"]).backward()
    share_one = timed(lambda: loss_part(None), device, args.warmup, args.repeats)[0] / results["ours"][0]
    share_five = timed(lambda: loss_part(comp), device, args.warmup, args.repeats)[0] / results["ours_stage5"][0]

    base = results["finetune"][0]
    doc = {
        "device": str(device), "amp": amp, "model": args.model, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "forward_ms": 1e3 * fwd, "backward_over_forward": b, "compute_limit_ratio": limit,
        "steps_ms": {k: [1e3 * v for v in vals] for k, vals in results.items()},
        "ratio_to_finetune": {k: v[0] / base for k, v in results.items()},
        "loss_share": {"ours": share_one, "ours_stage5": share_five},
        "host_syncs_per_step": audit,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"model: {args.model} on {device}, batch {args.batch_size}")
    print(f"forward_ms: {1e3 * fwd:.3f}")
    print(f"backward_over_forward: {b:.3f}")
    for k, (med, lo, hi) in results.items():
        print(f"{k}_step_ms: {1e3 * med:.3f} (range {1e3 * lo:.3f}-{1e3 * hi:.3f})")
    for k, v in doc["ratio_to_finetune"].items():
        print(f"ratio: {k}/finetune {v:.3f}")
    print(f"ratio: compute_limit/finetune {limit:.3f}")
    print(f"ratio: ours/compute_limit {doc['ratio_to_finetune']['ours'] / limit:.3f}")
    print(f"loss_share_ours: {100 * share_one:.2f}%")
    print(f"loss_share_ours_stage5: {100 * share_five:.2f}%")


if __name__ == "__main__":
    main()
