"""Input checks shared by the losses and the drift math: one clear error naming the problem."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def check_embeddings(x: torch.Tensor, name: str = "embeddings") -> None:
    """A non-empty 2-D floating-point tensor (of finite values, checked on CPU), or a TypeError/ValueError
    saying which rule fails."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, embedding_size), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    # Values are checked where reading them is free. On an accelerator the read would stall the host on
    # every call (every training step): there a NaN or inf reaches the loss, which the trainer checks on
    # the device and reads once per epoch, before any checkpoint.
    if x.device.type == "cpu" and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values")


def _floating_leaves(obj, prefix: str):
    if torch.is_tensor(obj):
        if obj.is_floating_point() and obj.numel():
            yield prefix or "tensor", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _floating_leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _floating_leaves(v, f"{prefix}[{i}]")


def nonfinite_tensors(obj, prefix: str = "") -> list[str]:
    """Names (dotted paths) of the floating-point tensors in a nested dict/list that hold NaN or inf.

    A tensor is finite iff its minimum and maximum are (both propagate NaN): one reduction per tensor
    that allocates nothing (isfinite().all() writes a mask as large as the tensor, ~30× slower on a
    checkpoint), and one host read per device and dtype rather than one per tensor (each a GPU sync).
    """
    leaves = list(_floating_leaves(obj, prefix))
    groups: dict[tuple, list[int]] = {}
    for i, (_, t) in enumerate(leaves):
        groups.setdefault((t.device, t.dtype), []).append(i)
    bad = []
    for members in groups.values():
        extremes = torch.stack([torch.stack(torch.aminmax(leaves[i][1])) for i in members])
        finite = torch.isfinite(extremes).all(dim=1).tolist()
        bad += [i for i, ok in zip(members, finite) if not ok]
    return [leaves[i][0] for i in sorted(bad)]


def check_output_file(path, flag: str = "--out") -> Path:
    """A file a command will write at its end, checked before any work: not a directory, every existing
    ancestor a directory, the nearest one writable. Raises ``SystemExit`` naming the flag."""
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"{flag} {path} is a directory: name a file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SystemExit(f"{flag} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
                raise SystemExit(f"{flag} {path} is not writable")
            break
    return path
