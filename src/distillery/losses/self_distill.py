"""Multi-exit self-distillation loss (UnFuSeD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.precision import at_least_float32

__all__ = ["multi_exit_loss"]


def _masked_ce(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """Mean CE over samples whose target is not ``ignore_index``; 0 when there are none.

    ``F.cross_entropy(reduction="mean")`` returns NaN when every target is ignored; the
    explicit masked mean avoids that without a device sync.
    """
    per_sample = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    n_valid = (targets != ignore_index).sum().clamp(min=1)
    return per_sample.sum() / n_valid


def multi_exit_loss(
    exit_logits: list[Tensor],
    final_logits: Tensor,
    targets: Tensor,
    *,
    exit_ce_weight: float = 0.7,
    exit_kl_weight: float = 0.3,
    exit_cos_weight: float = 0.003,
    detach_teacher: bool = False,
    ignore_index: int = -1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """UnFuSeD loss on exit heads h_i and the final classifier c, with pseudo-labels y.

    ``L = exit_ce_weight * sum_i CE(h_i, y) + CE(c, y)
    + exit_kl_weight * sum_i KL(softmax(c) || softmax(h_i))
    + exit_cos_weight * sum_i (2 - 2 cos(h_i, c))`` (the method's a, b, g)

    - CE: mean over samples with ``y != ignore_index`` (0 when there are none).
    - KL: per sample ``sum_k p_c,k (log p_c,k - log p_h,k)``, then mean over the batch
      ("batchmean"); all samples, labelled or not.
    - cos: cosine between the logit vectors h_i and c per sample, mean over the batch.
    - ``detach_teacher=True`` stops the gradient into c through the KL and cosine terms
      (c still learns from its own CE). Default False, as in the reference.

    Args:
        exit_logits: list of (B, k) exit-head logits.
        final_logits: (B, k) classifier logits c.
        targets: (B,) int64 pseudo-labels in [0, k) or ``ignore_index``.

    Returns:
        (total, terms): scalar loss, and detached unweighted sums over exits ``ce_exits``,
        ``ce_final``, ``kl``, ``cos`` (the 2 - 2cos distance), plus ``total``.
    """
    if final_logits.dim() != 2:
        raise ValueError(f"final_logits must be (B, k), got {tuple(final_logits.shape)}")
    for i, h in enumerate(exit_logits):
        # A head whose width is not k would silently mis-train; fail loudly instead.
        if h.shape != final_logits.shape:
            raise ValueError(
                f"exit_logits[{i}] has shape {tuple(h.shape)}, expected {tuple(final_logits.shape)}"
            )
    if targets.shape != final_logits.shape[:1]:
        raise ValueError(f"targets must be ({final_logits.shape[0]},), got {tuple(targets.shape)}")

    teacher = final_logits.detach() if detach_teacher else final_logits
    log_p_c = F.log_softmax(at_least_float32(teacher), dim=1)

    zero = final_logits.new_zeros((), dtype=torch.float32)
    ce_exits, kl, cos_dist = zero, zero, zero
    for h in exit_logits:
        ce_exits = ce_exits + _masked_ce(at_least_float32(h), targets, ignore_index)
        log_p_h = F.log_softmax(at_least_float32(h), dim=1)
        kl = kl + F.kl_div(log_p_h, log_p_c, reduction="batchmean", log_target=True)
        cos_dist = (
            cos_dist
            + (
                2.0
                - 2.0 * F.cosine_similarity(at_least_float32(h), at_least_float32(teacher), dim=1)
            ).mean()
        )
    ce_final = _masked_ce(at_least_float32(final_logits), targets, ignore_index)

    total = exit_ce_weight * ce_exits + ce_final + exit_kl_weight * kl + exit_cos_weight * cos_dist
    terms = {
        "ce_exits": ce_exits.detach(),
        "ce_final": ce_final.detach(),
        "kl": kl.detach(),
        "cos": cos_dist.detach(),
        "total": total.detach(),
    }
    return total, terms
