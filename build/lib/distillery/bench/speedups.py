"""Each speed change of the framework against the code it replaced, in the same run.

- ``channels-last``: one AudioNTT training step (forward, backward, Adam) with the conv
  weights in channels-last memory format (what :class:`~distillery.models.encoders.AudioNTT`
  uses) vs the default contiguous format.
- ``conv+BN folding``: embedding a batch with BatchNorm folded into the convolutions
  (:func:`~distillery.models.inference.fuse_conv_bn`, what ``eval.embed`` runs) vs the
  encoder as trained.
- ``power spectrum``: :class:`~distillery.data.features.LogMel` (re^2 + im^2 of the STFT) vs
  torchaudio's ``MelSpectrogram`` (``|z|.pow(2)``), same log-mel values.

Sizes follow the demo: batch 64, 1 s clips at 16 kHz, 64 mels, the teacher's AudioNTT.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torchaudio

from distillery.bench.timing import Comparison, interleaved, median
from distillery.data.features import LOG_OFFSET, LogMel
from distillery.models.encoders import AudioNTT
from distillery.models.inference import fuse_conv_bn

BATCH = 64
SAMPLE_RATE = 16000


def _discard(_: object) -> None:
    """Timed callables return None (the harness then times the whole call)."""


def _teacher() -> AudioNTT:
    return AudioNTT(n_mels=64, channels=64, dim=512)


def _train_step(model: AudioNTT, x: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    return step


def _inference(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(x)

    return run


def _compare(
    name: str,
    candidate: tuple[str, Callable[[], None]],
    baseline: tuple[str, Callable[[], None]],
    repeats: int,
    note: str,
) -> Comparison:
    for fn in (candidate[1], baseline[1]):  # warm-up: allocator, kernels
        fn()
    seconds = interleaved({candidate[0]: candidate[1], baseline[0]: baseline[1]}, repeats)
    return Comparison(
        benchmark="speedups",
        measure=f"{name}, batch of {BATCH}",
        unit="s",
        candidate=candidate[0],
        baseline=baseline[0],
        candidate_value=median(seconds[candidate[0]]),
        baseline_value=median(seconds[baseline[0]]),
        higher_is_better=False,
        note=note,
    )


def run(quick: bool) -> tuple[dict, list[Comparison]]:
    repeats = 3 if quick else 9
    torch.manual_seed(0)
    x = torch.randn(BATCH, 1, 64, 101)
    rows = []

    channels_last = _teacher()
    contiguous = copy.deepcopy(channels_last).to(memory_format=torch.contiguous_format)
    rows.append(
        _compare(
            "AudioNTT train step",
            ("channels-last conv weights", _train_step(channels_last, x)),
            ("contiguous conv weights", _train_step(contiguous, x)),
            repeats,
            "forward + backward + Adam step",
        )
    )

    trained = _teacher().eval()
    rows.append(
        _compare(
            "AudioNTT embedding",
            ("BatchNorm folded into convs", _inference(fuse_conv_bn(trained), x)),
            ("as trained", _inference(trained, x)),
            repeats,
            "eval mode, inference_mode",
        )
    )

    audio = torch.randn(BATCH, SAMPLE_RATE) * 0.1
    ours = LogMel(SAMPLE_RATE)
    reference = torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=400, hop_length=160, f_min=60.0, f_max=7800.0, n_mels=64
    )
    rows.append(
        _compare(
            "log-mel",
            ("LogMel (re^2 + im^2)", lambda: _discard(ours.log_mel(audio))),
            (
                "torchaudio MelSpectrogram",
                lambda: _discard(torch.log(reference(audio) + LOG_OFFSET)),
            ),
            repeats * 2,
            "same values within 1e-5",
        )
    )
    raw = {"repeats": repeats, "batch": BATCH}
    return raw, rows
