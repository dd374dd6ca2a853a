"""What an epoch checkpoint costs the training thread, and what the background write costs, at a backbone's size.

    python benchmarks/perf_checkpoint.py                       # BN-Inception (10.8 M parameters), CPU
    python benchmarks/perf_checkpoint.py --model resnet50      # 25.6 M (needs torchvision)
    python benchmarks/perf_checkpoint.py --quick               # SmallCNN, seconds (tested)

The state is what ``OnlineLearner`` checkpoints after an epoch of a two-network stage (F_p and F_s, as in
``ours``), built by the same ``pml_mutual.online.epoch_checkpoint``: both networks' weights and, mid-stage,
both fused-Adam states after a step (two moments per weight). After the stage's last epoch only the
networks are kept (no step follows). For each, through
``RunDirectory.save_in_background`` as the stage calls it: ``blocked`` = the time the training thread spends
in the call (CPU snapshot + finiteness check), ``write`` = the time until the background thread has the
file on disk (``wait()``), and the file's size; median of ``--repeats``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from perf_e2e import write_result  # noqa: E402
from perf_step import build  # noqa: E402

from pml_mutual.run_dir import RunDirectory  # noqa: E402
from pml_mutual.online import adam, epoch_checkpoint  # noqa: E402


def stage_state(model_name: str, device, image_size: int) -> tuple[dict, dict]:
    """(mid-stage state, last-epoch state) of a two-network stage after one optimiser step."""
    models, optimizers = {}, {}
    for k in ("trunk", "support_trunk"):
        model, probe = build(model_name, device, image_size)
        opt = adam(model.parameters(), lr=1e-5, weight_decay=5e-4)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()  # Adam's moments exist from the first step on
        models[k], optimizers[f"{k}_optimizer"] = model, opt
    return (epoch_checkpoint(1, 1, models, optimizers, [], last=False),
            epoch_checkpoint(1, 2, models, optimizers, [], last=True))


def measure(directory: RunDirectory, state: dict, repeats: int) -> dict:
    blocked, written = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        directory.save_in_background(state)
        t1 = time.perf_counter()
        directory.wait()
        blocked.append(t1 - t0)
        written.append(time.perf_counter() - t1)
    size = (directory.path / "in_progress.pt").stat().st_size
    return {"blocked_s": statistics.median(blocked), "write_s": statistics.median(written), "bytes": size}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bninception")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="SmallCNN, 2 repeats")
    p.add_argument("--out", type=Path, default=Path("runs") / "benchmarks" / "perf_checkpoint.json")  # git-ignored
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.repeats = "small_cnn", 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    mid, last = stage_state(args.model, device, 224)
    n_params = sum(t.numel() for t in last["models"]["trunk"].values() if t.is_floating_point())
    with tempfile.TemporaryDirectory(prefix="pml_mutual_ckpt_") as tmp:
        directory = RunDirectory(Path(tmp) / "run")
        directory.path.mkdir(parents=True)
        results = {"mid_stage": measure(directory, mid, args.repeats), "last_epoch": measure(directory, last, args.repeats)}
    for name, r in results.items():
        print(f"{name:10s}: training thread blocked {1000 * r['blocked_s']:7.1f} ms, background write "
              f"{1000 * r['write_s']:7.1f} ms, {r['bytes'] / 2**20:6.1f} MiB")
    ratios = {k: results["last_epoch"][k] / results["mid_stage"][k] for k in ("blocked_s", "write_s", "bytes")}
    print(f"model: {args.model} ({n_params / 1e6:.1f} M parameters per network, two networks), device {device}")
    print(f"ratio: last-epoch / mid-stage checkpoint: blocked {ratios['blocked_s']:.2f}, "
          f"write {ratios['write_s']:.2f}, size {ratios['bytes']:.2f}")
    result = {"model": args.model, "device": str(device), "parameters_per_network": n_params, "repeats": args.repeats,
              **results, "ratio_last_over_mid": ratios}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
