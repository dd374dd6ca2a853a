"""What a pre-resized copy of the dataset gains the loader: images/s of decoding + transform.

    python benchmarks/perf_decode.py [--workers 14] [--classes 20 --images-per-class 40]
    python benchmarks/perf_decode.py --quick                                   # seconds (tested)

Writes a CUB-format directory of JPEGs at CUB's size (500×375, ``--image-width/height``), its copy by
``pml_mutual.data.resize.write_resized_cub`` (shorter side 256, the protocol's first Resize), then, in the
same run, the training DataLoader's images/s over both with the train transform (Resize 256 →
RandomResizedCrop 224 → flip) and with the test transform (Resize 256 → CenterCrop 224: drift and
evaluation), ``--workers`` workers. Printed: each rate and ``ratio: resized/original``. On a GPU machine
drift and evaluation were bound by this decoding (README, "Performance"); compare the rates with the
model's images/s there.

Decoding on the device (``OnlineConfig(embed_decode="device")``, needs torchvision): the embedding pass's
input, workers reading files and torchvision decoding on ``--device`` (nvJPEG on CUDA), against the same
pass decoded by the workers, both up to the batch on the device: ``ratio: device/workers embedding
decode``. On the CPU the device decoder is one process against ``--workers``; the comparison that
matters is on a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from perf_e2e import embed_images_per_second, loader_images_per_second, write_result  # noqa: E402

from pml_mutual.data import ImageListDataset, ProtocolTransform, load_cub  # noqa: E402
from pml_mutual.data.fixtures import write_cub_fixture  # noqa: E402
from pml_mutual.data.resize import write_resized_cub  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--images-per-class", type=int, default=40)
    p.add_argument("--image-width", type=int, default=500)
    p.add_argument("--image-height", type=int, default=375)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the device-decoding pass decodes (and where both embedding passes deliver)")
    p.add_argument("--quick", action="store_true", help="4 classes × 8 images, batch 8, 2 workers")
    p.add_argument("--out", type=Path, default=Path("runs") / "benchmarks" / "perf_decode.json")  # git-ignored
    args = p.parse_args(argv)
    if args.quick:
        args.classes, args.images_per_class, args.batch, args.workers = 4, 8, 8, min(args.workers, 2)
    tmp = tempfile.TemporaryDirectory(prefix="pml_mutual_decode_")
    original = write_cub_fixture(Path(tmp.name) / "CUB_200_2011", [args.images_per_class] * args.classes,
                                 size=(args.image_width, args.image_height), workers=args.workers)
    t0 = time.perf_counter()
    resized = write_resized_cub(original, Path(tmp.name) / "CUB_200_2011_256", short_side=round(args.crop * 256 / 224),
                                workers=args.workers)
    copy_seconds = time.perf_counter() - t0
    n_batches = args.classes * args.images_per_class // args.batch
    rates = {}
    for name, root in (("original", original), ("resized", resized)):
        items = load_cub(root, split="official")[0]
        for transform in ("train", "test"):
            dataset = ImageListDataset(items, ProtocolTransform(transform == "train", "imagenet", args.crop))
            rates[f"{transform}_{name}"] = loader_images_per_second(dataset, args.batch, args.workers, n_batches, False)
    device = torch.device(args.device)
    test = ImageListDataset(load_cub(original, split="official")[0], ProtocolTransform(False, "imagenet", args.crop))
    embed = {"workers": embed_images_per_second(test, args.batch, args.workers, device, "workers")}
    try:
        from pml_mutual.data.device_decode import require_torchvision_decoder

        require_torchvision_decoder()
        embed["device"] = embed_images_per_second(test, args.batch, args.workers, device, "device")
    except ImportError as e:
        print(f"device decoding not measured: {e}")
    result = {"images": f"{args.image_width}x{args.image_height}", "workers": args.workers, "batch": args.batch,
              "device": str(device), "embed_images_per_s": embed,
              "ratio_device_over_workers_embedding": embed["device"] / embed["workers"] if "device" in embed else None,
              "copy_seconds": copy_seconds, "images_per_s": rates,
              "ratio_resized_over_original": {t: rates[f"{t}_resized"] / rates[f"{t}_original"] for t in ("train", "test")}}
    for t in ("train", "test"):
        print(f"loader {t} transform: original {rates[f'{t}_original']:.0f} images/s, resized {rates[f'{t}_resized']:.0f} "
              f"images/s ({args.workers} workers)")
    print(f"copy written in {copy_seconds:.1f}s ({args.classes * args.images_per_class} images)")
    for t, r in result["ratio_resized_over_original"].items():
        print(f"ratio: resized/original {t} {r:.2f}")
    print(f"embedding pass input on {device}: decoded by {args.workers} workers {embed['workers']:.0f} images/s"
          + (f", decoded on the device {embed['device']:.0f} images/s" if "device" in embed else ""))
    if "device" in embed:
        print(f"ratio: device/workers embedding decode {result['ratio_device_over_workers_embedding']:.2f}")
    write_result(args.out, result)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
