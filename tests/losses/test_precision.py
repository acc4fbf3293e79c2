"""Losses compute in at least float32: autocast's half-precision outputs are upcast, float64
inputs (e.g. ``precision: 64-true`` equivalence runs) keep float64."""

from __future__ import annotations

import pytest
import torch

from distillery.losses import (
    barlow_twins_loss,
    byol_loss,
    coss_loss,
    l1_cosine_distill_loss,
    multi_exit_loss,
    nt_xent,
)
from distillery.losses.partial_label import candidate_gce_loss, soft_cross_entropy


def _scalar(out):
    return out[0] if isinstance(out, tuple) else out


LOSSES = {
    "byol": lambda a, b, c: byol_loss(a, b),
    "nt_xent": lambda a, b, c: nt_xent(a, b),
    "barlow_twins": lambda a, b, c: barlow_twins_loss(a, b),
    "coss": lambda a, b, c: coss_loss(a, b),
    "l1_cosine": lambda a, b, c: l1_cosine_distill_loss(a[:, None], b[:, None]),
    "multi_exit": lambda a, b, c: multi_exit_loss([a], b, c),
    "soft_ce": lambda a, b, c: soft_cross_entropy(a, b.softmax(1)),
    "candidate_gce": lambda a, b, c: candidate_gce_loss(a, (b > 0).to(a.dtype)),
}


@pytest.mark.parametrize("name", LOSSES)
def test_losses_upcast_half_precision_and_keep_float64(name: str) -> None:
    torch.manual_seed(0)
    a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    targets = torch.randint(0, 5, (6,))
    loss = LOSSES[name]
    exact = _scalar(loss(a, b, targets))
    assert exact.dtype == torch.float64
    single = _scalar(loss(a.float(), b.float(), targets))
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, rtol=1e-5, atol=1e-6)
    half = _scalar(loss(a.bfloat16(), b.bfloat16(), targets))
    assert half.dtype == torch.float32
