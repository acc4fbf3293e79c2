"""HuBERT / wav2vec 2.0 / WavLM imported from Hugging Face, fairseq and torchaudio files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.helpers import TINY_TRANSFORMER
from tests.speech_models import FAMILIES, hf_model, tiny_architecture, write, write_huggingface

from distillery.data.padding import pad_waveforms
from distillery.models.io import build_encoder
from distillery.models.speech import SpeechEncoder
from distillery.models.speech_weights import WeightsError, check_weights, detect_format

FORMATS = ("huggingface", "fairseq", "torchaudio")


def _encoder(family: str, fmt: str, path: Path, large: bool) -> SpeechEncoder:
    if fmt == "torchaudio":  # a bare state dict: the architecture comes from the config
        return SpeechEncoder(weights=str(path), architecture=tiny_architecture(family, large))
    return SpeechEncoder(weights=str(path))


@pytest.mark.parametrize("large", [False, True], ids=["base", "large"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_imported_hidden_states_equal_the_hf_model(
    tmp_path: Path, family: str, fmt: str, large: bool, one_thread
) -> None:
    reference = hf_model(family, large)
    path = write(reference, family, fmt, tmp_path)
    assert detect_format(path) == fmt
    encoder = _encoder(family, fmt, path, large).eval()
    audio = torch.randn(2, 4000)
    with torch.no_grad():
        expected = reference(audio, output_hidden_states=True).hidden_states
        ours = encoder.forward_hidden_states(audio)
    assert len(ours) == len(expected) == 3
    for i, (a, b) in enumerate(zip(ours, expected, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"hidden state {i}")
    # The artifact config rebuilds the architecture without the file.
    rebuilt = SpeechEncoder(
        **{k: v for k, v in encoder.architecture_config().items() if k != "_target_"}
    )
    rebuilt.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(audio), encoder(audio))


def test_check_weights_names_the_missing_or_mismatched_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"weights .*nowhere\.pt: no such file"):
        check_weights(tmp_path / "nowhere.pt")
    hf = write_huggingface(hf_model("hubert"), tmp_path / "hubert-hf")
    check_weights(hf)  # fits
    with pytest.raises(WeightsError, match=r"hubert-hf: its architecture is not hubert_base"):
        check_weights(hf, arch="hubert_base")
    ta = write(hf_model("wav2vec2"), "wav2vec2", "torchaudio", tmp_path)
    with pytest.raises(
        WeightsError, match=r"torchaudio\.pt \(a torchaudio state dict\): no architecture; set arch"
    ):
        check_weights(ta)
    with pytest.raises(WeightsError, match=r"wav2vec2-torchaudio\.pt: does not fit .*shape"):
        check_weights(ta, arch="wav2vec2_base")
    check_weights(ta, architecture=tiny_architecture("wav2vec2"))
    legacy = tmp_path / "legacy.pt"  # torch's pre-1.6 file format (not a zip): read whole
    torch.save(torch.load(ta), legacy, _use_new_zipfile_serialization=False)
    check_weights(legacy, architecture=tiny_architecture("wav2vec2"))
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match=r"notes\.pt: cannot be read with torch\.load"):
        check_weights(tmp_path / "notes.pt")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(config | {"model_type": "bert"}))
    with pytest.raises(WeightsError, match="model_type must be hubert, wav2vec2 or wavlm"):
        check_weights(hf)


@pytest.mark.parametrize("large", [False, True], ids=["base", "large"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_clips_embedding_does_not_depend_on_its_batch(
    family: str, large: bool, one_thread
) -> None:
    """Padded batch (lengths given) vs each clip alone: equal on the valid frames."""
    torch.manual_seed(0)
    encoder = SpeechEncoder(architecture=tiny_architecture(family, large)).eval()
    clips = [torch.randn(n) for n in (4000, 2500, 3217)]
    batch = pad_waveforms([{"audio": c, "index": i} for i, c in enumerate(clips)])
    assert batch["attention_mask"].sum(1).tolist() == [4000, 2500, 3217]
    with torch.no_grad():
        states = encoder.forward_hidden_states(batch["audio"], batch["length"])
        pooled = encoder(batch["audio"], batch["length"])
        frames = encoder.frame_lengths(batch["length"])
        for i, clip in enumerate(clips):
            alone = encoder.forward_hidden_states(clip[None])
            assert alone[0].shape[1] == frames[i]
            for a, b in zip(alone, states, strict=True):
                torch.testing.assert_close(b[i, : frames[i]], a[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pooled[i], encoder(clip[None])[0], rtol=1e-5, atol=1e-5)
        # Without lengths the padding leaks in: the check above is not vacuous.
        unmasked = encoder(batch["audio"])
    assert not torch.allclose(unmasked[1], pooled[1], atol=1e-3)


def test_shared_embedding_ignores_the_padding_of_short_clips(one_thread) -> None:
    from distillery.eval.embed import embed

    torch.manual_seed(0)
    encoder = SpeechEncoder(architecture=tiny_architecture("wavlm"))
    clips = [torch.randn(n) for n in (4000, 1800)]
    batch = pad_waveforms([{"audio": c, "index": i, "label": 0} for i, c in enumerate(clips)])
    _, z, _ = embed(encoder, [batch], featurize=lambda a: a)
    with torch.no_grad():
        alone = [encoder.eval()(c[None])[0].numpy() for c in clips]
    for row, expected in zip(z, alone, strict=True):
        assert abs(row - expected).max() < 1e-5


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_embedding_layer_and_pooling(pooling: str, one_thread) -> None:
    torch.manual_seed(0)
    full = SpeechEncoder(architecture=tiny_architecture("hubert")).eval()
    layer1 = SpeechEncoder(
        architecture=tiny_architecture("hubert"), embedding_layer=1, pooling=pooling
    ).eval()
    layer1.load_state_dict(full.state_dict())
    clips = [torch.randn(n) for n in (4000, 2300)]
    batch = pad_waveforms([{"audio": c} for c in clips])
    with torch.no_grad():
        pooled = layer1(batch["audio"], batch["length"])
        for i, clip in enumerate(clips):
            hidden = full.forward_hidden_states(clip[None])[1][0]  # layer 1, the clip alone
            expected = hidden.mean(0) if pooling == "mean" else hidden.amax(0)
            torch.testing.assert_close(pooled[i], expected, rtol=1e-5, atol=1e-5)
    assert layer1.architecture_config()["embedding_layer"] == 1
    with pytest.raises(ValueError, match="embedding_layer=3 outside"):
        SpeechEncoder(architecture=tiny_architecture("hubert"), embedding_layer=3)


def _without_gradient(encoder: SpeechEncoder, outputs: list[torch.Tensor]) -> set[str]:
    sum(o.sum() for o in outputs).backward()
    return {n for n, p in encoder.named_parameters() if p.grad is None}


def _declared(encoder: SpeechEncoder, submodules: tuple[str, ...]) -> set[str]:
    return {f"{m}.{n}" for m in submodules for n, _ in encoder.get_submodule(m).named_parameters()}


@pytest.mark.parametrize("embedding_layer", [0, 1, -1])
@pytest.mark.parametrize("large", [False, True], ids=["base", "large"])
@pytest.mark.parametrize("family", ["hubert", "wavlm"])
def test_declared_unused_submodules_are_exactly_the_parameters_without_gradient(
    family: str, large: bool, embedding_layer: int, one_thread
) -> None:
    """``outside_forward`` / ``outside_hidden_states`` (what the stages freeze, so DDP sees
    no parameter without a gradient) are the parameters a backward pass leaves untouched:
    no more (a frozen parameter the loss could train), no less."""
    architecture = tiny_architecture(family, large)
    audio, lengths = torch.randn(2, 4000), torch.tensor([4000, 2500])
    encoder = SpeechEncoder(architecture=architecture, embedding_layer=embedding_layer)
    exits, embedding = encoder.forward_exits(audio, lengths)
    unused = _without_gradient(encoder, [*exits, embedding])
    assert unused == _declared(encoder, encoder.outside_forward)
    assert (encoder.model.encoder.transformer.layer_norm.weight.grad is None) == large
    encoder = SpeechEncoder(architecture=architecture, embedding_layer=embedding_layer)
    unused = _without_gradient(encoder, encoder.forward_hidden_states(audio, lengths))
    assert unused == _declared(encoder, encoder.outside_hidden_states)


def _hidden_states_to(encoder, index: int) -> list[torch.Tensor]:
    args = (torch.randn(2, 4000), torch.tensor([4000, 2500]))
    if not isinstance(encoder, SpeechEncoder):
        args = (torch.randn(2, 1, 16, 20),)
    return encoder.forward_hidden_states(*args)[: index + 1]


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("kind", ["transformer", "hubert", "wavlm-large"])
def test_declared_submodules_after_a_hidden_state_are_exactly_those_without_gradient(
    kind: str, index: int, one_thread
) -> None:
    """A layer-wise loss on hidden states 0..index leaves the layers after ``index``
    without a gradient: ``outside_hidden_states_to(index)`` (what prune_distill and
    final_distill freeze for their highest distilled layer) names exactly those."""
    torch.manual_seed(0)
    if kind == "transformer":
        encoder = build_encoder(TINY_TRANSFORMER)
    else:
        family, _, size = kind.partition("-")
        encoder = SpeechEncoder(architecture=tiny_architecture(family, size == "large"))
    unused = _without_gradient(encoder, _hidden_states_to(encoder, index))
    assert unused == _declared(encoder, encoder.outside_hidden_states_to(index))
