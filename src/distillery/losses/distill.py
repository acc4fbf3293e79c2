"""Feature-distillation losses: CoSS (space similarity) and DPHuBERT's L1 - cosine.

Teacher tensors are used as given; pass them detached (the teacher is frozen).
Computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distillery.precision import at_least_float32

__all__ = ["coss_loss", "l1_cosine_distill_loss"]


def coss_loss(
    student: Tensor, teacher: Tensor, *, cosine_weight: float = 1.0, space_weight: float = 1.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """CoSS: per-sample cosine plus per-dimension ("space") cosine.

    With S, T the row-wise L2-normalised (B, D) student and teacher features:

    - ``cos   = mean_i (1 - <T_i, S_i>)`` (rows: samples);
    - ``space = mean_j (1 - <T^_j, S^_j>)`` where ``T^_j`` and ``S^_j`` are column j of
      T and S (one feature dimension across the batch), L2-normalised over the batch;
    - ``total = cosine_weight * cos + space_weight * space`` (the method's l0, l1).

    The space term depends on the whole batch (it is per device under DDP unless the caller
    gathers features first), and is noisy for small B.

    Args:
        student: (B, D) student features (after any projection to the teacher's D).
        teacher: (B, D) teacher features.

    Returns:
        (total, terms) with detached ``cos``, ``space`` (unweighted) and ``total``.
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"expected two (B, D) tensors of equal shape, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    s = F.normalize(at_least_float32(student), dim=1)
    t = F.normalize(at_least_float32(teacher), dim=1)
    cos = (1.0 - (s * t).sum(dim=1)).mean()
    # Columns of the row-normalised matrices, normalised over the batch axis.
    s_cols = F.normalize(s, dim=0)
    t_cols = F.normalize(t, dim=0)
    space = (1.0 - (s_cols * t_cols).sum(dim=0)).mean()
    total = cosine_weight * cos + space_weight * space
    return total, {"cos": cos.detach(), "space": space.detach(), "total": total.detach()}


def l1_cosine_distill_loss(
    student: Tensor, teacher: Tensor, *, mask: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Layer-distillation loss ``L1(S, T) - mean cos(S, T)`` (DPHuBERT, one layer pair).

    L1 is the mean absolute difference over every element; the cosine is taken along the
    last (feature) dim and averaged over the remaining positions. Sum the result over the
    distilled layers.

    Args:
        student: (B, T, D) or (B, D).
        teacher: same shape as ``student``.
        mask: optional bool (B, T) (or (B,)) marking valid positions, e.g. non-padded
            frames; invalid positions are excluded from both terms.

    Returns:
        (total, terms) with detached ``l1``, ``cos`` (mean cosine similarity, not a
        distance) and ``total``. ``total`` lies in [-1, inf).
    """
    if student.shape != teacher.shape or student.dim() not in (2, 3):
        raise ValueError(
            f"expected two (B, T, D) or (B, D) tensors of equal shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    s, t = at_least_float32(student), at_least_float32(teacher)
    abs_diff = (s - t).abs().mean(dim=-1)  # (B, T) or (B,): mean over D
    cos = F.cosine_similarity(s, t, dim=-1)
    if mask is None:
        l1 = abs_diff.mean()
        cos_mean = cos.mean()
    else:
        if mask.shape != cos.shape:
            raise ValueError(f"mask must have shape {tuple(cos.shape)}, got {tuple(mask.shape)}")
        w = mask.to(cos.dtype)
        n = w.sum().clamp(min=1.0)
        l1 = (abs_diff * w).sum() / n
        cos_mean = (cos * w).sum() / n
    total = l1 - cos_mean
    return total, {"l1": l1.detach(), "cos": cos_mean.detach(), "total": total.detach()}
