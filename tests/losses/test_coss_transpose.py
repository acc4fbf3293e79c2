"""CoSS against METHODS.md section 5, computed by hand from the definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.losses import coss_loss


def test_both_terms_by_hand_on_a_3x2_batch() -> None:
    # Rows normalise to unit vectors; the space term then normalises the *columns* of
    # those matrices (one feature over the batch) and compares them: the transpose.
    t = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # rows -> (.6, .8), (1, 0), (0, 1)
    s = torch.tensor([[4.0, 3.0], [1.0, 1.0], [0.0, -1.0]])  # rows -> (.8, .6), (r, r), (0, -1)
    r = 1 / math.sqrt(2)
    cos = ((1 - 0.96) + (1 - r) + (1 - (-1))) / 3
    # columns: t0 = (.6, 1, 0) |.|^2 = 1.36, t1 = (.8, 0, 1) 1.64; s0 = (.8, r, 0) .64+.5, s1 = (.6, r, -1) .36+.5+1
    c0 = (0.6 * 0.8 + r) / math.sqrt(1.36 * 1.14)
    c1 = (0.8 * 0.6 - 1.0) / math.sqrt(1.64 * 1.86)
    space = ((1 - c0) + (1 - c1)) / 2
    total, terms = coss_loss(s, t, cosine_weight=1.0, space_weight=1.0)
    assert terms["cos"].item() == pytest.approx(cos, abs=1e-6)
    assert terms["space"].item() == pytest.approx(space, abs=1e-6)
    assert total.item() == pytest.approx(cos + space, abs=1e-6)
    assert coss_loss(s, t, cosine_weight=0.0, space_weight=2.0)[0].item() == pytest.approx(
        2 * space, abs=1e-6
    )


def test_space_term_is_the_sample_term_of_the_transposed_normalised_matrices() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    s_rows, t_rows = F.normalize(s, dim=1), F.normalize(t, dim=1)
    _, terms = coss_loss(s, t)
    # (D, B) matrices: their rows are the feature columns; the per-sample term on them
    # normalises those rows, as the space term must.
    _, transposed = coss_loss(s_rows.T.contiguous(), t_rows.T.contiguous(), space_weight=0.0)
    assert terms["space"].item() == pytest.approx(transposed["cos"].item(), abs=1e-6)
