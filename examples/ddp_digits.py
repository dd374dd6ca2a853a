"""A short multi-stage `ours` run on the digits under torchrun; checks that every rank ends with the same
weights.

    torchrun --nproc_per_node 2 examples/ddp_digits.py            # CPU: gloo; GPUs: NCCL
    torchrun --nproc_per_node 2 examples/ddp_digits.py --run-dir runs/ddp_digits   # rerun: resumes

Batches are per rank (here 2 × 8 = a global batch of 16, two classes; losses on the global batch). Exits 1 if
the
ranks' weights or drift states differ.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from pml_mutual import OnlineConfig, OnlineLearner, distributed
from pml_mutual.data import load_digits_splits, stage_assignment
from pml_mutual.models import EmbeddingMLP


def fingerprint(tensors) -> torch.Tensor:
    """Exact summary of a list of tensors: their concatenated float64 values (compared across ranks)."""
    return torch.cat([t.detach().double().flatten().cpu() for t in tensors])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=None)
    p.add_argument(
        "--batch-size", type=int, default=8, help="per rank (stages of 3 classes: 2 ranks × 1 class × 8)"
    )
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--gram-scope", choices=distributed.GRAM_SCOPES, default="global")
    p.add_argument("--cpu", action="store_true", help="gloo on the CPU even where there are GPUs")
    args = p.parse_args(argv)
    device = distributed.init_from_env(backend="gloo" if args.cpu else None)
    if args.cpu:
        device = torch.device("cpu")
    train, test = load_digits_splits()
    config = OnlineConfig(
        method="ours",
        epochs=2,
        iterations_per_epoch=args.iterations,
        batch_size=args.batch_size,
        m_per_class=8,
        lr=1e-3,
        weight_decay=0.0,
        lambda_corr=100.0,
        lambda_mutual=1.0,
        freeze_batchnorm=False,
        device=str(device),
        gram_scope=args.gram_scope,
    )
    learner = OnlineLearner.from_class_assignment(
        EmbeddingMLP, train, test, stage_assignment(range(10), 4, 3), config=config, run_dir=args.run_dir
    )
    t0 = time.perf_counter()
    summary = learner.run()
    seconds = time.perf_counter() - t0
    model = learner.load_stage_model(len(learner.train_stages) - 1)
    state = learner.compensator.state_dict()
    drift = [
        t
        for key in ("class_ids", "stage_prototypes", "prototype_drifts")
        for t in state[key]
        if torch.is_tensor(t)
    ]
    mine = torch.cat([fingerprint(model.state_dict().values()), fingerprint(drift)])
    ok = True
    if distributed.is_active():
        everyone = [torch.empty_like(mine) for _ in range(distributed.world_size())]
        dist.all_gather(everyone, mine.to(device) if device.type == "cuda" else mine)
        ok = all(torch.equal(everyone[0].cpu(), e.cpu()) for e in everyone[1:])
    if distributed.is_main():
        final = summary["stages"][-1]
        print(f"ranks: {distributed.world_size()}  weights and drift identical across ranks: {ok}")
        print(f"final Recall@1 all classes: {100 * final['all'][1]:.2f}  ({seconds:.1f}s)")
    del learner, model
    distributed.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
