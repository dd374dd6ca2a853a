"""A copy of a CUB-200-2011 directory with every image stored at the protocol's first resize.

    python -m pml_mutual.data.resize CUB_200_2011 CUB_200_2011_256 [--short-side 256] [--workers 8]

Both transforms of the protocol start with Resize(256) (shorter side to 256, bilinear): stored at that
size, an image skips the resize at load time (a no-op on an image already that size) and decodes ~2×
fewer pixels. ``benchmarks/perf_pipeline.py decode`` measures what the loader gains; the stored pixels are
``resize_shorter(image, short_side)`` re-encoded as JPEG (``quality``), so the numbers of a run on the
copy differ from the original's by that re-encoding only. Images whose shorter side is already
``short_side`` or less are copied byte for byte (the loader resizes them as before). The copy is a new
dataset: a run directory made on the original refuses it (its identity includes the images' directory).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from .cub import read_cub
from .images import open_image
from .transforms import resize_shorter

CUB_TABLES = ("images.txt", "image_class_labels.txt", "classes.txt", "train_test_split.txt")


def _resize_one(src: Path, dst: Path, short_side: int, quality: int) -> None:
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as probe:
        size = probe.size
    if min(size) <= short_side:
        shutil.copyfile(src, dst)
        return
    image = resize_shorter(open_image(src), short_side)  # the pixels the loader's Resize would give
    if src.suffix.lower() == ".png":
        image.save(dst, format="PNG")
    else:
        image.save(dst, format="JPEG", quality=quality)


def _resize_many(jobs: list[tuple[Path, Path]], short_side: int, quality: int) -> None:
    for src, dst in jobs:
        _resize_one(src, dst, short_side, quality)


def write_resized_cub(
    src_root: str | os.PathLike,
    dst_root: str | os.PathLike,
    short_side: int = 256,
    quality: int = 95,
    workers: int = 1,
) -> Path:
    """Write the copy to ``dst_root`` (a new or empty directory) and return it; the source is only read."""
    src, dst = Path(src_root), Path(dst_root)
    if isinstance(short_side, bool) or not isinstance(short_side, int) or short_side < 1:
        raise ValueError(f"short_side must be a positive integer, got {short_side!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality!r}")
    items, _ = read_cub(src)  # a CUB directory whose image paths stay under images/
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise ValueError(f"{dst}: the copy must not be, contain or lie inside the source {src}")
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} is not empty: the copy is written to a new or empty directory only")
    dst.mkdir(parents=True, exist_ok=True)
    jobs = [(items.root / p, dst / "images" / p) for p in items.paths]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.starmap(_resize_many, [(jobs[w::workers], short_side, quality) for w in range(workers)])
    else:
        _resize_many(jobs, short_side, quality)
    for name in CUB_TABLES:  # written last: a copy cut short is not a readable dataset
        shutil.copyfile(src / name, dst / name)
    return dst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="CUB_200_2011 directory (holding images.txt)")
    p.add_argument("dst", type=Path, help="new or empty directory for the copy")
    p.add_argument(
        "--short-side", type=int, default=256, help="the transforms' first Resize (256 in the protocol)"
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the resized images")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    out = write_resized_cub(args.src, args.dst, args.short_side, args.quality, args.workers)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
