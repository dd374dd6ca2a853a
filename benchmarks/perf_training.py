"""What a training step costs: the step of each method against its compute limit, the losses alone, and
the ops a step dispatches.

    python benchmarks/perf_training.py step [--quick] [--device cuda] [--model
    small_cnn|mlp|bninception|resnet50|vit_b16]
    python benchmarks/perf_training.py losses [--batch-sizes 80 256] [--dim 512] [--repeats 50] [--teachers 5]
    python benchmarks/perf_training.py ops [--model mlp]

``step``: one process, one model, one batch: the median time (and spread) of a full IncrementalTrainer step
(forward, losses, backward, optimiser) for finetune, fecd, ours (one-task) and ours at stage 5 (virtual
features of 4 earlier stages). The compute limit of `ours` is what three networks cost by construction:
teacher forward + two students' forward and backward. With b = backward/forward time of the model
(measured here, not assumed), limit / finetune = (1 + 2(1 + b)) / (1 + b). Also printed: the share of the
step spent in GramCorrelationLoss + MutualGramLoss + virtual features. ``--sync-audit`` (CUDA) lists the
host syncs of each method's step.

``losses``: per batch size, the median time of one L_corr + L_mutual forward+backward next to a PML
TripletMarginLoss + BatchHardMiner forward+backward on the same embeddings (the baseline of the same run);
the same two losses as the trainer computes them (``gram_distillation_losses``, one stacked computation)
against the modules called one by one, with one teacher and with ``--teachers`` (as at stage 5), and the
computing ops each dispatches; and the batch-hard loss as one dense computation (BatchHardTripletLoss, the
stage's default) against PML's pair.

``ops``: the computing ops (each at least one kernel launch on a GPU) of one training step of each method,
counted on the CPU through torch's dispatcher, by op.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from common import MODELS, build, computing_ops, run_subcommands, timed, write_result
from pytorch_metric_learning import losses, miners

from pml_mutual import DriftCompensator, GramCorrelationLoss, IncrementalTrainer, MutualGramLoss
from pml_mutual.losses import BatchHardTripletLoss, gram_distillation_losses
from pml_mutual.online import adam


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
    optimizers = {
        f"{k}_optimizer": adam(m.parameters(), lr=1e-5, weight_decay=5e-4)
        for k, m in models.items()
        if k != "teacher_trunk"
    }
    trainer = IncrementalTrainer(
        models=models,
        optimizers=optimizers,
        batch_size=len(batch[1]),
        loss_funcs=loss_funcs,
        dataset=None,
        mining_funcs={},
        iterations_per_epoch=1,
        data_device=device,
        loss_weights=weights,
        freeze_trunk_batchnorm=True,
        drift_compensator=compensator,
        quiet=True,
        amp=amp,
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


def add_step_arguments(p):
    p.add_argument("--model", choices=MODELS, default="small_cnn")
    p.add_argument("--batch-size", type=int, default=80)
    p.add_argument(
        "--image-size", type=int, default=224, help="input size for bninception / resnet50 / vit_b16"
    )
    p.add_argument("--classes-per-batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="autocast training steps (default: on for cuda, off for cpu)",
    )
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--sync-audit", action="store_true", help="CUDA: list the host syncs of one step of each method"
    )


def step(args):
    """Time per training step of each method against the method's compute limit (see the module's
    docstring)."""
    if args.quick:
        args.repeats, args.warmup, args.batch_size, args.classes_per_batch = 3, 1, 16, 4
    device = torch.device(args.device)
    amp = args.amp if args.amp is not None else device.type == "cuda"
    torch.manual_seed(0)
    batch = x, _ = example_batch(args.model, device, args.batch_size, args.classes_per_batch, args.image_size)

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
            print(
                f"host syncs per step, {name}: {sum(audit[name].values()):.0f}  "
                + ", ".join(f"{k}×{v:g}" for k, v in audit[name].items()),
                flush=True,
            )

    # The loss part alone: L_corr over real + virtual teachers and L_mutual, forward + backward, on
    # embeddings.
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
    share_five = (
        timed(lambda: loss_part(comp), device, args.warmup, args.repeats)[0] / results["ours_stage5"][0]
    )

    base = results["finetune"][0]
    doc = {
        "device": str(device),
        "amp": amp,
        "model": args.model,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "forward_ms": 1e3 * fwd,
        "backward_over_forward": b,
        "compute_limit_ratio": limit,
        "steps_ms": {k: [1e3 * v for v in vals] for k, vals in results.items()},
        "ratio_to_finetune": {k: v[0] / base for k, v in results.items()},
        "loss_share": {"ours": share_one, "ours_stage5": share_five},
        "host_syncs_per_step": audit,
    }
    write_result(args.out, doc)
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


def add_losses_arguments(p):
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[80, 256])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--teachers", type=int, default=5, help="teachers of the stage-5 case (1 real + virtual)")
    p.add_argument("--device", default="cpu")


def losses_cost(args):
    """The distillation losses' cost, stacked vs called, and the batch-hard loss dense vs PML's pair."""
    corr, mutual = GramCorrelationLoss(), MutualGramLoss()
    triplet, miner = losses.TripletMarginLoss(margin=0.1), miners.BatchHardMiner()
    dense = BatchHardTripletLoss(margin=0.1)
    rows = []
    for b in args.batch_sizes:
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(b // 4).repeat_interleave(4)[:b].to(args.device)
        emb_o = torch.randn(b, args.dim, generator=g).to(args.device)
        emb_p = torch.randn(b, args.dim, generator=g).to(args.device).requires_grad_()
        emb_s = torch.randn(b, args.dim, generator=g).to(args.device).requires_grad_()

        def distill():
            (10 * corr(emb_p, ref_emb=emb_o) + 8 * mutual(emb_p, ref_emb=emb_s)).backward()

        def called(n_teachers):
            teachers = [emb_o] + [torch.randn_like(emb_o) for _ in range(n_teachers - 1)]

            def run():
                emb_p.grad = emb_s.grad = None
                total = 10 * sum(corr(emb_p, ref_emb=t) for t in teachers) + 8 * mutual(emb_p, ref_emb=emb_s)
                total.backward()

            return run

        def stacked(n_teachers):
            teachers = [emb_o, torch.randn(n_teachers - 1, *emb_o.shape, device=emb_o.device)]

            def run():
                emb_p.grad = emb_s.grad = None
                out = gram_distillation_losses(
                    emb_p, emb_s, teachers, correlation_loss=corr, mutual_loss=mutual
                )
                (10 * out["correlation_loss"] + 8 * out["mutual_loss"]).backward()

            return run

        def metric():
            triplet(emb_p, labels, miner(emb_p, labels)).backward()

        def dense_metric():
            dense(emb_p, labels).backward()

        t_d, *spread_d = timed(distill, repeats=args.repeats)
        t_m = timed(metric, repeats=args.repeats)[0]
        t_b = timed(dense_metric, repeats=args.repeats)[0]
        paths = {}
        for n in (1, args.teachers):
            for name, make in (("called", called), ("stacked", stacked)):
                fn = make(n)
                paths[f"{name}_{n}"] = {
                    "ms": 1e3 * timed(fn, repeats=args.repeats)[0],
                    "ops": sum(computing_ops(fn).values()),
                }
        rows.append(
            {
                "batch_size": b,
                "dim": args.dim,
                "distill_ms": 1e3 * t_d,
                "distill_range_ms": [1e3 * x for x in spread_d],
                "triplet_ms": 1e3 * t_m,
                "ratio_to_triplet": t_d / t_m,
                "teachers": paths,
                "batch_hard_dense_ms": 1e3 * t_b,
                "ratio_dense_to_pml_batch_hard": t_b / t_m,
            }
        )
    write_result(args.out, {"device": args.device, "threads": torch.get_num_threads(), "rows": rows})
    for r in rows:
        print(
            f"B={r['batch_size']} D={r['dim']}: corr+mutual fwd+bwd: {r['distill_ms']:.3f} ms (range "
            f"{r['distill_range_ms'][0]:.3f}–{r['distill_range_ms'][1]:.3f}); triplet+batch-hard: "
            f"{r['triplet_ms']:.3f} ms; ratio: {r['ratio_to_triplet']:.2f}"
        )
        for n in sorted({int(k.split("_")[1]) for k in r["teachers"]}):
            c, f = r["teachers"][f"called_{n}"], r["teachers"][f"stacked_{n}"]
            print(
                f"B={r['batch_size']} D={r['dim']}, {n} teacher(s): corr+mutual called {c['ms']:.3f} ms, "
                f"{c['ops']} ops; stacked {f['ms']:.3f} ms, {f['ops']} ops; ratio: stacked/called time "
                f"{f['ms'] / c['ms']:.2f}, ops {f['ops'] / c['ops']:.2f}"
            )
        print(
            f"B={r['batch_size']} D={r['dim']}: BatchHardTripletLoss (dense, no host read) "
            f"{r['batch_hard_dense_ms']:.3f} ms; ratio: dense/PML batch-hard "
            f"{r['ratio_dense_to_pml_batch_hard']:.2f}"
        )


def add_ops_arguments(p):
    p.add_argument("--model", choices=MODELS, default="mlp")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--classes-per-batch", type=int, default=4)


def step_ops(args):
    """The computing ops of one training step of each method (forward, losses, backward, optimiser)."""
    device = torch.device("cpu")
    image_size = (
        64  # the paper's backbones at a small size: the ops do not depend on it (small models ignore it)
    )
    x, y = example_batch(args.model, device, args.batch_size, args.classes_per_batch, image_size)
    dim = build(args.model, device, image_size)[0](x[:2]).shape[1]
    result = {}
    for name, c in (
        ("finetune", None),
        ("fecd", None),
        ("ours", None),
        ("ours_stage5", stage5_compensator(dim, device)),
    ):
        trainer = make_trainer(name, args.model, (x, y), device, c)
        trainer.forward_and_backward()  # optimiser state exists from the first step on
        ops = computing_ops(trainer.forward_and_backward)
        result[name] = {"total": sum(ops.values()), "by_op": dict(ops.most_common())}
        print(
            f"{name}_ops: {result[name]['total']}  ("
            + ", ".join(f"{k}×{v}" for k, v in ops.most_common(6))
            + ", ...)"
        )
    for name in ("fecd", "ours", "ours_stage5"):
        print(f"ratio: {name}/finetune ops {result[name]['total'] / result['finetune']['total']:.2f}")
    write_result(args.out, {"model": args.model, "batch_size": args.batch_size, "steps": result})
    return result


def example_batch(model_name, device, batch_size, classes_per_batch, image_size):
    """A batch of the model's input shape with ``classes_per_batch`` classes."""
    _, probe = build(model_name, device, image_size)
    x = torch.randn(batch_size, *probe.shape[1:], device=device)
    y = torch.arange(classes_per_batch, device=device).repeat_interleave(batch_size // classes_per_batch)
    return x, torch.cat([y, y[: batch_size - len(y)]])


COMMANDS = {
    "step": (add_step_arguments, step, "step time of each method against its compute limit"),
    "losses": (
        add_losses_arguments,
        losses_cost,
        "the distillation and batch-hard losses, stacked vs called",
    ),
    "ops": (add_ops_arguments, step_ops, "computing ops dispatched by one training step of each method"),
}


if __name__ == "__main__":
    run_subcommands("perf_training", __doc__, COMMANDS)
