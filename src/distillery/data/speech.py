"""Built-in spoken-word data set, synthesised with the ``espeak-ng`` program.

Each of ``speakers`` synthetic speakers is an espeak-ng accent (``en-us``, ``en-gb-scotland``,
...) with a voice variant (``m3``, ``f2``, ...), a base pitch and a base speaking rate; it
says every word ``clips_per_word`` times, each time with a slightly different rate and
pitch, placed at a random onset in coloured background noise at a random SNR and scaled
to a random loudness. Splits are by speaker: the last ``val_speakers + test_speakers``
speakers are val and test, so no voice of the test split was heard in training.

Written like the synthetic set: ``cache_dir/speech-<hash>/audio/<word>/<speaker>_<i>.wav``
plus a ``manifest.csv`` (``path,label,split,speaker,voice``), reused while complete.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from distillery import artifacts
from distillery.config.schema import SPEECH_WORDS
from distillery.data.audio_io import resample, write_wav
from distillery.data.synthetic import _coloured_noise, _rms, manifest_is_complete, spec_hash

__all__ = ["ESPEAK", "SpeechSpec", "generate_speech", "require_espeak", "speaker_voices"]

log = logging.getLogger("distillery.data")

ESPEAK = "espeak-ng"

# Bump when the generated audio changes for the same spec, so old caches are not reused.
GENERATOR_VERSION = 1

#: English accents of espeak-ng's own (non-MBROLA) voices, and its voice variants.
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")


def require_espeak() -> str:
    """The path of the ``espeak-ng`` program.

    Raises:
        FileNotFoundError: naming the program and how to install it.
    """
    found = shutil.which(ESPEAK)
    if found is None:
        raise FileNotFoundError(
            f"data.source=speech needs the program {ESPEAK!r}, which is not on PATH; "
            f"install it (Debian/Ubuntu: apt-get install {ESPEAK})"
        )
    return found


@dataclass(frozen=True)
class SpeechSpec:
    """What to generate: every word said ``clips_per_word`` times by each of ``speakers``."""

    words: tuple[str, ...] = SPEECH_WORDS
    speakers: int = 12
    clips_per_word: int = 3
    val_speakers: int = 2
    test_speakers: int = 2
    sample_rate: int = 16000
    clip_seconds: float = 1.0
    seed: int = 0
    snr_db_min: float = 5.0
    snr_db_max: float = 30.0
    #: Speaking rate range of the speakers (words per minute; espeak-ng's default is 175).
    rate_wpm: tuple[float, float] = field(default=(130.0, 220.0))
    #: Base pitch range of the speakers (espeak-ng's 0-99 scale; default 50).
    pitch: tuple[float, float] = field(default=(25.0, 75.0))

    def __post_init__(self) -> None:
        words = tuple(str(w).strip() for w in self.words)
        if len(words) < 2 or not all(words) or len(set(words)) != len(words):
            raise ValueError(f"speech words must be >= 2 distinct non-empty words, got {words}")
        if not all(w.replace("'", "").isalpha() for w in words):
            # They become folder names and espeak-ng input: letters only.
            raise ValueError(f"speech words must be letters only, got {words}")
        object.__setattr__(self, "words", words)
        for name in ("speakers", "clips_per_word", "val_speakers", "test_speakers", "seed"):
            value = getattr(self, name)
            if float(value) != int(value):
                raise ValueError(f"speech {name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("clip_seconds", "snr_db_min", "snr_db_max"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("rate_wpm", "pitch"):
            low, high = (float(v) for v in getattr(self, name))
            if not low <= high:
                raise ValueError(f"speech {name} must be [low, high] with low <= high")
            object.__setattr__(self, name, (low, high))
        if not (self.rate_wpm[0] >= 80 and self.rate_wpm[1] <= 450):
            raise ValueError(f"speech rate_wpm must lie in [80, 450], got {self.rate_wpm}")
        if not (self.pitch[0] >= 0 and self.pitch[1] <= 99):
            raise ValueError(f"speech pitch must lie in [0, 99], got {self.pitch}")
        if self.clips_per_word < 1 or self.seed < 0:
            raise ValueError("speech clips_per_word must be >= 1 and seed >= 0")
        if min(self.val_speakers, self.test_speakers) < 1 or self.train_speakers < 1:
            raise ValueError(
                f"speech: {self.speakers} speakers leave no train speaker after "
                f"val_speakers={self.val_speakers} and test_speakers={self.test_speakers} "
                "(each of the three needs at least 1)"
            )
        if not self.snr_db_min <= self.snr_db_max:
            raise ValueError(
                f"speech snr_db_min ({self.snr_db_min}) must be <= snr_db_max ({self.snr_db_max})"
            )
        if not self.clip_seconds >= 0.5:
            raise ValueError(f"speech clip_seconds must be >= 0.5, got {self.clip_seconds}")

    @property
    def train_speakers(self) -> int:
        return self.speakers - self.val_speakers - self.test_speakers

    @property
    def num_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    def split_of(self, speaker: int) -> str:
        """The split of speaker ``speaker``: train first, then val, then test."""
        if speaker < self.train_speakers:
            return "train"
        return "val" if speaker < self.train_speakers + self.val_speakers else "test"


@dataclass(frozen=True)
class Voice:
    """One speaker: espeak-ng voice name (accent+variant), base rate (wpm) and pitch."""

    name: str
    rate_wpm: float
    pitch: float


def speaker_voices(spec: SpeechSpec) -> list[Voice]:
    """The ``spec.speakers`` voices, each drawn from a generator seeded with ``(seed, s)``.

    Accent and variant cycle through their lists (shuffled once by the seed) so that
    speakers differ in both before any pair repeats.
    """
    order = np.random.default_rng([spec.seed, 1_000_003])
    accents = [ACCENTS[i] for i in order.permutation(len(ACCENTS))]
    variants = [VARIANTS[i] for i in order.permutation(len(VARIANTS))]
    voices = []
    for s in range(spec.speakers):
        rng = np.random.default_rng([spec.seed, s])
        voices.append(
            Voice(
                f"{accents[s % len(accents)]}+{variants[s % len(variants)]}",
                float(rng.uniform(*spec.rate_wpm)),
                float(rng.uniform(*spec.pitch)),
            )
        )
    return voices


def _speak(
    program: str, word: str, voice: str, rate_wpm: int, pitch: int
) -> tuple[np.ndarray, int]:
    """espeak-ng's WAV of ``word`` (read from its stdout): float32 samples and their rate."""
    done = subprocess.run(
        [program, "-v", voice, "-s", str(rate_wpm), "-p", str(pitch), "--stdout", word],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0 or not done.stdout:
        raise RuntimeError(
            f"{ESPEAK} -v {voice} failed on {word!r} (exit {done.returncode}): "
            f"{done.stderr.decode(errors='replace').strip()}"
        )
    audio, rate = sf.read(io.BytesIO(done.stdout), dtype="float32")
    return audio, int(rate)


def _trim(audio: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """``audio`` without the leading and trailing silence espeak-ng adds."""
    loud = np.flatnonzero(np.abs(audio) > threshold * max(float(np.abs(audio).max()), 1e-9))
    return audio[loud[0] : loud[-1] + 1] if loud.size else audio


def generate_speech_clip(
    program: str, word: str, voice: Voice, rng: np.random.Generator, spec: SpeechSpec
) -> np.ndarray:
    """One utterance of ``word`` by ``voice`` (rate and pitch jittered by ``rng``), in noise.

    Returns:
        float32 array of shape ``(spec.num_samples,)`` in [-1, 1].
    """
    rate = int(round(np.clip(voice.rate_wpm * rng.uniform(0.9, 1.1), 80, 450)))
    pitch = int(round(np.clip(voice.pitch + rng.uniform(-6.0, 6.0), 0, 99)))
    audio, file_rate = _speak(program, word, voice.name, rate, pitch)
    speech = _trim(resample(audio, file_rate, spec.sample_rate))
    n = spec.num_samples
    if len(speech) > n:  # a slow speaker's long word: keep its middle
        start = (len(speech) - n) // 2
        speech = speech[start : start + n]
    onset = int(rng.integers(0, n - len(speech) + 1))
    # SNR over the word: speech power 1, noise power 10**(-snr/10).
    speech = speech / _rms(speech)
    snr_db = rng.uniform(spec.snr_db_min, spec.snr_db_max)
    clip = _coloured_noise(rng, n, alpha=rng.uniform(0.0, 2.0)) * 10.0 ** (-snr_db / 20.0)
    clip[onset : onset + len(speech)] += speech
    clip *= 10.0 ** (rng.uniform(-40.0, -22.0) / 20.0) / _rms(clip)
    peak = float(np.max(np.abs(clip)))
    if peak > 0.99:
        clip *= 0.99 / peak
    return clip.astype(np.float32)


def generate_speech(
    spec: SpeechSpec, cache_dir: str | os.PathLike[str], *, workers: int | None = None
) -> Path:
    """Write the spoken-word set as WAV files plus ``manifest.csv``; return the manifest path.

    Utterance ``i`` of word ``w`` by speaker ``s`` is drawn from a generator seeded with
    ``(seed, s, w, i)``; espeak-ng runs in a pool of ``workers`` threads (default: the
    CPU count). An existing complete manifest is reused; the manifest is written last and
    atomically, so an interrupted run is redone on the next call.

    Raises:
        FileNotFoundError: when espeak-ng is not installed.
    """
    root = Path(cache_dir) / f"speech-{spec_hash(spec, GENERATOR_VERSION)}"
    manifest = root / "manifest.csv"
    expected = len(spec.words) * spec.speakers * spec.clips_per_word
    if manifest_is_complete(manifest, expected):
        log.info("Reusing speech data (%d clips) at %s", expected, root)
        return manifest
    program = require_espeak()
    voices = speaker_voices(spec)
    root.mkdir(parents=True, exist_ok=True)
    jobs = [
        (s, w, i)
        for s in range(spec.speakers)
        for w in range(len(spec.words))
        for i in range(spec.clips_per_word)
    ]

    def make(job: tuple[int, int, int]) -> list[str]:
        s, w, i = job
        rng = np.random.default_rng([spec.seed, s, w, i])
        audio = generate_speech_clip(program, spec.words[w], voices[s], rng, spec)
        rel = f"audio/{spec.words[w]}/s{s:03d}_{i:03d}.wav"
        write_wav(root / rel, audio, spec.sample_rate)
        return [rel, spec.words[w], spec.split_of(s), f"s{s:03d}", voices[s].name]

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        rows = list(pool.map(make, jobs))  # in job order, whatever finished first

    meta = {**asdict(spec), "voices": [asdict(v) for v in voices]}
    artifacts.write_text(root / "spec.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "split", "speaker", "voice"])
    writer.writerows(rows)
    artifacts.write_text(manifest, buf.getvalue())
    log.info(
        "Wrote speech data (%d clips: %d words x %d speakers x %d) to %s",
        expected,
        len(spec.words),
        spec.speakers,
        spec.clips_per_word,
        root,
    )
    return manifest
