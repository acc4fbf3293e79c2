"""Kernel ridge regression of KRR-ST against the closed form, its gradients and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distillery.losses.krr import NonFiniteKernelError, krr_distill_loss, krr_predict


def _closed_form(fq: np.ndarray, fs: np.ndarray, ys: np.ndarray, ridge: float) -> np.ndarray:
    """K_qs (K_ss + ridge tr(K_ss) I)^-1 Y with F = [f, 1], by explicit inversion in numpy."""
    fq = np.hstack([fq, np.ones((len(fq), 1))])
    fs = np.hstack([fs, np.ones((len(fs), 1))])
    k_ss, k_qs = fs @ fs.T, fq @ fs.T
    return k_qs @ np.linalg.inv(k_ss + ridge * np.trace(k_ss) * np.eye(len(fs))) @ ys


@pytest.mark.parametrize("ridge", [1e-6, 1e-2, 1.0])
def test_prediction_equals_closed_form(ridge: float) -> None:
    rng = np.random.default_rng(0)
    fq, fs, ys = rng.normal(size=(7, 5)), rng.normal(size=(4, 5)), rng.normal(size=(4, 3))
    expected = _closed_form(fq, fs, ys, ridge)
    got = krr_predict(torch.tensor(fq), torch.tensor(fs), torch.tensor(ys), ridge=ridge)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-10)


def test_float32_inputs_are_solved_in_float64_and_returned_in_float32() -> None:
    rng = np.random.default_rng(1)
    fq, fs, ys = rng.normal(size=(6, 8)), rng.normal(size=(5, 8)), rng.normal(size=(5, 2))
    expected = _closed_form(fq, fs, ys, 1e-6)
    got = krr_predict(*(torch.tensor(a, dtype=torch.float32) for a in (fq, fs, ys)))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_tiny_ridge_interpolates_the_support_points() -> None:
    # N <= P + 1 independent points: the kernel is invertible and KRR fits them exactly.
    support, targets = (
        torch.randn(4, 6, dtype=torch.float64),
        torch.randn(4, 3, dtype=torch.float64),
    )
    torch.testing.assert_close(krr_predict(support, support, targets, ridge=1e-12), targets)


def test_duplicated_support_points_still_solve() -> None:
    # Singular K_ss: only the ridge keeps the system positive definite.
    fs = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
    ys = torch.tensor([[1.0], [3.0], [0.0]], dtype=torch.float64)
    fq = torch.tensor([[0.2, 0.3]], dtype=torch.float64)
    got = krr_predict(fq, fs, ys, ridge=1e-3)
    np.testing.assert_allclose(
        got.numpy(), _closed_form(fq.numpy(), fs.numpy(), ys.numpy(), 1e-3), rtol=1e-7
    )


def test_gradients_reach_synthetic_inputs_and_targets() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh())  # g: the kernel's feature map
    x_syn = nn.Parameter(torch.randn(5, 10))
    y_syn = nn.Parameter(torch.randn(5, 4))
    x_real, y_real = torch.randn(12, 10), torch.randn(12, 4)
    loss = krr_distill_loss(model(x_real), model(x_syn), y_syn, y_real)
    loss.backward()
    for name, grad in (("x_syn", x_syn.grad), ("y_syn", y_syn.grad)):
        assert grad is not None and torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_gradients_match_finite_differences() -> None:
    torch.manual_seed(0)
    fq = torch.randn(6, 4, dtype=torch.float64)
    fs = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, y: krr_predict(fq, s, y, ridge=1e-2), (fs, ys))


@pytest.mark.parametrize(("where", "name"), [("support", "K_ss"), ("query", "K_qs")])
def test_non_finite_kernel_raises_a_clear_error(where: str, name: str) -> None:
    fq, fs, ys = torch.randn(3, 4), torch.randn(2, 4), torch.randn(2, 2)
    (fs if where == "support" else fq)[0, 1] = float("inf") if where == "query" else float("nan")
    with pytest.raises(NonFiniteKernelError, match=rf"{name} .* non-finite entries"):
        krr_predict(fq, fs, ys)


def test_bad_ridge_and_shapes_are_rejected() -> None:
    fq, fs, ys = torch.randn(3, 4), torch.randn(2, 4), torch.randn(2, 2)
    with pytest.raises(ValueError, match="ridge must be > 0"):
        krr_predict(fq, fs, ys, ridge=0.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        krr_predict(fq, fs, torch.randn(3, 2))
