"""A user's encoder: a small CNN over log-mel, without exits (not a multi-exit student)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyCNN(nn.Module):
    """(B, 1, n_mels, T) log-mel -> (B, dim): two conv blocks, then mean over frequency and time."""

    def __init__(self, n_mels: int, dim: int = 32) -> None:
        super().__init__()
        self.embed_dim = dim
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, dim, 3, padding=1),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.mean(self.net(x), dim=(2, 3))
