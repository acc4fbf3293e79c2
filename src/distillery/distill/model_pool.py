"""KRR-ST's model pool: feature maps at every stage of training on the synthetic set.

The synthetic set must support the teacher's representation under the kernel of *any*
model trained on it, not of one fixed network, so each outer step draws its kernel's
feature map from a pool of models that are each somewhere between freshly initialised and
``max_steps`` steps of regression on the synthetic set.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ModelPool", "RegressionModel"]

# What a random draw is for (the first element of its key after the seed).
_INIT, _STEPS, _SAMPLE = 0, 1, 2


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
      ``lr``, ``momentum`` (torch's SGD rule; the velocity restarts with the member) and L2
      ``weight_decay``, full batch); a member whose counter
      reaches ``max_steps`` is re-initialised and its counter reset to 0. (The reference
      implementation does not reset it, so once a member has reached the limit it is
      re-initialised at every later step and the whole pool ends up fresh random models.)

    Every rank trains the members alike on the same synthetic set, so their BatchNorms are
    not synchronised across ranks (``batchnorm_sync``, :mod:`distillery.pipeline.batchnorm`).

    Members never require gradients outside their own training step, so the outer loss's
    gradients flow through them to the synthetic set only. Members and counters are
    submodules and buffers: they are saved in checkpoints and restored on resume.

    Every random draw (fresh weights, initial step counts, the member of an outer step) is
    a function of ``seed`` and where it happens, never of the global RNG: DDP ranks (which
    draw their augmentations differently) keep identical pools, and a resumed run draws
    what an uninterrupted one would.
    """

    def __init__(
        self,
        build: Callable[[], nn.Module],
        size: int = 10,
        max_steps: int = 1000,
        lr: float = 0.1,
        weight_decay: float = 1e-3,
        seed: int = 0,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.build = build
        self.max_steps = max_steps
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"pool momentum must be in [0, 1), got {momentum}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.seed = seed
        self.members = nn.ModuleList(build() for _ in range(size)).requires_grad_(False)
        n_params = sum(p.numel() for p in self.members[0].parameters())
        # Each member's SGD velocity, its parameters flattened in order (saved in checkpoints).
        self.register_buffer("velocity", torch.zeros(size, n_params))
        self.register_buffer("steps", torch.zeros(size, dtype=torch.long))
        self.register_buffer("resets", torch.zeros(size, dtype=torch.long))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    #: Every rank trains the members on the same data: no BatchNorm sync across ranks.
    batchnorm_sync = False

    def __len__(self) -> int:
        return len(self.members)

    def _draw(self, *key: int) -> int:
        """A 32-bit random integer determined by ``seed`` and ``key`` alone."""
        return int(np.random.SeedSequence([self.seed, *key]).generate_state(1)[0])

    def reinitialise(self, i: int) -> None:
        """Fresh random weights for member ``i`` (in place, so its device stays) and counter 0;
        the weights are drawn from (seed, member, how often it was reset)."""
        with torch.random.fork_rng(devices=[]):  # leaves the global RNG where it was
            torch.manual_seed(self._draw(_INIT, i, int(self.resets[i])))
            fresh = self.build()
        self.members[i].load_state_dict(fresh.state_dict())
        self.steps[i] = 0
        self.resets[i] += 1

    def initialise(self, x: Tensor, y: Tensor) -> None:
        """Re-initialise every member and train it ``U{1..max_steps}`` steps on ``(x, y)``."""
        for i in range(len(self)):
            self.reinitialise(i)
            for _ in range(1 + self._draw(_STEPS, i) % self.max_steps):
                self._train_step(i, x, y)
                self.steps[i] += 1
        self.resets.zero_()
        self.ready.fill_(True)

    def sample(self, step: int) -> int:
        """The member of outer step ``step``, uniform over the pool: the same on every rank
        and for every micro-batch of an accumulated step."""
        return self._draw(_SAMPLE, step) % len(self)

    def features(self, i: int, x: Tensor) -> Tensor:
        """Kernel features of member ``i``: its encoder in eval mode (no dropout; BatchNorm
        with the running statistics of its training on the synthetic set), so real and
        synthetic inputs go through the same fixed function. Differentiable in ``x``."""
        member = self.members[i]
        member.eval()
        return member.encoder(x)

    def step(self, i: int, x: Tensor, y: Tensor) -> float:
        """One training step of member ``i`` on ``(x, y)`` (detached); returns its loss."""
        loss = self._train_step(i, x.detach(), y.detach())
        self.steps[i] += 1
        if self.steps[i] >= self.max_steps:
            self.reinitialise(i)
        return loss

    def _train_step(self, i: int, x: Tensor, y: Tensor) -> float:
        model = self.members[i]
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
        with (
            torch.no_grad()
        ):  # torch's SGD: v <- m v + (g + wd p) (v = g + wd p at first); p <- p - lr v
            flat = torch.cat(
                [
                    (g + self.weight_decay * p).reshape(-1)
                    for p, g in zip(params, grads, strict=True)
                ]
            )
            velocity = self.velocity[i]
            if int(self.steps[i]) == 0:
                velocity.copy_(flat)
            else:
                velocity.mul_(self.momentum).add_(flat)
            offset = 0
            for p in params:
                p.sub_(velocity[offset : offset + p.numel()].view_as(p), alpha=self.lr)
                offset += p.numel()
        return float(loss.detach())
