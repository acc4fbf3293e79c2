"""Two-hot candidate targets and the PLL losses, by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.losses.partial_label import candidate_gce_loss, soft_cross_entropy, top_k_candidates


def test_two_hot_targets_mark_the_teacher_top2() -> None:
    teacher = torch.tensor([[0.1, 2.0, 1.0, -3.0], [5.0, 0.0, 0.0, 4.9], [1.0, 1.0, 1.0, 0.0]])
    expected = torch.tensor(
        [[0, 0.5, 0.5, 0], [0.5, 0, 0, 0.5], [0.5, 0.5, 0, 0]]
    )  # tie -> lower index
    assert torch.equal(top_k_candidates(teacher), expected)
    assert torch.equal(top_k_candidates(teacher.softmax(1)), expected)  # order is all that counts
    assert torch.equal(top_k_candidates(teacher, k=1), F.one_hot(teacher.argmax(1), 4).float())
    with pytest.raises(ValueError, match="k must be"):
        top_k_candidates(teacher, k=5)


def test_soft_cross_entropy_on_two_hot_is_mean_log_of_candidates() -> None:
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    two_hot = torch.tensor([[0.5, 0.0, 0.5]])
    assert soft_cross_entropy(logits, two_hot).item() == pytest.approx(
        -(math.log(0.5) + math.log(0.2)) / 2, abs=1e-6
    )
    # A one-hot target gives ordinary CE.
    assert soft_cross_entropy(logits, torch.tensor([[0.0, 1.0, 0.0]])).item() == pytest.approx(
        -math.log(0.3), abs=1e-6
    )


def test_candidate_gce_by_hand() -> None:
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    candidates = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0]])
    q = 0.7
    row0 = ((1 - 0.5**q) / q + (1 - 0.2**q) / q) / 2
    row1 = (1 - 0.8**q) / q
    assert candidate_gce_loss(p.log(), candidates, q).item() == pytest.approx(
        (row0 + row1) / 2, abs=1e-6
    )
    # q = 1: mean of (1 - p_c) over the candidates.
    assert candidate_gce_loss(p.log(), candidates, 1.0).item() == pytest.approx(
        ((0.5 + 0.8) / 2 + 0.2) / 2, abs=1e-6
    )
