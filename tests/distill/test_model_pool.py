"""KRR-ST model pool: random initial training, one step per use, re-initialisation at the limit."""

from __future__ import annotations

import torch

from distillery.distill.model_pool import ModelPool, RegressionModel
from distillery.models.encoders import AudioNTT


def _build() -> RegressionModel:
    return RegressionModel(AudioNTT(n_mels=8, channels=4, dim=8, dropout=0.0), target_dim=3)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(6, 1, 8, 16, generator=generator), torch.randn(6, 3, generator=generator)


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.flatten() for p in model.parameters()])


def test_initialise_trains_each_member_a_random_number_of_steps() -> None:
    torch.manual_seed(0)
    pool = ModelPool(_build, size=4, max_steps=5)
    x, y = _data()
    before = [_weights(m).clone() for m in pool.members]
    pool.initialise(x, y)
    assert bool(pool.ready)
    assert ((pool.steps >= 1) & (pool.steps <= 5)).all(), pool.steps
    assert len(set(pool.steps.tolist())) > 1  # not all at the same stage of training
    assert (pool.resets == 0).all()
    for member, old in zip(pool.members, before, strict=True):
        assert not torch.equal(_weights(member), old)
        assert not any(p.requires_grad for p in member.parameters())


def test_step_trains_the_member_and_lowers_its_loss() -> None:
    torch.manual_seed(0)
    pool = ModelPool(_build, size=1, max_steps=100, lr=0.05)
    x, y = _data()
    losses = [pool.step(0, x, y) for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(pool.steps[0]) == 20


def test_member_at_its_limit_is_reinitialised_and_its_counter_reset() -> None:
    torch.manual_seed(0)
    pool = ModelPool(_build, size=2, max_steps=3)
    x, y = _data()
    for _ in range(2):
        pool.step(0, x, y)
    assert pool.steps.tolist() == [2, 0]
    torch.manual_seed(123)
    pool.step(0, x, y)  # third step: reaches the limit -> fresh weights, counter 0
    torch.manual_seed(123)
    fresh = _build()
    assert torch.equal(_weights(pool.members[0]), _weights(fresh))
    assert pool.steps.tolist() == [0, 0] and pool.resets.tolist() == [1, 0]
    # The next step trains the fresh member instead of re-initialising it again (the
    # reference implementation's bug: its counter stayed at the limit).
    pool.step(0, x, y)
    assert pool.steps.tolist() == [1, 0] and pool.resets.tolist() == [1, 0]
    assert not torch.equal(_weights(pool.members[0]), _weights(fresh))


def test_outer_gradients_reach_the_inputs_not_the_members() -> None:
    torch.manual_seed(0)
    pool = ModelPool(_build, size=2, max_steps=10)
    x = torch.randn(4, 1, 8, 16, requires_grad=True)
    pool.features(1, x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in pool.parameters())


def test_counters_and_members_are_in_the_state_dict() -> None:
    torch.manual_seed(0)
    pool = ModelPool(_build, size=2, max_steps=10)
    x, y = _data()
    pool.initialise(x, y)
    restored = ModelPool(_build, size=2, max_steps=10)
    restored.load_state_dict(pool.state_dict())
    assert torch.equal(restored.steps, pool.steps) and bool(restored.ready)
    for a, b in zip(restored.members, pool.members, strict=True):
        assert torch.equal(_weights(a), _weights(b))
