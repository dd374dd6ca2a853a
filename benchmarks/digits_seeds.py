"""The digits demo over several seeds: how robust is each method's margin? (thin CLI over pml_mutual.demo)

python benchmarks/digits_seeds.py --seeds 0 1 2 3 4 --methods finetune fecd ours
"""

import argparse
import json

import numpy as np
import torch

from pml_mutual.demo import DEFAULT_METHODS, SETTINGS, final_row, run_setting


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument(
        "--validation", action="store_true", help="evaluate on a validation split of the training images"
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="write every row as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for setting in args.settings:
        per_method = {}
        for seed in args.seeds:
            res = run_setting(setting, args.methods, seed=seed, quick=args.quick, validation=args.validation)
            for method, summary in res.items():
                row = dict(zip(("old", "new", "all"), final_row(summary)))
                rows.append({"setting": setting, "seed": seed, "method": method, **row})
                per_method.setdefault(method, []).append([row["old"], row["new"], row["all"]])
        print(f"\n== digits {setting}, Recall@1 % (mean ± std over seeds {args.seeds}) ==")
        print(f"{'method':<12} {'old':>13} {'new':>13} {'all':>13}")
        for method, vals in per_method.items():
            v = np.array(vals)
            cells = " ".join(f"{m:6.2f} ± {s:4.2f}" for m, s in zip(v.mean(0), v.std(0)))
            print(f"{method:<12} {cells}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
