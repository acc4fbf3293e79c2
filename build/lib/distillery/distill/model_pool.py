"""KRR-ST's model pool: feature maps at every stage of training on the synthetic set.

The synthetic set must support the teacher's representation under the kernel of *any*
model trained on it, not of one fixed network, so each outer step draws its kernel's
feature map from a pool of models that are each somewhere between freshly initialised and
``max_steps`` steps of regression on the synthetic set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ModelPool", "RegressionModel"]


class RegressionModel(nn.Module):
    """An encoder and a linear head that regresses a ``target_dim``-dim representation.

    ``encoder(x)`` gives the kernel features; ``forward(x)`` the regression output.
    Shapes: x (B, 1, n_mels, T) -> encoder (B, embed_dim) -> forward (B, target_dim).
    """

    def __init__(self, encoder: nn.Module, target_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, target_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class ModelPool(nn.Module):
    """``size`` models from ``build()``, each with a step counter.

    - :meth:`initialise`: every member is re-initialised and trained a random number of
      steps, uniform in ``1..max_steps``, so the pool spans all stages of training.
    - :meth:`step`: one more training step of a member (SGD on ``MSE(model(x), y)``, with
      ``lr`` and L2 ``weight_decay``, full batch); a member whose counter
      reaches ``max_steps`` is re-initialised and its counter reset to 0. (The reference
      implementation does not reset it, so once a member has reached the limit it is
      re-initialised at every later step and the whole pool ends up fresh random models.)

    Members never require gradients outside their own training step, so the outer loss's
    gradients flow through them to the synthetic set only. Members and counters are
    submodules and buffers: they are saved in checkpoints and restored on resume.
    """

    def __init__(
        self,
        build: Callable[[], nn.Module],
        size: int = 10,
        max_steps: int = 1000,
        lr: float = 0.1,
        weight_decay: float = 1e-3,
    ) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.build = build
        self.max_steps = max_steps
        self.lr = lr
        self.weight_decay = weight_decay
        self.members = nn.ModuleList(build() for _ in range(size)).requires_grad_(False)
        self.register_buffer("steps", torch.zeros(size, dtype=torch.long))
        self.register_buffer("resets", torch.zeros(size, dtype=torch.long))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def __len__(self) -> int:
        return len(self.members)

    def reinitialise(self, i: int) -> None:
        """Fresh random weights for member ``i`` (in place, so its device stays) and counter 0."""
        self.members[i].load_state_dict(self.build().state_dict())
        self.steps[i] = 0
        self.resets[i] += 1

    def initialise(self, x: Tensor, y: Tensor) -> None:
        """Re-initialise every member and train it ``U{1..max_steps}`` steps on ``(x, y)``."""
        for i in range(len(self)):
            self.reinitialise(i)
            for _ in range(int(torch.randint(1, self.max_steps + 1, ()))):
                self._train_step(self.members[i], x, y)
                self.steps[i] += 1
        self.resets.zero_()
        self.ready.fill_(True)

    def sample(self) -> int:
        """Index of a uniformly drawn member (torch's global RNG, so seeded runs repeat)."""
        return int(torch.randint(len(self), ()))

    def features(self, i: int, x: Tensor) -> Tensor:
        """Kernel features of member ``i``: its encoder in eval mode (no dropout; BatchNorm
        with the running statistics of its training on the synthetic set), so real and
        synthetic inputs go through the same fixed function. Differentiable in ``x``."""
        member = self.members[i]
        member.eval()
        return member.encoder(x)

    def step(self, i: int, x: Tensor, y: Tensor) -> float:
        """One training step of member ``i`` on ``(x, y)`` (detached); returns its loss."""
        loss = self._train_step(self.members[i], x.detach(), y.detach())
        self.steps[i] += 1
        if self.steps[i] >= self.max_steps:
            self.reinitialise(i)
        return loss

    def _train_step(self, model: nn.Module, x: Tensor, y: Tensor) -> float:
        params = list(model.parameters())
        model.train()
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            try:
                loss = F.mse_loss(model(x), y)
                grads = torch.autograd.grad(loss, params)
            finally:
                for p in params:
                    p.requires_grad_(False)
        with torch.no_grad():  # SGD with L2 weight decay: p <- p - lr (g + wd p)
            for p, g in zip(params, grads, strict=True):
                p.add_(g + self.weight_decay * p, alpha=-self.lr)
        return float(loss.detach())
