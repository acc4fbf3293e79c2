"""DPHuBERT pruning of HuBERT, wav2vec 2.0 and WavLM: every unit kind, exports that run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.speech_models import FAMILIES, tiny_architecture

from distillery.data.padding import pad_waveforms
from distillery.models import load_pruned
from distillery.models.encoders import count_parameters
from distillery.models.io import save_encoder
from distillery.models.pruning import KINDS, GatedModel, build_pruned
from distillery.models.speech import SpeechEncoder


def _gated(family: str, seed: int = 0) -> GatedModel:
    torch.manual_seed(seed)
    encoder = SpeechEncoder(architecture=tiny_architecture(family))
    gated = GatedModel(encoder, list(KINDS), encoder.architecture_config())
    with torch.no_grad():
        for gate in gated.gates.values():  # every group keeps some units and drops others
            gate.log_alpha.copy_(torch.randn(gate.n) * 3.0)
        gated.gate("conv.1").log_alpha.fill_(-10.0)  # a conv layer the gates empty entirely
        gated.gate("heads.0").log_alpha.copy_(torch.tensor([5.0, -10.0, 5.0, -10.0]))
        gated.gate("heads.1").log_alpha.copy_(torch.tensor([-10.0, 5.0, 5.0, 5.0]))
        gated.gate("ffn.0").log_alpha.fill_(-10.0)  # an FFN without units
        gated.gate("ffn_layer.0").log_alpha.fill_(5.0)
        gated.gate("attn_layer.0").log_alpha.fill_(5.0)
        gated.gate("attn_layer.1").log_alpha.fill_(-10.0)  # a removed attention block
        gated.gate("ffn_layer.1").log_alpha.fill_(5.0)
    return gated.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_export_runs_and_equals_masking_for_every_unit_kind(
    tmp_path: Path, family: str, one_thread
) -> None:
    gated = _gated(family)
    pruned, config = gated.export()
    kept = config["kept"]
    assert kept["conv.1"] == 1  # kept at one channel: a conv layer cannot be empty
    assert (kept["heads.0"], kept["heads.1"], kept["ffn.0"], kept["attn_layer.1"]) == (2, 3, 0, 0)
    batch = pad_waveforms([{"audio": torch.randn(n)} for n in (4000, 2600)])
    with torch.no_grad():
        masked = gated.forward_hidden_states(batch["audio"], batch["length"])
        physical = pruned.eval().forward_hidden_states(batch["audio"], batch["length"])
    for m, p in zip(masked, physical, strict=True):
        torch.testing.assert_close(p, m, rtol=1e-4, atol=1e-5)
    assert count_parameters(pruned) == gated.deterministic_params() < gated.full_params
    removed = pruned.model.encoder.transformer.layers[1].attention  # output bias gone too
    wavlm_gate = {"gru_rel_pos_const", "gru_rel_pos_linear.weight", "gru_rel_pos_linear.bias"}
    assert {n for n, p in removed.named_parameters() if p.numel()} <= wavlm_gate
    # The artifact rebuilds the same small model without distillery's gates.
    save_encoder(tmp_path / "pruned.pt", pruned, config)
    loaded = load_pruned(tmp_path / "pruned.pt").eval()
    assert count_parameters(loaded) == count_parameters(build_pruned(config["base"], kept))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(batch["audio"], batch["length"]),
            gated(batch["audio"], batch["length"]),
            rtol=1e-4,
            atol=1e-5,
        )


def test_param_count_is_exact_with_block_gates(one_thread) -> None:
    gated = _gated("wavlm", seed=1)
    torch.manual_seed(1)
    for _ in range(4):
        kept = {g.name: int(torch.randint(g.min_keep, g.size + 1, ()).item()) for g in gated.groups}
        counts = {name: torch.tensor(float(n)) for name, n in kept.items()}
        built = build_pruned(gated.base_config, kept)
        assert gated.spec.param_count(gated.model, counts).item() == count_parameters(built)
    gated.expected_params().backward()
    for gate in gated.gates.values():  # more units kept -> more parameters, for every unit
        assert (gate.log_alpha.grad > 0).all()


def test_conv_pruning_of_a_layernorm_front_end_is_refused() -> None:
    encoder = SpeechEncoder(architecture=tiny_architecture("hubert", large=True))
    with pytest.raises(ValueError, match="conv pruning needs the group_norm feature extractor"):
        GatedModel(encoder, ["conv", "heads"], encoder.architecture_config())
    GatedModel(encoder, ["heads", "ffn", "attn_layer", "ffn_layer"], encoder.architecture_config())
