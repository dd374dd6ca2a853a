from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """Three conv blocks (conv-BN-ReLU ×2, max-pool) → global average pool → Linear → L2-normalised embedding.

    The CPU benchmark's backbone for 28×28 / 32×32 grey images (~0.3 M parameters at the defaults).
    """

    def __init__(
        self, in_channels: int = 1, widths: tuple[int, int, int] = (32, 64, 128), embedding_size: int = 128
    ):
        super().__init__()
        chans = (in_channels,) + tuple(widths)
        self.trunk = nn.Sequential(*[_block(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.embedding = nn.Linear(widths[-1], embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x).mean(dim=(2, 3))
        return F.normalize(self.embedding(h), dim=1)
