"""CoSS and L1 - cosine distillation losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from distillery.losses import coss_loss, l1_cosine_distill_loss

SQRT2 = math.sqrt(2.0)

# --- CoSS ----------------------------------------------------------------------------------


def test_coss_hand_values_space_term_uses_columns() -> None:
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[2.0, 0.0], [3.0, 0.0]])
    # Rows (normalised): s = [[1, 0], [1, 0]] -> row cosines 1 and 0 -> cos = 0.5.
    # Columns of the row-normalised matrices, normalised over the batch:
    #   t: col0 = [1, 0], col1 = [0, 1];  s: col0 = [1, 1]/sqrt2, col1 = [0, 0] (stays 0)
    #   column cosines: 1/sqrt2 and 0 -> space = ((1 - 1/sqrt2) + 1) / 2.
    # A row-wise implementation of the second term would give 0.5 instead.
    cos = 0.5
    space = 1.0 - 1.0 / (2.0 * SQRT2)
    total, terms = coss_loss(s, t)
    assert terms["cos"].item() == pytest.approx(cos, abs=1e-6)
    assert terms["space"].item() == pytest.approx(space, abs=1e-6)
    assert total.item() == pytest.approx(cos + space, abs=1e-6)
    total, terms = coss_loss(s, t, cosine_weight=0.25, space_weight=2.0)
    assert total.item() == pytest.approx(0.25 * cos + 2.0 * space, abs=1e-6)
    assert terms["total"].item() == pytest.approx(total.item())


def test_coss_space_term_hand_values_3x2() -> None:
    # Every row already unit norm, so only the column normalisation matters.
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    s = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.8, 0.6]])
    # rows: <t_i, s_i> = 0, 1, 0.48+0.48=0.96 -> cos = (1 + 0 + 0.04) / 3
    cos = (1.0 + 0.0 + 0.04) / 3.0
    # t col0 = [1, 0, .6] (|.|^2 = 1.36), col1 = [0, 1, .8] (1.64)
    # s col0 = [0, 0, .8] (0.64),          col1 = [1, 1, .6] (2.36)
    c0 = (0.6 * 0.8) / (math.sqrt(1.36) * math.sqrt(0.64))
    c1 = (1.0 + 0.8 * 0.6) / (math.sqrt(1.64) * math.sqrt(2.36))
    space = ((1.0 - c0) + (1.0 - c1)) / 2.0
    _, terms = coss_loss(s, t)
    assert terms["cos"].item() == pytest.approx(cos, abs=1e-6)
    assert terms["space"].item() == pytest.approx(space, abs=1e-6)


def test_coss_per_sample_scale_does_not_reach_space_term() -> None:
    # Student rows are positive multiples of the teacher rows: row cosine 1. The raw
    # columns then differ in direction (column 0: t = [1, 1], s = [1, 10]), but CoSS
    # normalises rows first, so the space term sees identical matrices and is 0 too.
    t = torch.tensor([[1.0, 2.0], [1.0, -1.0]])
    s = t * torch.tensor([[1.0], [10.0]])
    raw_col_cos = (1.0 * 1.0 + 1.0 * 10.0) / (SQRT2 * math.sqrt(101.0))
    assert raw_col_cos < 0.8
    _, terms = coss_loss(s, t)
    assert terms["cos"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["space"].item() == pytest.approx(0.0, abs=1e-6)


def test_coss_shared_rotation_changes_only_space_term() -> None:
    # Rotating student and teacher by the same orthogonal matrix keeps every row cosine
    # but mixes the feature dimensions, so the per-dimension term changes.
    torch.manual_seed(0)
    t, s = torch.randn(8, 4), torch.randn(8, 4)
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    _, before = coss_loss(s, t)
    _, after = coss_loss(s @ q, t @ q)
    assert after["cos"].item() == pytest.approx(before["cos"].item(), abs=1e-5)
    assert abs(after["space"].item() - before["space"].item()) > 1e-2
    # Permuting the samples of both changes neither term.
    perm = torch.randperm(8)
    _, permuted = coss_loss(s[perm], t[perm])
    assert permuted["cos"].item() == pytest.approx(before["cos"].item(), abs=1e-6)
    assert permuted["space"].item() == pytest.approx(before["space"].item(), abs=1e-6)


def test_coss_identical_is_zero_and_gradients() -> None:
    torch.manual_seed(0)
    t = torch.randn(6, 5)
    total, terms = coss_loss(t.clone(), t)
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(6, 5, requires_grad=True)
    total, _ = coss_loss(s, t.detach())
    total.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # one SGD step on the student lowers the loss
    with torch.no_grad():
        s2 = s - 0.1 * s.grad
    assert coss_loss(s2, t)[0].item() < total.item()


def test_coss_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        coss_loss(torch.zeros(4, 3), torch.zeros(4, 5))


# --- L1 - cosine (DPHuBERT) -----------------------------------------------------------------


def test_l1_cosine_hand_values_2d_and_3d() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # |s - t| = [[0, 1], [0, 1]] -> L1 = 0.5; cosines: 1/sqrt2 and 1.
    l1, cos = 0.5, (1.0 / SQRT2 + 1.0) / 2.0
    for shape in [(2, 2), (1, 2, 2)]:
        total, terms = l1_cosine_distill_loss(s.reshape(shape), t.reshape(shape))
        assert terms["l1"].item() == pytest.approx(l1, abs=1e-6)
        assert terms["cos"].item() == pytest.approx(cos, abs=1e-6)
        assert total.item() == pytest.approx(l1 - cos, abs=1e-6)


def test_l1_cosine_mask_excludes_positions() -> None:
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, -9.0]]])
    t = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])  # last frame is padding
    total, terms = l1_cosine_distill_loss(s, t, mask=mask)
    assert terms["l1"].item() == pytest.approx(0.5, abs=1e-6)
    assert total.item() == pytest.approx(0.5 - (1.0 / SQRT2 + 1.0) / 2.0, abs=1e-6)
    with pytest.raises(ValueError, match="mask"):
        l1_cosine_distill_loss(s, t, mask=torch.ones(1, 2, dtype=torch.bool))


def test_l1_cosine_identical_is_minus_one_and_gradients() -> None:
    torch.manual_seed(0)
    t = torch.randn(2, 7, 4)
    total, terms = l1_cosine_distill_loss(t.clone(), t)
    assert total.item() == pytest.approx(-1.0, abs=1e-6)
    assert terms["l1"].item() == 0.0
    s = torch.randn(2, 7, 4, requires_grad=True)
    total, _ = l1_cosine_distill_loss(s, t)
    total.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        l1_cosine_distill_loss(torch.zeros(2, 3), torch.zeros(3, 2))
