"""BYOL, NT-Xent and Barlow Twins losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from distillery.losses import barlow_twins_loss, byol_loss, nt_xent

# --- BYOL ----------------------------------------------------------------------------------


def test_byol_hand_values() -> None:
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    z = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    # both rows at 45 degrees: cos = 1/sqrt(2)
    assert byol_loss(p, z).item() == pytest.approx(2.0 - math.sqrt(2.0), abs=1e-6)
    # identical -> 0, orthogonal -> 2, opposite -> 4 (and scale-invariant)
    assert byol_loss(p, 5.0 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    ).item() == pytest.approx(2.0)
    assert byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)


def test_byol_gradient_and_caller_detach() -> None:
    torch.manual_seed(0)
    p = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    byol_loss(p, z.detach()).backward()
    assert p.grad is not None and torch.isfinite(p.grad).all() and z.grad is None
    # gradient is orthogonal to p (cosine is scale-invariant)
    assert (p.grad * p.detach()).sum(dim=1).abs().max() < 1e-5


def test_byol_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        byol_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# --- NT-Xent -------------------------------------------------------------------------------


def _nt_xent_reference(z1: list[list[float]], z2: list[list[float]], tau: float) -> float:
    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]

    views = [unit(v) for v in z1] + [unit(v) for v in z2]
    b = len(z1)
    total = 0.0
    for i, anchor in enumerate(views):
        pos = (i + b) % (2 * b)
        sims = {
            j: sum(a * c for a, c in zip(anchor, v, strict=True)) / tau
            for j, v in enumerate(views)
            if j != i
        }
        total += -sims[pos] + math.log(sum(math.exp(s) for s in sims.values()))
    return total / (2 * b)


def test_nt_xent_closed_form() -> None:
    # Two orthogonal clips, positives identical. For every anchor the candidates have
    # cosines (1, 0, 0) -> loss = -log(e^{1/T} / (e^{1/T} + 2)) = log(1 + 2 e^{-1/T}).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    assert nt_xent(z, z.clone(), temperature=tau).item() == pytest.approx(
        math.log(1.0 + 2.0 * math.exp(-1.0 / tau)), abs=1e-6
    )


def test_nt_xent_against_python_reference() -> None:
    z1 = [[1.0, 2.0, 0.5], [0.3, -1.0, 1.0], [2.0, 0.0, -0.5]]
    z2 = [[0.8, 1.5, 1.0], [-0.2, -1.2, 0.4], [1.0, 1.0, 1.0]]
    for tau in (0.1, 0.5, 1.0):
        got = nt_xent(torch.tensor(z1), torch.tensor(z2), temperature=tau).item()
        assert got == pytest.approx(_nt_xent_reference(z1, z2, tau), rel=1e-5)


def test_nt_xent_symmetric_and_high_temperature_limit() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 4), torch.randn(5, 4)
    assert nt_xent(z1, z2).item() == pytest.approx(nt_xent(z2, z1).item(), rel=1e-6)
    # T -> inf: all logits equal -> log(2B - 1)
    assert nt_xent(z1, z2, temperature=1e6).item() == pytest.approx(math.log(9.0), abs=1e-4)


def test_nt_xent_gradients() -> None:
    torch.manual_seed(0)
    z1 = torch.randn(6, 8, requires_grad=True)
    z2 = torch.randn(6, 8, requires_grad=True)
    nt_xent(z1, z2).backward()
    for z in (z1, z2):
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# --- Barlow Twins --------------------------------------------------------------------------

EPS = 1e-5
# Two features over a batch of 4, each mean 0 and (biased) variance 1, mutually uncorrelated.
COL_A = [1.0, -1.0, 1.0, -1.0]
COL_B = [1.0, 1.0, -1.0, -1.0]


def _stack(*cols: list[float]) -> torch.Tensor:
    return torch.tensor(cols).t().contiguous()


def test_barlow_twins_perfectly_correlated_is_near_zero() -> None:
    z1 = _stack(COL_A, COL_B)
    z2 = 3.0 * z1 + 1.0  # same after standardisation
    # standardised = x / sqrt(1 + eps) -> C = I / (1 + eps); on-diagonal (1 - 1/(1+eps))^2 each
    expected = 2 * (1.0 - 1.0 / (1.0 + EPS)) ** 2
    got = barlow_twins_loss(z1, z2).item()
    assert got == pytest.approx(expected, abs=1e-9)
    assert got < 1e-8


def test_barlow_twins_hand_values() -> None:
    lam = 5e-3
    z1 = _stack(COL_A, COL_B)
    # swapped features: C = [[0, 1], [1, 0]] / (1 + eps)
    swapped = _stack(COL_B, COL_A)
    assert barlow_twins_loss(z1, swapped, lambda_offdiag=lam).item() == pytest.approx(
        2.0 + lam * 2.0 / (1.0 + EPS) ** 2, rel=1e-6
    )
    # anti-correlated: C = -I / (1 + eps) -> on-diagonal 2 * (1 + 1/(1+eps))^2
    assert barlow_twins_loss(z1, -z1, lambda_offdiag=lam).item() == pytest.approx(
        2 * (1.0 + 1.0 / (1.0 + EPS)) ** 2, rel=1e-6
    )
    # Redundant features: both of z2's features equal COL_A.
    # C = [[1, 1], [0, 0]] / (1 + eps): on-diag (1-c)^2 + 1^2, off-diag c^2
    c = 1.0 / (1.0 + EPS)
    z2 = _stack(COL_A, COL_A)
    assert barlow_twins_loss(z1, z2, lambda_offdiag=0.1).item() == pytest.approx(
        (1 - c) ** 2 + 1.0 + 0.1 * c**2, rel=1e-6
    )


def test_barlow_twins_standardises_per_feature() -> None:
    # Un-normalised inputs with different means/scales per feature give the same loss.
    torch.manual_seed(0)
    z1, z2 = torch.randn(16, 3), torch.randn(16, 3)
    scale, shift = torch.tensor([1.0, 10.0, 0.1]), torch.tensor([5.0, -3.0, 0.0])
    torch.testing.assert_close(
        barlow_twins_loss(z1 * scale + shift, z2), barlow_twins_loss(z1, z2), rtol=1e-4, atol=1e-5
    )


def test_barlow_twins_gradients_and_small_batch() -> None:
    torch.manual_seed(0)
    z1 = torch.randn(8, 4, requires_grad=True)
    z2 = torch.randn(8, 4, requires_grad=True)
    barlow_twins_loss(z1, z2).backward()
    for z in (z1, z2):
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2"):
        barlow_twins_loss(torch.randn(1, 4), torch.randn(1, 4))
