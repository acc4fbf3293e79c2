"""Pseudo-labels from layer N of an imported HuBERT, and a student trained on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tests.helpers import FAST, compose_config
from tests.speech_models import hf_model, write_huggingface

from distillery.models.io import load_encoder
from distillery.pipeline.runner import Runner

ENCODER = "pipeline.stages.teacher.module.encoder"


def test_layer_n_features_of_an_imported_hubert_label_a_student(
    tmp_path: Path, data_cache: Path
) -> None:
    reference = hf_model("hubert")
    weights = write_huggingface(reference, tmp_path / "hubert-hf")
    cfg = compose_config(
        [
            "experiment=hubert_pseudo_labels",
            *FAST,
            f"run_dir={tmp_path / 'run'}",
            f"data.cache_dir={data_cache}",
            f"{ENCODER}.weights={weights}",
            f"{ENCODER}.arch=null",
            f"{ENCODER}.embedding_layer=1",
            "pipeline.stages.teacher.callbacks.pseudo_labeler.k=8",
            "data.batch_size=8",
            "eval.plots=false",
            "eval.probe_epochs=2",
        ]
    )
    stages = Runner(cfg).run()
    assert [s.status for s in stages.values()] == ["done", "done"]
    labels = np.load(tmp_path / "run" / "teacher" / "pseudo_labels" / "labels.npy")
    assert len(np.unique(labels[labels >= 0])) > 1
    meta = json.loads((tmp_path / "run" / "teacher" / "pseudo_labels" / "meta.json").read_text())
    assert meta["k"] == 8
    # The teacher that labelled: the imported weights, frozen, pooling layer 1.
    teacher, config = load_encoder(tmp_path / "run" / "teacher" / "encoder.pt")
    assert config["embedding_layer"] == 1 and "weights" not in config
    audio = torch.randn(1, 4000)
    with torch.no_grad():
        layer1 = reference(audio, output_hidden_states=True).hidden_states[1].mean(1)
        torch.testing.assert_close(teacher.eval()(audio), layer1, rtol=1e-4, atol=1e-4)
    assert "self_distill/eval/knn10_acc" in stages["self_distill"].metrics
