from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingMLP(nn.Module):
    """A small MLP with an L2-normalised embedding: the model of the digits demo and of quick tests."""

    def __init__(self, in_features: int = 64, hidden: int = 256, embedding_size: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.embedding = nn.Linear(hidden, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embedding(self.trunk(x.flatten(1))), dim=1)
