"""A user's data source: pure tones of a few pitches, one class per pitch, written as WAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from distillery.data.sources import AudioRecord, SourceTable


def tone_source(
    root: str, num_classes: int = 3, clips_per_class: int = 12, sample_rate: int = 16000
) -> SourceTable:
    """Write ``clips_per_class`` noisy 1-second tones per class under ``root`` (once) and
    list them; class ``c`` is a tone at ``220 * 2**c`` Hz."""
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(sample_rate) / sample_rate
    records = []
    for label in range(num_classes):
        for i in range(clips_per_class):
            path = out / f"tone{label}_{i:03d}.wav"
            if not path.exists():
                wave = 0.5 * np.sin(2 * np.pi * 220 * 2**label * t + rng.uniform(0, 6.3))
                wave += 0.05 * rng.standard_normal(sample_rate)
                sf.write(path, wave.astype(np.float32), sample_rate)
            records.append(AudioRecord(path=path, label=label, split=None))
    return SourceTable(records=records, class_names=[f"{220 * 2**c}Hz" for c in range(num_classes)])
