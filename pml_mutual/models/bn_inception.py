"""BN-Inception (Ioffe & Szegedy, ICML 2015), the backbone of the paper's main tables.

Module names follow the Caffe model as converted to PyTorch and widely used in deep metric learning
(``conv1_7x7_s2``, ``conv1_7x7_s2_bn``, ``inception_3a_1x1`` …, ``last_linear``), so that state dict
loads without renaming. Input: BGR, 0–255, minus the mean [104, 117, 128] (see
:class:`pml_mutual.data.transforms.ProtocolTransform` with ``input_space="bgr255"``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import nonfinite_tensors

# name: (in, 1x1, 3x3 reduce, 3x3, double 3x3 reduce, double 3x3, pool kind, pool projection)
# A block without a 1x1 branch (3c, 4e) halves the resolution: stride-2 3x3 convs and a stride-2 max pool.
# These are the widths of the released Caffe model (4c–4d project the pool to 128, so 4d and 4e see 608
# channels and 5a 1056), which differ slightly from the table of the paper that introduced it.
_BLOCKS = (
    ("3a", 192, 64, 64, 64, 64, 96, "avg", 32),
    ("3b", 256, 64, 64, 96, 64, 96, "avg", 64),
    ("3c", 320, None, 128, 160, 64, 96, "max", None),
    ("4a", 576, 224, 64, 96, 96, 128, "avg", 128),
    ("4b", 576, 192, 96, 128, 96, 128, "avg", 128),
    ("4c", 576, 160, 128, 160, 128, 160, "avg", 128),
    ("4d", 608, 96, 128, 192, 160, 192, "avg", 128),
    ("4e", 608, None, 128, 192, 192, 256, "max", None),
    ("5a", 1056, 352, 192, 320, 160, 224, "avg", 128),
    ("5b", 1024, 352, 192, 320, 192, 224, "max", 128),
)
FEATURE_SIZE = 1024


class BNInception(nn.Module):
    """BN-Inception trunk; ``forward`` returns the (N, 1024, h, w) feature map of ``inception_5b``.

    ``num_classes`` adds the ImageNet classifier ``last_linear`` (only to read or write full checkpoints).
    """

    def __init__(self, num_classes: int | None = None):
        super().__init__()
        self._conv("conv1_7x7_s2", 3, 64, 7, stride=2, padding=3)
        self.pool1_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self._conv("conv2_3x3_reduce", 64, 64, 1)
        self._conv("conv2_3x3", 64, 192, 3, padding=1)
        self.pool2_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        for name, c_in, c1, c3r, c3, cd_r, cd, pool, proj in _BLOCKS:
            p = f"inception_{name}"
            stride = 1 if c1 is not None else 2
            if c1 is not None:
                self._conv(f"{p}_1x1", c_in, c1, 1)
            self._conv(f"{p}_3x3_reduce", c_in, c3r, 1)
            self._conv(f"{p}_3x3", c3r, c3, 3, stride=stride, padding=1)
            self._conv(f"{p}_double_3x3_reduce", c_in, cd_r, 1)
            self._conv(f"{p}_double_3x3_1", cd_r, cd, 3, padding=1)
            self._conv(f"{p}_double_3x3_2", cd, cd, 3, stride=stride, padding=1)
            if stride == 2:
                setattr(self, f"{p}_pool", nn.MaxPool2d(3, stride=2, ceil_mode=True))
            elif pool == "avg":
                setattr(
                    self,
                    f"{p}_pool",
                    nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True),
                )
            else:
                setattr(self, f"{p}_pool", nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True))
            if proj is not None:
                self._conv(f"{p}_pool_proj", c_in, proj, 1)
        self.last_linear = nn.Linear(FEATURE_SIZE, num_classes) if num_classes else None

    def _conv(self, name: str, c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0) -> None:
        setattr(self, name, nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding))
        setattr(self, f"{name}_bn", nn.BatchNorm2d(c_out))

    def _cbr(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.relu(getattr(self, f"{name}_bn")(getattr(self, name)(x)), inplace=True)

    def _block(self, name: str, has_1x1: bool, has_proj: bool, x: torch.Tensor) -> torch.Tensor:
        p = f"inception_{name}"
        branches = [self._cbr(f"{p}_1x1", x)] if has_1x1 else []
        branches.append(self._cbr(f"{p}_3x3", self._cbr(f"{p}_3x3_reduce", x)))
        d = self._cbr(f"{p}_double_3x3_1", self._cbr(f"{p}_double_3x3_reduce", x))
        branches.append(self._cbr(f"{p}_double_3x3_2", d))
        pooled = getattr(self, f"{p}_pool")(x)
        branches.append(self._cbr(f"{p}_pool_proj", pooled) if has_proj else pooled)
        return torch.cat(branches, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1_3x3_s2(self._cbr("conv1_7x7_s2", x))
        x = self.pool2_3x3_s2(self._cbr("conv2_3x3", self._cbr("conv2_3x3_reduce", x)))
        for name, _, c1, *_, proj in _BLOCKS:
            x = self._block(name, c1 is not None, proj is not None, x)
        return x


def load_checkpoint_into(
    model: nn.Module, path: str | os.PathLike, what: str, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Load a pretrained state dict from a user path into ``model``, strictly.

    Keys starting with one of ``ignore_prefixes`` (the ImageNet classifier) are dropped; a ``state_dict`` /
    ``model`` wrapper and a ``module.`` prefix (DataParallel) are unwrapped; Caffe-converted BatchNorm
    buffers of shape (1, C) are squeezed. Any other missing or unexpected key is an error that names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: expected a PyTorch state dict file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a text file, a truncated download, a pickle that weights_only refuses
        raise ValueError(
            f"{path} is not a PyTorch state dict file ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"pass the {what} weights saved with torch.save(state_dict); files that need "
            "weights_only=False are not loaded (they could run code)"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    bad = nonfinite_tensors(state)
    if bad:
        raise ValueError(f"{path} holds NaN or inf values ({', '.join(bad[:5])}): not usable {what} weights")
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the {what} architecture: missing keys {missing[:8]}"
            f"{' …' if len(missing) > 8 else ''}, unexpected keys "
            f"{unexpected[:8]}{' …' if len(unexpected) > 8 else ''}"
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            if v.numel() == own[k].numel() and v.squeeze().shape == own[k].squeeze().shape:
                state[k] = v.reshape(own[k].shape)
            else:
                raise ValueError(
                    f"{path}: {k} has shape {tuple(v.shape)}, the {what} architecture needs "
                    f"{tuple(own[k].shape)}"
                )
    model.load_state_dict(state)


def bn_inception(weights: str | os.PathLike | None = None) -> BNInception:
    """BN-Inception trunk, with ImageNet weights from ``weights`` (a state dict file such as the widely
    used Caffe conversion ``bn_inception-52deb4733.pth``) or randomly initialised when None."""
    model = BNInception()
    if weights is not None:
        load_checkpoint_into(model, weights, "BN-Inception", ignore_prefixes=("last_linear.",))
    return model
