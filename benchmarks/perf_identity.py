"""What the run identity's content checks cost at CUB size: the model's code and a seeded sample of each
dataset's items (64 per dataset, read through __getitem__, twice to tell deterministic datasets).

    python benchmarks/perf_identity.py --out /tmp/perf_identity.json              # 11,788 images of 500×375
    python benchmarks/perf_identity.py --images 400 --out /tmp/perf_identity.json  # quicker

Writes a CUB-format dataset of real image size into a temporary directory, builds the protocol's
training / prototype / test datasets (224-pixel crops), and times ``OnlineLearner.content_records()``
against a baseline measured in the same run: one pass of the test set through ``__getitem__`` (what one
evaluation decodes). Printed as seconds and as the ratio to that baseline.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pml_mutual import OnlineConfig, OnlineLearner
from pml_mutual.data import ImageListDataset, ProtocolTransform, load_cub, stages_from_ends
from pml_mutual.data.fixtures import write_cub_fixture
from pml_mutual.models import BNInception


class UserDataset(torch.utils.data.Dataset):
    """A dataset of the user's own (no attribute the package knows but ``labels``)."""

    def __init__(self, base):
        self.base, self.labels = base, base.labels

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=11_788, help="images in all (CUB-200-2011: 11,788)")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--out", required=True, help="JSON result file (never inside the source tree by default)")
    args = parser.parse_args(argv)
    per_class = max(4, args.images // args.classes)
    with tempfile.TemporaryDirectory(prefix="pml_mutual_identity_") as tmp:
        root = write_cub_fixture(Path(tmp) / "CUB_200_2011", [per_class] * args.classes, size=(500, 375), workers=2)
        train_items, test_items = load_cub(root)
        train = ImageListDataset(train_items, ProtocolTransform(True, size=224))
        prototypes = ImageListDataset(train_items, ProtocolTransform(False, size=224))
        test = ImageListDataset(test_items, ProtocolTransform(False, size=224))
        learner = OnlineLearner.from_class_assignment(
            BNInception, train, test, stages_from_ends(range(args.classes), [args.classes // 2]),
            prototype_dataset=prototypes, config=OnlineConfig(device="cpu", min_images_per_class=2, m_per_class=2,
                                                              batch_size=4), run_dir=Path(tmp) / "run", quiet=True)
        t0 = time.perf_counter()
        records = learner.content_records()
        content = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(len(test)):
            test[i]
        test_pass = time.perf_counter() - t0
        # the finiteness check before training: free for image lists (decoded pixels are finite), one
        # __getitem__ pass for a dataset of the user's own (here the same images behind a wrapper)
        custom = OnlineLearner.from_class_assignment(
            BNInception, UserDataset(train), UserDataset(test), stages_from_ends(range(args.classes), [args.classes // 2]),
            prototype_dataset=UserDataset(prototypes), config=learner.config, run_dir=Path(tmp) / "run2", quiet=True)
        t0 = time.perf_counter()
        learner.check_inputs_finite()
        finite_lists = time.perf_counter() - t0
        t0 = time.perf_counter()
        custom.check_inputs_finite()
        finite_custom = time.perf_counter() - t0
    result = {"images": per_class * args.classes, "image_size": [500, 375], "crop": 224,
              "sampled_datasets": sum(len(v) for k, v in records.items() if k.startswith("items:")),
              "content_records_s": content, "test_set_pass_s": test_pass, "ratio": content / test_pass,
              "test_items": len(test_items), "finite_check_image_lists_s": finite_lists,
              "finite_check_own_dataset_s": finite_custom, "finite_check_own_dataset_ratio": finite_custom / test_pass}
    print(f"content records (model code + 64-item samples of {result['sampled_datasets']} datasets, read twice): "
          f"{content:.2f} s; one pass of the {len(test_items)} test items: {test_pass:.2f} s; ratio {content / test_pass:.3f}")
    print(f"finite-input check before training: image lists {finite_lists:.3f} s; the same data as datasets of "
          f"one's own {finite_custom:.1f} s ({finite_custom / test_pass:.2f}x a test-set pass)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
