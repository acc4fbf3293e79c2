"""Pruned speech encoders loaded without distillery: torch.export programs, Hugging Face dirs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.speech_models import FAMILIES, hf_model, tiny_architecture, write_huggingface

from distillery.models.pruning import KINDS, GatedModel
from distillery.models.speech import SpeechEncoder
from distillery.models.standalone import export_program, hf_representable, save_huggingface

#: Loads the program with torch alone: importing distillery would fail.
LOADER = """
import json, sys, torch
sys.modules["distillery"] = None
directory, inputs, out = sys.argv[1:]
meta = json.load(open(directory + "/encoder.json"))
program = torch.export.load(directory + "/" + meta["program"]).module()
with torch.no_grad():
    torch.save([program(audio, lengths) for audio, lengths in torch.load(inputs)], out)
"""


def pruned_encoder(family: str) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    encoder = SpeechEncoder(architecture=tiny_architecture(family))
    gated = GatedModel(encoder, list(KINDS), encoder.architecture_config())
    with torch.no_grad():
        for gate in gated.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.n) * 3.0)
        gated.gate("attn_layer.1").log_alpha.fill_(-10.0)
    return gated.eval().export()


def run_without_distillery(
    directory: Path, inputs: list[tuple[torch.Tensor, torch.Tensor]]
) -> list:
    """``(embedding, hidden states)`` per ``(audio, lengths)``, from a fresh Python process."""
    tmp = directory.parent
    torch.save(inputs, tmp / "inputs.pt")
    subprocess.run(
        [sys.executable, "-c", LOADER, str(directory), str(tmp / "inputs.pt"), str(tmp / "out.pt")],
        check=True,
        cwd=tmp,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    return torch.load(tmp / "out.pt")


@pytest.mark.slow  # ~30 s: torch.export, then a fresh process importing torch
def test_exported_program_runs_without_distillery_and_matches(tmp_path: Path) -> None:
    """WavLM, the family with the most moving parts (shared, head-selected position bias)."""
    pruned, config = pruned_encoder("wavlm")
    export_program(pruned, tmp_path / "standalone", config)
    meta = json.loads((tmp_path / "standalone" / "encoder.json").read_text())
    assert meta["config"]["kept"]["attn_layer.1"] == 0 and meta["embed_dim"] == 32
    # Other batch sizes and lengths than the export's example, a single clip among them.
    inputs = [
        (torch.randn(3, 7000), torch.tensor([7000, 5000, 2600])),
        (torch.randn(1, 3000), torch.tensor([3000])),
    ]
    loaded = run_without_distillery(tmp_path / "standalone", inputs)
    for (audio, lengths), (embedding, states) in zip(inputs, loaded, strict=True):
        with torch.no_grad():
            expected = torch.stack(pruned.eval().forward_hidden_states(audio, lengths))
            torch.testing.assert_close(embedding, pruned(audio, lengths), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(states, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_huggingface_directory_round_trips(tmp_path: Path, family: str, one_thread) -> None:
    import transformers

    source = write_huggingface(hf_model(family), tmp_path / "source")
    encoder = SpeechEncoder(weights=str(source)).eval()
    save_huggingface(encoder, tmp_path / "saved")
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "saved").eval()
    audio = torch.randn(2, 4000)
    with torch.no_grad():
        expected = reloaded(audio, output_hidden_states=True).hidden_states
        for ours, theirs in zip(encoder.forward_hidden_states(audio), expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    pruned, _ = pruned_encoder(family)
    assert hf_representable(encoder) and not hf_representable(pruned)
    with pytest.raises(ValueError, match="pruned encoder has no Hugging Face config"):
        save_huggingface(pruned, tmp_path / "pruned")
