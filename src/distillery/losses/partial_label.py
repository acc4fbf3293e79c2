"""Targets and losses of self-distillation with partial labels (one-round PLL student).

The teacher's two most likely classes form each item's candidate set; the student learns
from the two-hot target (1/2 on each candidate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.precision import at_least_float32

__all__ = ["candidate_gce_loss", "soft_cross_entropy", "top_k_candidates"]


def top_k_candidates(teacher_logits: Tensor, k: int = 2) -> Tensor:
    """Uniform target over the teacher's ``k`` highest-scoring classes.

    Args:
        teacher_logits: (B, C) logits (or probabilities: only their order matters).
        k: candidates per item (2 for the two-hot target).

    Returns:
        (B, C) float32 rows with ``1/k`` on the top-``k`` classes and 0 elsewhere; ties are
        broken towards the smaller class index.
    """
    if teacher_logits.dim() != 2:
        raise ValueError(f"expected (B, C) teacher logits, got shape {tuple(teacher_logits.shape)}")
    if not 1 <= k <= teacher_logits.shape[1]:
        raise ValueError(f"k must be in [1, C={teacher_logits.shape[1]}], got {k}")
    # Stable sort of the negated scores keeps the first index among equal scores.
    top = torch.sort(-at_least_float32(teacher_logits), dim=1, stable=True).indices[:, :k]
    targets = torch.zeros_like(teacher_logits, dtype=torch.float32)
    return targets.scatter_(1, top, 1.0 / k)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_i -sum_c targets_ic log softmax(logits_i)_c``: CE to a (B, C) soft target.

    With ``softmax(teacher)`` it is the SD-round loss (T = 1); with a two-hot target it is
    the label-averaging PLL loss ``-(log p_a + log p_b) / 2``.
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape"
        )
    return -(targets * F.log_softmax(at_least_float32(logits), dim=1)).sum(dim=1).mean()


def candidate_gce_loss(logits: Tensor, candidates: Tensor, q: float = 0.7) -> Tensor:
    """Generalised CE over each item's candidates: ``mean_i mean_{c in S_i} (1 - p_ic^q) / q``.

    The reference code's PLL loss. ``q -> 0`` gives CE, ``q = 1`` the (bounded, noise
    robust) MAE; candidates are the nonzero entries of ``candidates`` (B, C).
    """
    if logits.shape != candidates.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and candidates {tuple(candidates.shape)} differ in shape"
        )
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    mask = (candidates > 0).float()
    per_class = (1.0 - F.softmax(at_least_float32(logits), dim=1).pow(q)) / q
    return ((per_class * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
