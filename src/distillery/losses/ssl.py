"""Self-supervised objectives for the teacher stage: BYOL, SimCLR (NT-Xent), Barlow Twins.

All are computed in float32 whatever the input dtype, so they are safe under autocast.
They see only the local batch; under DDP, gathering (NT-Xent negatives, Barlow Twins
cross-correlation) is the caller's choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.precision import at_least_float32

__all__ = ["barlow_twins_loss", "byol_loss", "nt_xent"]


def _check_pair(z1: Tensor, z2: Tensor) -> None:
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"expected two (B, D) tensors, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )


def byol_loss(online_pred: Tensor, target_proj: Tensor) -> Tensor:
    """BYOL regression loss ``2 - 2 cos(p, z)``, mean over the batch.

    The target is used as given: pass ``target_proj.detach()`` (the stop-gradient is the
    caller's, so the function stays usable for symmetric or experimental setups).

    Args:
        online_pred: (B, D) online predictor output.
        target_proj: (B, D) target-network projection.

    Returns:
        scalar in [0, 4].
    """
    if online_pred.shape != target_proj.shape:
        raise ValueError(
            f"shape mismatch: {tuple(online_pred.shape)} vs {tuple(target_proj.shape)}"
        )
    cos = F.cosine_similarity(at_least_float32(online_pred), at_least_float32(target_proj), dim=-1)
    return (2.0 - 2.0 * cos).mean()


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR NT-Xent loss over the 2B views (symmetric).

    Each of the 2B L2-normalised embeddings must pick its positive (the other view of the
    same clip) among the other 2B - 1, with logits ``cos / temperature``; the loss is the
    mean CE over all 2B anchors.

    Args:
        z1, z2: (B, D) projections of two views; row i of z1 and row i of z2 are positives.
        temperature: softmax temperature (> 0).

    Returns:
        scalar.
    """
    _check_pair(z1, z2)
    n = z1.shape[0]
    z = F.normalize(at_least_float32(torch.cat([z1, z2], dim=0)), dim=1)  # (2B, D)
    logits = z @ z.t() / temperature  # (2B, 2B)
    # An anchor must not be its own candidate.
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    idx = torch.arange(n, device=z.device)
    positives = torch.cat([idx + n, idx])  # view 1 -> view 2 and back
    return F.cross_entropy(logits, positives)


def barlow_twins_loss(
    z1: Tensor, z2: Tensor, lambda_offdiag: float = 5e-3, *, eps: float = 1e-5
) -> Tensor:
    """Barlow Twins redundancy-reduction loss.

    Each feature is standardised over the batch (mean 0, biased variance 1, as a
    non-affine BatchNorm does), ``C = z1n^T z2n / B`` is the (D, D) cross-correlation, and
    ``L = sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2``.

    Args:
        z1, z2: (B, D) projections of two views, B >= 2.
        lambda_offdiag: weight of the off-diagonal (redundancy) term.
        eps: added to the variance before the square root.

    Returns:
        scalar.
    """
    _check_pair(z1, z2)
    n = z1.shape[0]
    if n < 2:
        raise ValueError("barlow_twins_loss needs a batch of at least 2 to standardise features")

    def standardise(z: Tensor) -> Tensor:
        z = at_least_float32(z)
        return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)

    c = standardise(z1).t() @ standardise(z2) / n  # (D, D)
    diag = torch.diagonal(c)
    on_diag = (1.0 - diag).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + lambda_offdiag * off_diag
