"""Kernel ridge regression (KRR) with a linear kernel on features: the inner solve of KRR-ST.

A model ``g`` maps inputs to features; with ``F = [g(x), 1]`` the kernel between two sets
is ``K_ab = F_a F_b^T``. Fitting the synthetic set (features ``F_s``, targets ``Y_s``) and
predicting at query points ``F_q``::

    K_ss = F_s F_s^T,  lambda = ridge * tr(K_ss),  pred = K_qs (K_ss + lambda I)^-1 Y_s

The ridge is scaled by the trace so that it means the same thing whatever the scale of
the features. The solve runs in float64: with ``ridge = 1e-6`` the system's condition
number can reach about 1e6 times that of ``K_ss``, beyond what float32 resolves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NonFiniteKernelError", "krr_distill_loss", "krr_predict"]


class NonFiniteKernelError(FloatingPointError):
    """A kernel with NaN or infinite entries: the features fed to the solve diverged."""


def _with_bias(features: Tensor) -> Tensor:
    return torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)


def _check_finite(kernel: Tensor, name: str) -> None:
    bad = ~torch.isfinite(kernel)
    if bad.any():
        raise NonFiniteKernelError(
            f"KRR kernel {name} {tuple(kernel.shape)} has {int(bad.sum())} non-finite entries: "
            "the model's features of the synthetic or real inputs are NaN/inf (the synthetic "
            "set or the model diverged; lower the learning rate or check the inputs)"
        )


def krr_predict(
    query_features: Tensor,
    support_features: Tensor,
    support_targets: Tensor,
    *,
    ridge: float = 1e-6,
    bias: bool = True,
) -> Tensor:
    """KRR prediction at the query points, differentiable in every argument.

    Args:
        query_features: (Q, P) features of the points to predict (e.g. real clips).
        support_features: (N, P) features of the points fitted (the synthetic set).
        support_targets: (N, D) targets of the support points.
        ridge: ``lambda = ridge * tr(K_ss)``; must be > 0.
        bias: append a constant 1 feature (``F = [g(x), 1]``).

    Returns:
        (Q, D) predictions, in the dtype of ``support_targets``.

    Raises:
        NonFiniteKernelError: a kernel has NaN or infinite entries.
    """
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    if query_features.dim() != 2 or support_features.dim() != 2 or support_targets.dim() != 2:
        raise ValueError(
            "expected 2-D features and targets, got query "
            f"{tuple(query_features.shape)}, support {tuple(support_features.shape)}, "
            f"targets {tuple(support_targets.shape)}"
        )
    if (
        query_features.shape[1] != support_features.shape[1]
        or support_features.shape[0] != support_targets.shape[0]
    ):
        raise ValueError(
            f"shape mismatch: query {tuple(query_features.shape)}, support "
            f"{tuple(support_features.shape)}, targets {tuple(support_targets.shape)}"
        )
    fq, fs = query_features.double(), support_features.double()
    if bias:
        fq, fs = _with_bias(fq), _with_bias(fs)
    k_ss = fs @ fs.T
    k_qs = fq @ fs.T
    _check_finite(k_ss, "K_ss (synthetic x synthetic)")
    _check_finite(k_qs, "K_qs (query x synthetic)")
    system = k_ss + ridge * torch.trace(k_ss) * torch.eye(
        len(k_ss), dtype=k_ss.dtype, device=k_ss.device
    )
    targets = support_targets.double()
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        weights = torch.cholesky_solve(targets, factor)
    else:  # not numerically positive definite (e.g. duplicated points): LU still solves it
        weights = torch.linalg.solve(system, targets)
    return (k_qs @ weights).to(support_targets.dtype)


def krr_distill_loss(
    real_features: Tensor,
    synthetic_features: Tensor,
    synthetic_targets: Tensor,
    real_targets: Tensor,
    *,
    ridge: float = 1e-6,
) -> Tensor:
    """KRR-ST outer loss: MSE between the KRR prediction fitted on the synthetic set and the
    teacher's representation of the real inputs.

    Shapes: real_features (B, P), synthetic_features (N, P), synthetic_targets (N, D),
    real_targets (B, D) -> scalar (mean over B x D).
    """
    prediction = krr_predict(real_features, synthetic_features, synthetic_targets, ridge=ridge)
    return F.mse_loss(prediction, real_targets)
