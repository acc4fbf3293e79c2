"""Hard-concrete gates, differentiable parameter counts, physical pruning and its export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distillery.models import load_pruned
from distillery.models.encoders import TransformerEncoder, count_parameters
from distillery.models.io import save_encoder
from distillery.models.pruning import GatedModel, HardConcreteGate, build_pruned

BASE = {
    "_target_": "distillery.models.encoders.TransformerEncoder",
    "n_mels": 16,
    "dim": 32,
    "depth": 2,
    "heads": 4,
    "ffn_dim": 48,
    "dropout": 0.1,
}


def _gated(seed: int = 0) -> GatedModel:
    torch.manual_seed(seed)
    gated = GatedModel(
        TransformerEncoder(**{k: v for k, v in BASE.items() if k != "_target_"}),
        ["conv", "heads", "ffn"],
        BASE,
    )
    with torch.no_grad():  # spread the gates so that every group keeps some units and drops others
        for gate in gated.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.n) * 3.0)
    return gated.eval()


def test_samples_lie_in_unit_interval_with_exact_zeros_and_ones() -> None:
    torch.manual_seed(0)
    gate = HardConcreteGate(1000, init_drop_prob=0.5)  # log_alpha ~ 0: a spread of samples
    s = gate.train()()
    assert s.min() >= 0.0 and s.max() <= 1.0
    # The stretch to [-0.1, 1.1] then clamp gives point masses at 0 and 1 and mass between.
    assert (s == 0).any() and (s == 1).any() and ((s > 0) & (s < 1)).float().mean() > 0.5
    s.sum().backward()
    assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0


def test_expected_l0_by_hand_and_by_sampling() -> None:
    gate = HardConcreteGate(3)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-2.0, 0.0, 1.0]))
    shift = -(2 / 3) * math.log(0.1 / 1.1)  # 1.5986
    by_hand = sum(1 / (1 + math.exp(-(a + shift))) for a in (-2.0, 0.0, 1.0))
    assert gate.l0().item() == pytest.approx(by_hand, abs=1e-6)
    # L0 is P(sample != 0) summed over units: check against 20k draws.
    torch.manual_seed(0)
    gate.train()
    nonzero = torch.stack([gate() > 0 for _ in range(20000)]).float().mean(0).sum()
    assert nonzero.item() == pytest.approx(by_hand, abs=0.03)


@pytest.mark.parametrize("seed", range(5))
def test_eval_mask_keeps_round_l0_units_with_largest_log_alpha(seed: int) -> None:
    torch.manual_seed(seed)
    gate = HardConcreteGate(40)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.randn(40) * 3 - 1)
    mask = gate.eval()()
    k = round(gate.l0().item())
    assert int((mask > 0).sum()) == k
    kept = set(torch.nonzero(mask).flatten().tolist())
    assert kept == set(torch.topk(gate.log_alpha, k).indices.tolist())
    assert torch.equal(mask, gate()), "the eval mask is deterministic"


def test_physical_pruning_equals_masking_and_counts_match() -> None:
    gated = _gated()
    pruned, config = gated.export()
    x = torch.randn(3, 1, 16, 20)
    with torch.no_grad():
        masked = gated.forward_hidden_states(x)
        physical = pruned.forward_hidden_states(x)
    for m, p in zip(masked, physical, strict=True):
        torch.testing.assert_close(p, m, rtol=1e-4, atol=1e-5)
    assert count_parameters(pruned) == gated.deterministic_params() < gated.full_params
    assert all(n > 0 for n in config["kept"].values())
    assert sum(config["kept"][f"heads.{i}"] for i in range(2)) < 8  # something was removed
    # The copy carries no gate hooks.
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in pruned.modules())


def test_param_count_is_exact_and_differentiable_in_the_gates() -> None:
    gated = _gated(1)
    torch.manual_seed(1)
    for _ in range(5):
        kept = {g.name: int(torch.randint(g.min_keep, g.size + 1, ()).item()) for g in gated.groups}
        counts = {name: torch.tensor(float(n)) for name, n in kept.items()}
        assert gated.spec.param_count(gated.model, counts).item() == count_parameters(
            build_pruned(BASE, kept)
        )
    gated.expected_params().backward()
    for gate in gated.gates.values():  # more units kept -> more parameters, for every unit
        assert (gate.log_alpha.grad > 0).all()


def test_load_pruned_rebuilds_the_small_model_without_gates(tmp_path: Path) -> None:
    gated = _gated(2)
    pruned, config = gated.export()
    save_encoder(tmp_path / "pruned.pt", pruned, config)
    loaded = load_pruned(tmp_path / "pruned.pt").eval()
    assert isinstance(loaded, TransformerEncoder)
    assert count_parameters(loaded) == count_parameters(pruned)
    assert not any("log_alpha" in name for name, _ in loaded.named_parameters())
    x = torch.randn(2, 1, 16, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gated(x), rtol=1e-4, atol=1e-5)

    save_encoder(tmp_path / "plain.pt", gated.model, BASE)
    with pytest.raises(ValueError, match="plain.pt is not a pruned-model artifact"):
        load_pruned(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="kept.ffn.0=999"):
        build_pruned(BASE, {"ffn.0": 999})


@pytest.mark.slow
def test_hubert_base_physical_pruning_equals_masking() -> None:
    from distillery.models.hubert import HuBERTEncoder

    torch.manual_seed(0)
    gated = GatedModel(
        HuBERTEncoder(),
        ["conv", "heads", "ffn"],
        {"_target_": "distillery.models.hubert.HuBERTEncoder"},
    )
    with torch.no_grad():
        for gate in gated.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.n) * 3.0)
        gated.gate("heads.3").log_alpha.fill_(-10.0)  # a layer left without any head
    pruned, config = gated.eval().export()
    assert config["kept"]["heads.3"] == 0
    x = torch.randn(2, 8000)
    with torch.no_grad():
        for m, p in zip(
            gated.forward_hidden_states(x), pruned.forward_hidden_states(x), strict=True
        ):
            torch.testing.assert_close(p, m, rtol=1e-4, atol=1e-4)
    assert (
        count_parameters(pruned)
        == gated.deterministic_params()
        == count_parameters(build_pruned(config["base"], config["kept"]))
    )
