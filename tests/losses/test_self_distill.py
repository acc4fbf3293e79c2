"""multi_exit_loss against values worked out by hand (plain Python math, no torch ops)."""

from __future__ import annotations

import math

import pytest
import torch

from distillery.losses import multi_exit_loss

LN2, LN3 = math.log(2.0), math.log(3.0)


# --- plain-Python reference ---------------------------------------------------------------


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _ce(row: list[float], y: int) -> float:
    return -math.log(_softmax(row)[y])


def _kl(p_logits: list[float], q_logits: list[float]) -> float:
    """KL(softmax(p) || softmax(q))."""
    p, q = _softmax(p_logits), _softmax(q_logits)
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _reference(exits, final, targets, a=0.7, b=0.3, g=0.003, ignore=-1) -> dict[str, float]:
    n = len(final)
    valid = [i for i in range(n) if targets[i] != ignore]

    def ce_mean(logits):
        return sum(_ce(logits[i], targets[i]) for i in valid) / len(valid) if valid else 0.0

    ce_exits = sum(ce_mean(h) for h in exits)
    ce_final = ce_mean(final)
    kl = sum(sum(_kl(final[i], h[i]) for i in range(n)) / n for h in exits)
    cos = sum(sum(2 - 2 * _cos(h[i], final[i]) for i in range(n)) / n for h in exits)
    total = a * ce_exits + ce_final + b * kl + g * cos
    return {"ce_exits": ce_exits, "ce_final": ce_final, "kl": kl, "cos": cos, "total": total}


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- tests ---------------------------------------------------------------------------------


def test_closed_form_values() -> None:
    # Exit h gives the target 2x the odds of each other class -> p_h = (1/2, 1/4, 1/4)
    # on the target; c is constant per row -> uniform softmax.
    h = _t([[LN2, 0.0, 0.0], [0.0, 0.0, LN2]])
    c = _t([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    y = torch.tensor([0, 2])
    loss, terms = multi_exit_loss([h], c, y)

    ce_h = LN2  # -log(1/2)
    ce_c = LN3  # -log(1/3)
    # KL(u || p_h) = sum_k 1/3 (log 1/3 - log p_h,k) = -ln3 + (1/3)(ln2 + 2 ln4) = 5/3 ln2 - ln3
    kl = 5.0 / 3.0 * LN2 - LN3
    # cos([ln2, 0, 0], [1, 1, 1]) = ln2 / (ln2 * sqrt(3)) = 1/sqrt(3)
    cos_dist = 2.0 - 2.0 / math.sqrt(3.0)
    expected = 0.7 * ce_h + ce_c + 0.3 * kl + 0.003 * cos_dist

    assert terms["ce_exits"].item() == pytest.approx(ce_h, abs=1e-6)
    assert terms["ce_final"].item() == pytest.approx(ce_c, abs=1e-6)
    assert terms["kl"].item() == pytest.approx(kl, abs=1e-6)
    assert terms["cos"].item() == pytest.approx(cos_dist, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert terms["total"].item() == pytest.approx(expected, abs=1e-6)


def test_against_python_reference_two_exits_custom_weights() -> None:
    exits = [
        [[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]],
        [[-0.2, 0.4, 0.1], [2.2, -1.1, 0.0]],
    ]
    final = [[1.0, 0.0, -1.0], [0.3, 0.9, -0.4]]
    targets = [2, 0]
    ref = _reference(exits, final, targets, a=0.5, b=0.8, g=0.1)
    loss, terms = multi_exit_loss(
        [_t(e) for e in exits],
        _t(final),
        torch.tensor(targets),
        exit_ce_weight=0.5,
        exit_kl_weight=0.8,
        exit_cos_weight=0.1,
    )
    for key, value in ref.items():
        assert terms[key].item() == pytest.approx(value, abs=1e-5), key
    assert loss.item() == pytest.approx(ref["total"], abs=1e-5)


def test_identical_logits_zero_kl_and_cos() -> None:
    c = _t([[0.2, 1.3, -0.5], [2.0, 0.1, 0.4]])
    _, terms = multi_exit_loss([c.clone(), c.clone(), c.clone()], c, torch.tensor([1, 0]))
    assert terms["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["cos"].item() == pytest.approx(0.0, abs=1e-6)
    # three identical exits -> 3x the final CE
    assert terms["ce_exits"].item() == pytest.approx(3 * terms["ce_final"].item(), rel=1e-6)


def test_ignore_index_excluded_from_ce_only() -> None:
    exits = [[[0.5, -1.0, 2.0], [1.5, 0.3, -0.7], [0.0, 0.2, 0.1]]]
    final = [[1.0, 0.0, -1.0], [0.3, 0.9, -0.4], [-0.5, 0.5, 0.0]]
    labels = [2, -1, 1]
    ref = _reference(exits, final, labels)
    _, terms = multi_exit_loss([_t(exits[0])], _t(final), torch.tensor(labels))
    for key, value in ref.items():
        assert terms[key].item() == pytest.approx(value, abs=1e-5), key
    # CE over the 2 labelled samples only; KL and cos still over all 3.
    ce_final = (_ce(final[0], 2) + _ce(final[2], 1)) / 2
    assert terms["ce_final"].item() == pytest.approx(ce_final, abs=1e-6)
    _, all_labelled = multi_exit_loss([_t(exits[0])], _t(final), torch.tensor([2, 0, 1]))
    assert terms["kl"].item() == pytest.approx(all_labelled["kl"].item(), abs=1e-7)
    assert terms["cos"].item() == pytest.approx(all_labelled["cos"].item(), abs=1e-7)


def test_custom_ignore_index_and_all_ignored() -> None:
    h = _t([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]]).requires_grad_()
    c = _t([[1.0, 0.0, -1.0], [0.3, 0.9, -0.4]]).requires_grad_()
    loss, terms = multi_exit_loss([h], c, torch.tensor([-100, -100]), ignore_index=-100)
    assert torch.isfinite(loss)
    assert terms["ce_exits"].item() == 0.0 and terms["ce_final"].item() == 0.0
    expected = 0.3 * (_kl(c[0].tolist(), h[0].tolist()) + _kl(c[1].tolist(), h[1].tolist())) / 2
    expected += (
        0.003
        * (4 - 2 * _cos(h[0].tolist(), c[0].tolist()) - 2 * _cos(h[1].tolist(), c[1].tolist()))
        / 2
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(c.grad).all()


def test_detach_teacher_stops_gradient_to_final_through_kl_and_cos() -> None:
    h = _t([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]]).requires_grad_()
    c = _t([[1.0, 0.0, -1.0], [0.3, 0.9, -0.4]]).requires_grad_()
    y = [2, 0]
    loss, _ = multi_exit_loss([h], c, torch.tensor(y), detach_teacher=True)
    loss.backward()
    # Only CE(c, y) reaches c: d/dc_k = (softmax(c)_k - [k == y]) / B.
    expected = [
        [(p - (1.0 if k == y[i] else 0.0)) / 2 for k, p in enumerate(_softmax(c[i].tolist()))]
        for i in range(2)
    ]
    torch.testing.assert_close(c.grad, _t(expected), atol=1e-6, rtol=0)
    assert h.grad is not None and h.grad.abs().sum() > 0

    # Without detaching, the KL/cos terms add gradient to c.
    c2 = c.detach().clone().requires_grad_()
    loss2, _ = multi_exit_loss([h.detach()], c2, torch.tensor(y), detach_teacher=False)
    loss2.backward()
    assert (c2.grad - c.grad).abs().max() > 1e-3
    # The value does not depend on detaching.
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-7)


def test_shape_checks() -> None:
    c = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="exit_logits\\[0\\]"):
        multi_exit_loss([torch.zeros(2, 4)], c, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets"):
        multi_exit_loss([torch.zeros(2, 3)], c, torch.tensor([0, 1, 2]))


def test_no_exits_reduces_to_final_ce() -> None:
    c = _t([[1.0, 0.0, -1.0], [0.3, 0.9, -0.4]])
    loss, terms = multi_exit_loss([], c, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(
        (_ce(c[0].tolist(), 0) + _ce(c[1].tolist(), 1)) / 2, abs=1e-6
    )
    assert terms["kl"].item() == 0.0 and terms["cos"].item() == 0.0


def test_gradient_descent_reduces_loss() -> None:
    torch.manual_seed(0)
    exits = [torch.randn(8, 5, requires_grad=True) for _ in range(3)]
    final = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    params = [*exits, final]
    opt = torch.optim.SGD(params, lr=1.0)
    first, _ = multi_exit_loss(exits, final, y)
    for _ in range(20):
        opt.zero_grad()
        loss, _ = multi_exit_loss(exits, final, y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in params)
        opt.step()
    last, _ = multi_exit_loss(exits, final, y)
    assert last.item() < 0.7 * first.item()


def test_terms_are_detached() -> None:
    h = torch.randn(4, 3, requires_grad=True)
    c = torch.randn(4, 3, requires_grad=True)
    _, terms = multi_exit_loss([h], c, torch.tensor([0, 1, 2, 0]))
    assert set(terms) == {"ce_exits", "ce_final", "kl", "cos", "total"}
    assert all(not v.requires_grad and v.dim() == 0 for v in terms.values())
