"""Input checks shared by the losses and the drift math: one clear error naming the problem."""
from __future__ import annotations

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


def nonfinite_tensors(obj, prefix: str = "") -> list[str]:
    """Names (dotted paths) of the floating-point tensors in a nested dict/list that hold NaN or inf."""
    if torch.is_tensor(obj):
        return [prefix or "tensor"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += nonfinite_tensors(v, f"{prefix}[{i}]")
    return out
