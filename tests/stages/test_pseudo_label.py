"""Stage ``pseudo_label``: the PseudoLabeler on a trained encoder, without training it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import FAST, compose_config

from distillery.pipeline.runner import Runner

PSEUDO = "pipeline.stages.pseudo_label.callbacks.pseudo_labeler"


def labels_run(run_dir: Path, data_cache: Path, stage_cache: Path, *extra: str):
    """experiment=unfused_labels up to its pseudo-labels, the teacher also carrying a
    PseudoLabeler with the settings of pseudo_label's (k 6, whitening to 8 of 512 dims)."""
    same = ["k=6", "pca_dim=8"]
    return compose_config(
        [
            "experiment=unfused_labels",
            *FAST,
            f"run_dir={run_dir}",
            f"data.cache_dir={data_cache}",
            f"stage_cache={stage_cache}",
            "pipeline.order=[ssl,pseudo_label]",
            "~pipeline.stages.self_distill",
            "~pipeline.stages.student_few",
            "+callback@pipeline.stages.ssl.callbacks.pseudo_labeler=pseudo_labeler",
            *(f"pipeline.stages.ssl.callbacks.pseudo_labeler.{s}" for s in same),
            *(f"{PSEUDO}.{s}" for s in same),
            *extra,
        ]
    )


def test_labels_match_the_callback_and_each_setting_reuses_the_one_teacher(
    tmp_path: Path, data_cache: Path, one_thread: None
) -> None:
    cache = tmp_path / "stage_cache"
    first = Runner(labels_run(tmp_path / "a", data_cache, cache)).run()
    assert first["pseudo_label"].optimizer_steps == [0]  # no training, by design
    # The same labels, centroids and statistics as the callback on the teacher's own stage.
    on_ssl = Path(first["ssl"].artifacts["pseudo_labels"]).parent
    here = Path(first["pseudo_label"].artifacts["pseudo_labels"]).parent
    assert here == tmp_path / "a/pseudo_label/pseudo_labels"
    np.testing.assert_array_equal(np.load(here / "labels.npy"), np.load(on_ssl / "labels.npy"))
    np.testing.assert_array_equal(
        np.load(here / "centroids.npy"), np.load(on_ssl / "centroids.npy")
    )
    meta = json.loads((here / "meta.json").read_text())
    assert meta == json.loads((on_ssl / "meta.json").read_text()) | {"epoch": meta["epoch"]}
    assert meta["embed_dim"] == 512 and meta["pca_dim"] == 8  # whitening ran
    nmi = first["pseudo_label"].metrics["pseudo_label/pseudo/nmi"]
    assert nmi == pytest.approx(meta["nmi"])

    # Another k: the teacher comes from the stage cache (not trained again), the labels not.
    second = Runner(labels_run(tmp_path / "b", data_cache, cache, f"{PSEUDO}.k=5")).run()
    assert second["ssl"].reused_from["run_dir"] == str(tmp_path / "a")
    assert second["ssl"].finished_at == first["ssl"].finished_at  # the same fit
    assert second["pseudo_label"].reused_from is None
    labels = np.load(second["pseudo_label"].artifacts["pseudo_labels"])
    assert labels.max() == 4

    # Without a PseudoLabeler the stage has nothing to do: a clear error naming the key.
    bare = labels_run(tmp_path / "c", data_cache, cache, f"~{PSEUDO}")
    with pytest.raises(ValueError, match="pseudo_label.callbacks: a pseudo_label stage needs"):
        Runner(bare).run()
