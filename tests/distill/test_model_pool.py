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
    start = _weights(pool.members[0]).clone()
    for _ in range(2):
        pool.step(0, x, y)
    assert pool.steps.tolist() == [2, 0]
    pool.step(0, x, y)  # third step: reaches the limit -> fresh weights, counter 0
    fresh = _weights(pool.members[0])
    assert not torch.equal(fresh, start)
    assert pool.steps.tolist() == [0, 0] and pool.resets.tolist() == [1, 0]
    # Fresh, not trained: a new draw of the initialisation, as build() makes them.
    assert fresh.abs().max() < 10 * start.abs().max()


def test_pools_of_the_same_seed_agree_whatever_the_global_rng() -> None:
    """What DDP ranks do: the same seed, different global RNG (per-rank augmentation draws).
    Initial weights, initial training, each step's member and every re-initialisation agree."""
    x, y = _data()
    pools = []
    for rank in (0, 1):
        torch.manual_seed(0)
        pool = ModelPool(_build, size=4, max_steps=5, seed=7)
        torch.manual_seed(100 + rank)  # the ranks' global RNGs part ways
        pool.initialise(x, y)
        members = []
        for step in range(12):
            torch.manual_seed(1000 * rank + step)
            members.append(pool.sample(step))
            pool.step(members[-1], x, y)
        pools.append((pool, members))
    (a, members_a), (b, members_b) = pools
    assert members_a == members_b and len(set(members_a)) > 1
    assert int(a.resets.sum()) > 0  # some members were re-initialised on the way
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)


def test_member_steps_are_torch_sgd_with_momentum_restarted_with_the_member() -> None:
    """The reference trains pool members with SGD, momentum 0.9, weight decay: each step
    equals ``torch.optim.SGD``'s on a copy, and a re-initialised member starts a fresh
    velocity (a new SGD optimizer)."""
    import copy

    import torch.nn.functional as F

    torch.manual_seed(0)
    pool = ModelPool(_build, size=1, max_steps=4, lr=0.05, weight_decay=1e-3, momentum=0.9)
    x, y = _data()

    def reference_steps(model: torch.nn.Module, steps: int) -> torch.Tensor:
        model = copy.deepcopy(model).requires_grad_(True).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        for _ in range(steps):
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
        return _weights(model).detach()

    expected = reference_steps(pool.members[0], 3)
    for _ in range(3):
        pool.step(0, x, y)
    torch.testing.assert_close(_weights(pool.members[0]), expected)
    pool.step(0, x, y)  # the limit: fresh weights, fresh velocity
    expected = reference_steps(pool.members[0], 2)
    for _ in range(2):
        pool.step(0, x, y)
    torch.testing.assert_close(_weights(pool.members[0]), expected)
