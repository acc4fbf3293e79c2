"""Log-mel front-end (torchaudio), run on the accelerator after batch transfer."""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

LOG_OFFSET = 1e-6


class LogMel(nn.Module):
    """Waveforms (B, samples) -> normalised log-mel (B, 1, n_mels, frames).

    ``mean``/``std`` are data-set statistics of the log-mel values (set by the data module
    from training clips) so encoders see roughly unit-variance input.
    """

    def __init__(
        self,
        sample_rate: int,
        n_mels: int = 64,
        n_fft: int = 400,
        hop_length: int = 160,
        f_min: float = 60.0,
        f_max: float = 7800.0,
        mean: float = 0.0,
        std: float = 1.0,
    ) -> None:
        super().__init__()
        # torchaudio's MelSpectrogram, split: its power step (|z|.pow(2) on the complex
        # STFT) takes a square root only to square it again; real^2 + imag^2 is the same
        # value for 0.70x the log-mel time on CPU.
        self.stft = torchaudio.transforms.Spectrogram(
            n_fft=n_fft, hop_length=hop_length, power=None
        )
        self.mel_scale = torchaudio.transforms.MelScale(
            n_mels=n_mels,
            sample_rate=sample_rate,
            f_min=f_min,
            f_max=min(f_max, sample_rate / 2),
            n_stft=n_fft // 2 + 1,
        )
        self.mean = mean
        self.std = std

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """Un-normalised log-mel, (B, 1, n_mels, frames)."""
        spec = self.stft(audio.float())
        power = spec.real.square() + spec.imag.square()
        return torch.log(self.mel_scale(power) + LOG_OFFSET).unsqueeze(1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return (self.log_mel(audio) - self.mean) / self.std
