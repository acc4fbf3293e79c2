"""The log-mel front-end equals torchaudio's MelSpectrogram it is built from."""

from __future__ import annotations

import torch
import torchaudio

from distillery.data.features import LOG_OFFSET, LogMel


def test_log_mel_equals_torchaudio_mel_spectrogram() -> None:
    audio = torch.randn(3, 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    reference = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=400, hop_length=160, f_min=60.0, f_max=7800.0, n_mels=64
    )
    expected = torch.log(reference(audio) + LOG_OFFSET).unsqueeze(1)
    features = LogMel(16000, mean=1.5, std=2.0)
    torch.testing.assert_close(features.log_mel(audio), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features(audio), (expected - 1.5) / 2.0, atol=1e-5, rtol=1e-5)
