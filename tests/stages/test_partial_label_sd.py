"""Stage ``partial_label_sd``: every round trained on cached features, selected on val."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, open_dict
from tests.helpers import FAST, compose_config

from distillery.artifact_kinds import Tensors
from distillery.data.datamodule import AudioDataModule
from distillery.data.label_noise import add_label_noise
from distillery.eval.embed import embed
from distillery.models.encoders import AudioNTT
from distillery.models.io import build_encoder, load_encoder, save_encoder
from distillery.pipeline.runner import Runner

ENCODER = {
    "_target_": "distillery.models.encoders.AudioNTT",
    "n_mels": 64,
    "channels": 8,
    "dim": 32,
}


def pll_only(tmp_path: Path, cache: Path, encoder: Path, *extra: str) -> DictConfig:
    """``experiment=pll`` without its SSL stage: the probes read a saved encoder."""
    cfg = compose_config(
        [
            "experiment=pll",
            *FAST,
            f"run_dir={tmp_path / 'run'}",
            f"data.cache_dir={cache}",
            f"pipeline.stages.pll.module.pretrained={encoder}",
            "debug.trainer.limit_train_batches=1.0",  # every pass of every round, on smoke data
            *extra,
        ]
    )
    with open_dict(cfg):
        del cfg.pipeline.stages["ssl"]
        cfg.pipeline.order = ["pll"]
        cfg.pipeline.stages.pll.inputs = {}
    return cfg


@pytest.fixture
def encoder_path(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "encoder.pt"
    save_encoder(path, AudioNTT(n_mels=64, channels=8, dim=32).eval(), ENCODER)
    return path


def test_rounds_noise_and_selection_on_the_validation_split(
    tmp_path: Path, data_cache: Path, encoder_path: Path
) -> None:
    cfg = pll_only(
        tmp_path,
        data_cache,
        encoder_path,
        "pipeline.stages.pll.module.noise_rate=0.5",
        "pipeline.stages.pll.module.rounds=2",
        "pipeline.stages.pll.module.epochs=20",
        "seed=3",
    )
    record = Runner(cfg).run()["pll"]
    assert record.status == "done"
    m = record.metrics
    heads = ["ce", "sd1", "sd2", "pll"]
    for name in heads:
        assert 0.0 <= m[f"pll/test/acc_{name}"] <= 1.0
        assert 0 <= m[f"pll/val/best_epoch_{name}"] < 20
    assert m["pll/train/teacher_top2_clean"] >= m["pll/train/teacher_top1_clean"]

    # The same noise as the generator gives for the stage's seed, and its realised rate.
    data = AudioDataModule(cfg.data)
    data.setup()
    encoder, _ = load_encoder(encoder_path)
    splits = {s: embed(encoder, data.dataloader(s), data.featurize) for s in ("train", "val")}
    train_labels, val_labels = splits["train"][2], splits["val"][2]
    expected = add_label_noise(train_labels, "symmetric", 0.5, 4, seed=3)
    payload = torch.load(record.artifacts["heads"], weights_only=False)
    assert np.array_equal(payload["noisy_train_labels"].numpy(), expected.labels)
    assert m["pll/train/noise_realised_rate"] == pytest.approx(expected.realised_rate)
    assert m["pll/train/noisy_label_acc"] == pytest.approx(1 - expected.realised_rate)

    # Every kept head's recorded val accuracy is its accuracy on the noisy *validation* labels.
    noisy_val = add_label_noise(val_labels, "symmetric", 0.5, 4, seed=4).labels
    x_val = (torch.from_numpy(splits["val"][1]) - payload["feature_mean"]) / payload["feature_std"]
    for name in heads:
        head = torch.nn.Linear(32, 4, bias=False)
        head.load_state_dict(payload["heads"][name])
        acc = (head(x_val).argmax(1).numpy() == noisy_val).mean()
        assert m[f"pll/val/acc_{name}"] == pytest.approx(acc), name
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["stages"]["pll"][
        "artifacts"
    ]["heads"]


def test_clean_labels_and_a_separable_encoder_learn(
    tmp_path: Path, data_cache: Path, encoder_path: Path
) -> None:
    # Random conv features of 4 sound kinds are linearly separable enough to beat chance
    # (0.25) clearly without noise; with a fresh PLL head the candidates alone train it.
    cfg = pll_only(
        tmp_path,
        data_cache,
        encoder_path,
        "pipeline.stages.pll.module.noise_rate=0.0",
        "pipeline.stages.pll.module.rounds=1",
        "pipeline.stages.pll.module.epochs=100",
        "pipeline.stages.pll.module.pll_init=fresh",
        "pipeline.stages.pll.module.pll_loss=gce",
    )
    m = Runner(cfg).run()["pll"].metrics
    assert m["pll/train/noise_realised_rate"] == 0.0
    assert m["pll/test/acc_ce"] >= 0.5 and m["pll/test/acc_pll"] >= 0.5, m
    assert m["pll/test/teacher_top2_acc"] >= m["pll/test/acc_ce"]


def test_ranges_are_checked_at_start_up(tmp_path: Path) -> None:
    from distillery.pipeline.contract import ConfigError, validate

    cfg = compose_config(
        [
            "experiment=pll",
            f"run_dir={tmp_path}",
            "pipeline.stages.pll.module.noise_rate=1.0",
            "pipeline.stages.pll.module.rounds=0",
            "pipeline.stages.pll.module.gce_q=0",
        ]
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "pipeline.stages.pll.module.noise_rate: 1.0 is outside the allowed range [0, 1)" in str(
        err.value
    )
    assert "pipeline.stages.pll.module.rounds: 0 is outside the allowed range [1, inf)" in str(
        err.value
    )
    assert "pipeline.stages.pll.module.gce_q: 0 is outside the allowed range (0, 1]" in str(
        err.value
    )
    clustered = [
        "experiment=pll",
        f"run_dir={tmp_path}",
        "pipeline.stages.pll.module.noise_kind=clustered",
    ]
    with pytest.raises(ConfigError, match="noise_clusters: required with"):
        validate(compose_config(clustered))
    names = "[[tone_low,tone_high],[chirp_up,chirp_down]]"
    validate(compose_config([*clustered, f"pipeline.stages.pll.module.noise_clusters={names}"]))


@pytest.mark.slow
def test_pll_experiment_smoke(tmp_path: Path, data_cache: Path) -> None:
    cfg = compose_config(
        ["experiment=pll", *FAST, f"run_dir={tmp_path}", f"data.cache_dir={data_cache}"]
    )
    stages = Runner(cfg).run()
    assert [s.status for s in stages.values()] == ["done", "done"]
    assert (
        "pll/test/acc_pll" in stages["pll"].metrics
        and "ssl/eval/knn10_acc" in stages["ssl"].metrics
    )


def test_clustered_noise_by_class_name(
    tmp_path: Path, data_cache: Path, encoder_path: Path
) -> None:
    # Smoke data: 4 classes, 8 training clips each; only the two tones may swap labels.
    cfg = pll_only(
        tmp_path,
        data_cache,
        encoder_path,
        "pipeline.stages.pll.module.noise_kind=clustered",
        "pipeline.stages.pll.module.noise_rate=0.5",
        "pipeline.stages.pll.module.noise_clusters=[[tone_low,tone_high],[chirp_up]]",
        "pipeline.stages.pll.module.rounds=1",
        "pipeline.stages.pll.module.epochs=2",
    )
    record = Runner(cfg).run()["pll"]
    assert record.metrics["pll/train/noise_realised_rate"] == pytest.approx(0.25)
    noisy = torch.load(record.artifacts["heads"], weights_only=False)["noisy_train_labels"]
    data = AudioDataModule(cfg.data)
    data.setup()
    clean = torch.from_numpy(data.table.true_labels[data.table.indices("train")])
    moved = noisy != clean
    tones = {data.class_names.index("tone_low"), data.class_names.index("tone_high")}
    assert set(clean[moved].tolist()) == tones and set(noisy[moved].tolist()) == tones


def test_the_teacher_head_equals_a_plain_training_loop(
    tmp_path: Path, data_cache: Path, encoder_path: Path, one_thread: None
) -> None:
    """The Lightning loop (one epoch per round, a pass per ``epochs``) trains the CE head
    exactly as the method's loop: seeded head and shuffles, SGD, lr decay per pass, the
    best noisy-validation pass kept."""
    cfg = pll_only(
        tmp_path,
        data_cache,
        encoder_path,
        "pipeline.stages.pll.module.noise_rate=0.4",
        "pipeline.stages.pll.module.rounds=1",
        "pipeline.stages.pll.module.epochs=6",
        "pipeline.stages.pll.module.batch_size=8",
        "seed=2",
    )
    record = Runner(cfg).run()["pll"]
    trained = torch.load(record.artifacts["heads"], weights_only=True)

    data = AudioDataModule(cfg.data)
    data.setup()
    encoder, _ = load_encoder(encoder_path)
    feats = {}
    for split in ("train", "val"):
        _, x, y = embed(encoder, data.dataloader(split), data.featurize)
        feats[split] = (torch.from_numpy(x[y >= 0]), torch.from_numpy(y[y >= 0]))
    mean, std = feats["train"][0].mean(0), feats["train"][0].std(0).clamp(min=1e-6)
    x, y = (feats["train"][0] - mean) / std, feats["train"][1]
    x_val, y_val = (feats["val"][0] - mean) / std, feats["val"][1]
    y = torch.from_numpy(add_label_noise(y.numpy(), "symmetric", 0.4, 4, seed=2).labels)
    y_val = torch.from_numpy(add_label_noise(y_val.numpy(), "symmetric", 0.4, 4, seed=3).labels)

    torch.manual_seed(2 * 1000)
    head = torch.nn.Linear(32, 4, bias=False)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.98)
    generator = torch.Generator().manual_seed(2 * 1000)
    best = -1.0
    for _ in range(6):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 8):
            batch = order[start : start + 8]
            loss = torch.nn.functional.cross_entropy(head(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        with torch.no_grad():
            acc = (head(x_val).argmax(1) == y_val).float().mean().item()
        if acc > best:
            best, weight = acc, head.weight.detach().clone()
    assert torch.equal(trained["heads"]["ce"]["weight"], weight)
    assert record.metrics["pll/val/acc_ce"] == pytest.approx(best)


@pytest.mark.ddp
@pytest.mark.slow  # ~40 s: 3 pipeline runs' start-up
def test_two_processes_train_the_heads_of_one(
    tmp_path: Path, data_cache: Path, encoder_path: Path
) -> None:
    """Under DDP each round's head trains while the others take no gradient, and the
    stage cannot accumulate: 2 ranks (top-level accumulate_grad_batches=2, which other
    stages would use) train the heads a 1-process run does, one step per batch on each."""
    from tests.helpers import spawn_two_ranks
    from tests.stages.pll_ddp_worker import pll_rank_worker

    extra = [
        "pipeline.stages.pll.module.rounds=1",
        "pipeline.stages.pll.module.epochs=3",
        "++trainer.accumulate_grad_batches=2",
    ]
    one = Runner(pll_only(tmp_path / "one", data_cache, encoder_path, *extra)).run()["pll"]
    spawn_two_ranks(
        pll_rank_worker, str(tmp_path / "two"), str(data_cache), str(encoder_path), extra
    )
    two = json.loads((tmp_path / "two" / "run" / "pipeline.json").read_text())["stages"]["pll"]
    assert two["status"] == "done"
    assert two["optimizer_steps"] == one.optimizer_steps * 2
    heads = [
        Tensors.load(tmp_path / run / "run" / artifacts["heads"]).data["heads"]
        for run, artifacts in (("one", one.artifacts), ("two", two["artifacts"]))
    ]
    assert heads[0].keys() == heads[1].keys() == {"ce", "sd1", "pll"}
    for name, head in heads[0].items():
        torch.testing.assert_close(heads[1][name], head)


def test_probes_a_speech_encoder_on_its_padded_waveforms(tmp_path: Path, data_cache: Path) -> None:
    """A waveform encoder (pooling layer 1 of 2) as the frozen encoder: its features are
    cached by the shared embedding, from waveforms and each clip's valid length, then
    probed as any encoder's (smoke size)."""
    from tests.speech_models import tiny_architecture

    config = {
        "_target_": "distillery.models.speech.SpeechEncoder",
        "architecture": tiny_architecture("hubert"),
        "embedding_layer": 1,
    }
    torch.manual_seed(0)
    path = tmp_path / "speech.pt"
    save_encoder(path, build_encoder(config).eval(), config)
    cfg = pll_only(
        tmp_path,
        data_cache,
        path,
        "pipeline.stages.pll.module.rounds=1",
        "pipeline.stages.pll.module.epochs=2",
    )
    record = Runner(cfg).run()["pll"]
    assert record.status == "done"
    for name in ("ce", "sd1", "pll"):
        assert 0.0 <= record.metrics[f"pll/test/acc_{name}"] <= 1.0
