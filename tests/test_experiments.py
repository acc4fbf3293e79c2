"""Every shipped recipe runs end to end at smoke size (slow: `make test-full`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillery.models.io import build_encoder, save_encoder
from distillery.pipeline.runner import Runner
from tests.helpers import FAST, compose_config
from tests.test_config import EXPERIMENTS, TEACHER_FILES

#: Speech-model recipes at Base size (94M parameters) run in their own tests: HuBERT Base
#: in tests/stages/test_dphubert.py, each recipe from a tiny Hugging Face model in
#: tests/stages/test_dphubert_speech.py and tests/stages/test_speech_pseudo_labels.py.
RUN_ELSEWHERE = {"dphubert_hubert", "dphubert_wav2vec2", "dphubert_wavlm", "hubert_pseudo_labels"}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e not in RUN_ELSEWHERE])
def test_every_recipe_runs_at_smoke_size(experiment: str, tmp_path: Path, data_cache: Path) -> None:
    extra = []
    if experiment in TEACHER_FILES:  # the teacher another run would have trained
        teacher = tmp_path / "teacher.pt"
        cfg = {"_target_": "distillery.models.encoders.AudioNTT", "n_mels": 64, "channels": 8}
        save_encoder(teacher, build_encoder(cfg), cfg)
        extra.append(f"{TEACHER_FILES[experiment]}={teacher}")
    cfg = compose_config(
        [
            f"experiment={experiment}",
            *FAST,
            f"run_dir={tmp_path / 'run'}",
            f"data.cache_dir={data_cache}",
            "eval.plots=false",
            *extra,
        ]
    )
    stages = Runner(cfg).run()
    assert [s.status for s in stages.values()] == ["done"] * len(cfg.pipeline.order)
