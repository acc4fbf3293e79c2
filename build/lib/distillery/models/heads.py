"""Small MLP heads put on top of encoders (exit heads, projectors, predictors).

All heads map (B, in_dim) -> (B, out_dim). They contain BatchNorm1d, so in training mode
they need B >= 2.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MLPHead", "ProjectionHead"]


class MLPHead(nn.Module):
    """``num_hidden`` x (Linear-BN-ReLU), then Linear to ``out_dim``.

    With two hidden layers (default) it is the UnFuSeD exit head h_i (``out_dim`` = number
    of pseudo-label clusters k). Shapes: (B, in_dim) -> (B, out_dim).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_hidden: int = 2) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_hidden):
            layers += [
                nn.Linear(width, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
            ]
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ProjectionHead(MLPHead):
    """Linear-BN-ReLU-Linear: the BYOL/SimCLR projector (BYOL's predictor has the same shape).

    Shapes: (B, in_dim) -> (B, out_dim).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_hidden=1)
