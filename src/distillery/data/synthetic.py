"""Deterministic synthetic audio data set of parametric sound classes.

Each clip contains one sound event (a tone, chirp, click train, whispered vowel, ...)
with random onset, duration, pitch, timbre and envelope, mixed into coloured
background noise at a random SNR, and finally scaled to a random loudness that
does not depend on the class. The classes are therefore learnable from spectral
and temporal shape, but not from level alone.

Waveforms are float32 arrays of shape ``(samples,)`` in [-1, 1].
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track

from distillery import artifacts
from distillery.data.audio_io import write_wav

__all__ = [
    "CLASS_NAMES",
    "SyntheticSpec",
    "generate_clip",
    "generate_synthetic",
    "manifest_is_complete",
    "spec_hash",
]

log = logging.getLogger("distillery.data")

# Bump when the generated audio changes for the same spec, so old caches are not reused.
GENERATOR_VERSION = 1

_TWO_PI = 2.0 * np.pi


# --------------------------------------------------------------------------- helpers


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)) + 1e-20))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """Sample log-uniformly, which matches how pitch ranges are perceived."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _coloured_noise(rng: np.random.Generator, n: int, alpha: float) -> np.ndarray:
    """Unit-RMS Gaussian noise with power spectrum ~ 1/f**alpha (0 white, 1 pink, 2 brown)."""
    m = n // 2 + 1
    spectrum = rng.standard_normal(m) + 1j * rng.standard_normal(m)
    bins = np.arange(m, dtype=np.float64)
    bins[0] = 1.0  # avoid division by zero; DC is removed below anyway
    spectrum *= bins ** (-alpha / 2.0)
    spectrum[0] = 0.0
    x = np.fft.irfft(spectrum, n)
    return x / _rms(x)


def _formant_filter(x: np.ndarray, sr: int, formants: list[tuple[float, float]]) -> np.ndarray:
    """Filter ``x`` by a sum of Lorentzian resonances given as (centre Hz, bandwidth Hz)."""
    freqs = np.fft.rfftfreq(x.shape[0], d=1.0 / sr)
    response = np.zeros_like(freqs)
    for gain, (centre, bandwidth) in zip((1.0, 0.7, 0.35), formants, strict=False):
        response += gain / (1.0 + ((freqs - centre) / (bandwidth / 2.0)) ** 2)
    return np.fft.irfft(np.fft.rfft(x) * response, x.shape[0])


def _ramp(length: int) -> np.ndarray:
    """Raised-cosine rise from 0 towards 1, shape ``(length,)``."""
    return 0.5 - 0.5 * np.cos(np.pi * np.arange(length) / max(length, 1))


def _phase(freq: np.ndarray | float, n: int, sr: int) -> np.ndarray:
    """Instantaneous phase (radians) of a frequency track (Hz), shape ``(n,)``."""
    track_hz = np.broadcast_to(np.asarray(freq, dtype=np.float64), (n,))
    return _TWO_PI * np.cumsum(track_hz) / sr


def _harmonic_tone(
    rng: np.random.Generator, n: int, sr: int, f0: float, max_harmonics: int
) -> np.ndarray:
    """Harmonic complex with random spectral roll-off, phases and a slight vibrato."""
    harmonics = np.arange(1, max_harmonics + 1, dtype=np.float64)
    harmonics = harmonics[harmonics * f0 < 0.45 * sr]
    amps = harmonics ** (-rng.uniform(0.8, 2.0))
    phases = rng.uniform(0.0, _TWO_PI, harmonics.shape[0])
    t = np.arange(n) / sr
    vibrato = 1.0 + rng.uniform(0.0, 0.01) * np.sin(_TWO_PI * rng.uniform(3.0, 6.0) * t)
    base = _phase(f0 * vibrato, n, sr)
    return (amps[:, None] * np.sin(harmonics[:, None] * base[None, :] + phases[:, None])).sum(0)


def _sweep(
    rng: np.random.Generator, n: int, sr: int, up: bool, octaves: tuple[float, float] = (1.5, 2.5)
) -> np.ndarray:
    """Exponential frequency sweep over ``octaves`` octaves, with a random 2nd harmonic."""
    f_low = _log_uniform(rng, 200.0, 600.0)
    f_high = min(f_low * 2.0 ** rng.uniform(*octaves), 0.4 * sr)
    start, end = (f_low, f_high) if up else (f_high, f_low)
    track_hz = start * (end / start) ** (np.arange(n) / max(n - 1, 1))
    phase = _phase(track_hz, n, sr)
    return np.sin(phase) + rng.uniform(0.0, 0.5) * np.sin(2.0 * phase)


def _click_train(rng: np.random.Generator, n: int, sr: int, rate_hz: float) -> np.ndarray:
    """Clicks (short damped resonances) at ``rate_hz`` with timing and amplitude jitter."""
    period = sr / rate_hz
    first = rng.uniform(0.0, min(period, 0.5 * n))
    times = np.arange(first, n, period)
    times = times + rng.normal(0.0, 0.05 * period, times.shape[0])
    idx = np.clip(np.round(times).astype(np.int64), 0, n - 1)
    impulses = np.zeros(n)
    impulses[idx] = rng.uniform(0.5, 1.0, idx.shape[0])
    # A damped resonance plus some noise: a "tick" whose colour varies from clip to clip.
    tau = rng.uniform(0.0005, 0.002) * sr
    t = np.arange(max(int(5 * tau), 4))
    resonance = np.sin(_TWO_PI * _log_uniform(rng, 800.0, 3500.0) * t / sr)
    kernel = (resonance + 0.3 * rng.standard_normal(t.shape[0])) * np.exp(-t / tau)
    return np.convolve(impulses, kernel)[:n]


def _vowel(
    rng: np.random.Generator, n: int, sr: int, formant_ranges: list[tuple[float, float]]
) -> np.ndarray:
    """Formant-filtered noise, partly voiced by a pulse train (a whispered-to-voiced vowel)."""
    noise = rng.standard_normal(n)
    period = int(round(sr / _log_uniform(rng, 90.0, 220.0)))
    pulses = np.zeros(n)
    pulses[rng.integers(0, period) :: period] = 1.0
    voicing = rng.uniform(0.0, 0.6)
    source = (1.0 - voicing) * noise / _rms(noise) + voicing * pulses / _rms(pulses)
    # Formant centres jitter per clip (speaker variation); bandwidths 60-150 Hz.
    formants = [(rng.uniform(lo, hi), rng.uniform(60.0, 150.0)) for lo, hi in formant_ranges]
    return _formant_filter(source, sr, formants)


def _am_tone(
    rng: np.random.Generator, n: int, sr: int, rate_hz: tuple[float, float] = (4.0, 16.0)
) -> np.ndarray:
    """Sinusoid with sinusoidal amplitude modulation (tremolo) at ``rate_hz`` Hz."""
    t = np.arange(n) / sr
    carrier = np.sin(_phase(_log_uniform(rng, 300.0, 1500.0), n, sr))
    depth = rng.uniform(0.6, 1.0)
    modulator = 1.0 + depth * np.sin(_TWO_PI * rng.uniform(*rate_hz) * t + rng.uniform(0, _TWO_PI))
    return carrier * modulator


def _fm_tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Sinusoid with a wide, slow frequency modulation (siren-like vibrato)."""
    t = np.arange(n) / sr
    fc = _log_uniform(rng, 400.0, 1200.0)
    deviation = rng.uniform(0.08, 0.2) * fc
    fm = rng.uniform(3.0, 10.0)
    track_hz = fc + deviation * np.sin(_TWO_PI * fm * t + rng.uniform(0, _TWO_PI))
    phase = _phase(track_hz, n, sr)
    return np.sin(phase) + rng.uniform(0.0, 0.3) * np.sin(2.0 * phase)


def _noise_burst(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Broadband noise with a small random spectral tilt."""
    return _coloured_noise(rng, n, alpha=rng.uniform(-0.5, 0.5))


# (name, generator of an event of n samples at sr Hz). The order fixes label order,
# and the first ``num_classes`` kinds are used, so it mixes kinds of sounds early.
_KINDS: list[tuple[str, Callable[[np.random.Generator, int, int], np.ndarray]]] = [
    ("tone_low", lambda rng, n, sr: _harmonic_tone(rng, n, sr, _log_uniform(rng, 90, 220), 12)),
    ("tone_high", lambda rng, n, sr: _harmonic_tone(rng, n, sr, _log_uniform(rng, 500, 1100), 6)),
    ("chirp_up", lambda rng, n, sr: _sweep(rng, n, sr, up=True)),
    ("chirp_down", lambda rng, n, sr: _sweep(rng, n, sr, up=False)),
    ("noise_burst", _noise_burst),
    ("clicks_slow", lambda rng, n, sr: _click_train(rng, n, sr, rng.uniform(3.0, 8.0))),
    ("vowel_a", lambda rng, n, sr: _vowel(rng, n, sr, [(650, 850), (1050, 1350), (2400, 2800)])),
    ("vowel_i", lambda rng, n, sr: _vowel(rng, n, sr, [(250, 350), (2000, 2500), (2800, 3300)])),
    ("clicks_fast", lambda rng, n, sr: _click_train(rng, n, sr, rng.uniform(15.0, 40.0))),
    ("am_tone", _am_tone),
    ("fm_tone", _fm_tone),
    ("vowel_u", lambda rng, n, sr: _vowel(rng, n, sr, [(280, 380), (750, 950), (2200, 2600)])),
    # Kinds 12-19 (data=synthetic_hard) each sit next to one above and differ from it in
    # one parameter only, with ranges that meet: a confusable pair each.
    ("vowel_o", lambda rng, n, sr: _vowel(rng, n, sr, [(380, 500), (800, 1000), (2300, 2700)])),
    ("vowel_e", lambda rng, n, sr: _vowel(rng, n, sr, [(350, 500), (1800, 2200), (2600, 3000)])),
    ("tone_mid", lambda rng, n, sr: _harmonic_tone(rng, n, sr, _log_uniform(rng, 200, 520), 9)),
    ("chirp_up_short", lambda rng, n, sr: _sweep(rng, n, sr, up=True, octaves=(0.6, 1.5))),
    ("chirp_down_short", lambda rng, n, sr: _sweep(rng, n, sr, up=False, octaves=(0.6, 1.5))),
    ("clicks_mid", lambda rng, n, sr: _click_train(rng, n, sr, rng.uniform(7.0, 16.0))),
    ("am_tone_fast", lambda rng, n, sr: _am_tone(rng, n, sr, rate_hz=(14.0, 30.0))),
    ("noise_pink", lambda rng, n, sr: _coloured_noise(rng, n, alpha=rng.uniform(0.4, 1.2))),
]

CLASS_NAMES: list[str] = [name for name, _ in _KINDS]


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate: ``num_classes`` x ``clips_per_class`` clips of ``clip_seconds`` s."""

    num_classes: int = 8
    clips_per_class: int = 100
    sample_rate: int = 16000
    clip_seconds: float = 1.0
    seed: int = 0
    snr_db_min: float = 0.0
    snr_db_max: float = 20.0

    def __post_init__(self) -> None:
        # Config values may arrive as 1 vs 1.0 (or numpy scalars); fix the types so that
        # equal specs hash equally and the seed is a valid SeedSequence entry.
        for name, kind in (
            ("num_classes", int),
            ("clips_per_class", int),
            ("sample_rate", int),
            ("seed", int),
            ("clip_seconds", float),
            ("snr_db_min", float),
            ("snr_db_max", float),
        ):
            value = getattr(self, name)
            if kind is int and float(value) != int(value):
                raise ValueError(f"synthetic {name} must be an integer, got {value!r}")
            object.__setattr__(self, name, kind(value))
        if not 1 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(
                f"synthetic num_classes must be between 1 and {len(CLASS_NAMES)} "
                f"(the number of sound kinds available), got {self.num_classes}"
            )
        if self.clips_per_class < 1:
            raise ValueError(f"synthetic clips_per_class must be >= 1, got {self.clips_per_class}")
        if self.sample_rate < 8000:
            raise ValueError(f"synthetic sample_rate must be >= 8000 Hz, got {self.sample_rate}")
        if not self.clip_seconds >= 0.1:
            raise ValueError(f"synthetic clip_seconds must be >= 0.1, got {self.clip_seconds}")
        if self.seed < 0:
            raise ValueError(f"synthetic seed must be >= 0, got {self.seed}")
        if not self.snr_db_min <= self.snr_db_max:
            raise ValueError(
                f"synthetic snr_db_min ({self.snr_db_min}) must be <= snr_db_max ({self.snr_db_max})"
            )

    @property
    def num_samples(self) -> int:
        """Samples per clip."""
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def class_names(self) -> list[str]:
        """Names of the classes this spec generates, in label order."""
        return CLASS_NAMES[: self.num_classes]


def spec_hash(spec: Any, generator_version: int = GENERATOR_VERSION) -> str:
    """Short stable hash of a generated set's spec (a dataclass) and its generator's version,
    used as cache folder name (the synthetic set's by default; the speech set passes its own)."""
    payload = json.dumps({**asdict(spec), "generator_version": generator_version}, sort_keys=True)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:10]


# --------------------------------------------------------------------------- generation


def generate_clip(kind_index: int, rng: np.random.Generator, spec: SyntheticSpec) -> np.ndarray:
    """Generate one clip of sound kind ``kind_index`` (index into ``CLASS_NAMES``).

    Returns:
        float32 array of shape ``(spec.num_samples,)`` in [-1, 1].
    """
    if not 0 <= kind_index < len(_KINDS):
        raise ValueError(f"kind_index must be in [0, {len(_KINDS)}), got {kind_index}")
    sr, n = spec.sample_rate, spec.num_samples

    event_len = min(n, max(int(rng.uniform(0.3, 0.9) * n), int(0.05 * sr)))
    onset = int(rng.integers(0, n - event_len + 1))
    event = _KINDS[kind_index][1](rng, event_len, sr)

    # Raised-cosine attack/release so onsets are not a trivial broadband cue.
    attack = min(int(sr * rng.uniform(0.005, 0.04)), event_len // 2)
    release = min(int(sr * rng.uniform(0.02, 0.15)), event_len // 2)
    envelope = np.ones(event_len)
    envelope[:attack] = _ramp(attack)
    envelope[event_len - release :] *= _ramp(release)[::-1]
    event = event * envelope
    event /= _rms(event)

    # SNR is measured over the event window: event power 1, noise power 10**(-snr/10).
    snr_db = rng.uniform(spec.snr_db_min, spec.snr_db_max)
    clip = _coloured_noise(rng, n, alpha=rng.uniform(0.0, 2.0)) * 10.0 ** (-snr_db / 20.0)
    clip[onset : onset + event_len] += event

    # Overall loudness is drawn independently of the class; the range leaves headroom for
    # sparse clicks (crest factor up to ~35 dB) so the peak limiter rarely changes it.
    clip *= 10.0 ** (rng.uniform(-44.0, -24.0) / 20.0) / _rms(clip)
    peak = float(np.max(np.abs(clip)))
    if peak > 0.99:
        clip *= 0.99 / peak
    return clip.astype(np.float32)


def manifest_is_complete(manifest: Path, expected_rows: int) -> bool:
    """True when ``manifest`` lists ``expected_rows`` files that all exist."""
    if not manifest.is_file():
        return False
    with manifest.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return len(rows) == expected_rows and all(
        (manifest.parent / row["path"]).is_file() for row in rows
    )


def generate_synthetic(
    spec: SyntheticSpec, cache_dir: str | os.PathLike[str], *, progress: bool = True
) -> Path:
    """Write the synthetic data set as WAV files plus a ``manifest.csv``; return the manifest path.

    Layout: ``cache_dir/synthetic-<hash>/audio/<class_name>/<i>.wav`` and
    ``cache_dir/synthetic-<hash>/manifest.csv`` (columns ``path,label``; paths are
    relative to the manifest's folder, labels are class names).

    Clip ``i`` of class ``k`` is drawn from a generator seeded with ``(seed, k, i)``,
    so output is bit-identical for the same spec. An existing complete manifest is
    reused. The manifest is written last and atomically: an interrupted run leaves
    no manifest and is redone from scratch on the next call.
    """
    root = Path(cache_dir) / f"synthetic-{spec_hash(spec)}"
    manifest = root / "manifest.csv"
    names = spec.class_names
    expected = spec.num_classes * spec.clips_per_class
    if manifest_is_complete(manifest, expected):
        log.info("Reusing synthetic data (%d clips) at %s", expected, root)
        return manifest

    root.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(spec.clips_per_class - 1)))
    jobs = [(k, i) for k in range(spec.num_classes) for i in range(spec.clips_per_class)]
    rows: list[tuple[str, str]] = []
    for k, i in track(jobs, description="Generating synthetic audio", disable=not progress):
        audio = generate_clip(k, np.random.default_rng([spec.seed, k, i]), spec)
        rel = f"audio/{names[k]}/{i:0{width}d}.wav"
        write_wav(root / rel, audio, spec.sample_rate)
        rows.append((rel, names[k]))

    artifacts.write_text(
        root / "spec.json", json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n"
    )
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows(rows)
    artifacts.write_text(manifest, buf.getvalue())
    log.info("Wrote synthetic data (%d clips, %d classes) to %s", expected, spec.num_classes, root)
    return manifest
