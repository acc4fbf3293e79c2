"""Waveform encoders in every stage that takes an encoder, and frame-level distillation
losses that ignore the padding of variable-length batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from tests.helpers import FAST, TINY_TRANSFORMER, compose_config
from tests.speech_models import tiny_architecture
from tests.stages.test_coss_kd import coss_only
from tests.test_cli import distillery

from distillery.artifact_kinds import EncoderArtifact
from distillery.data.padding import pad_waveforms
from distillery.losses import coss_loss
from distillery.models.io import build_encoder, load_encoder, save_encoder
from distillery.models.speech import SpeechEncoder
from distillery.pipeline.checkpoints import latest_checkpoint
from distillery.pipeline.contract import ConfigError, validate
from distillery.pipeline.runner import Runner
from distillery.stages.base import encoder_inputs
from distillery.stages.coss_kd import CoSSDistillStage
from distillery.stages.dataset_distill import DatasetDistillStage
from distillery.stages.final_distill import FinalDistillStage
from distillery.stages.prune_distill import PruneDistillStage
from distillery.stages.self_distill import SelfDistillStage
from distillery.stages.ssl import SSLStage

LOGMEL = {"_target_": "distillery.models.encoders.AudioNTT", "n_mels": 16, "channels": 4, "dim": 24}


def speech_config(family: str = "hubert", **kwargs: object) -> dict:
    """A tiny random ``SpeechEncoder`` (2 layers, width 32) as an encoder config."""
    return {
        "_target_": "distillery.models.speech.SpeechEncoder",
        "architecture": tiny_architecture(family),
        **kwargs,
    }


def clips(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=generator) for n in lengths]


def _distill_stage(kind: str) -> FinalDistillStage | PruneDistillStage:
    torch.manual_seed(0)
    if kind == "final_distill":
        return FinalDistillStage(
            teacher=speech_config(),
            student_encoder=speech_config(),  # its own random weights
            distill_layers=[0, 1, 2],
        )
    stage = PruneDistillStage(
        teacher=speech_config(), distill_layers=[0, 1, 2], prune=["heads", "ffn"]
    )
    with torch.no_grad():  # a student that differs from its teacher
        for p in stage.gated.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return stage


@pytest.mark.parametrize("kind", ["final_distill", "prune_distill"])
def test_layer_loss_of_a_padded_batch_is_the_length_weighted_loss_of_its_clips(
    kind: str, one_thread
) -> None:
    """The layer loss is a mean over frames (every layer's L1 and cosine): for a padded
    batch, the mean over the valid frames of all clips, i.e. the per-clip losses weighted
    by their valid frame counts. Padded frames must count for nothing."""
    stage = _distill_stage(kind).eval()
    waves = clips([4000, 2600, 1500])
    batch = pad_waveforms([{"audio": w, "index": i} for i, w in enumerate(waves)])
    with torch.no_grad():
        padded, _ = stage.distill_step(batch)
        alone = [stage.distill_step(pad_waveforms([{"audio": w}]))[0] for w in waves]
    frames = stage.teacher.frame_lengths(batch["length"]).double()
    expected = (torch.stack(alone).double() * frames).sum() / frames.sum()
    torch.testing.assert_close(padded.double(), expected, rtol=0, atol=1e-5)


# -- every stage that takes an encoder --------------------------------------------------------
def test_self_distill_feeds_a_speech_student_waveforms_and_its_exits_ignore_padding(
    one_thread,
) -> None:
    """The exits of a speech student are its transformer layers pooled over each clip's
    valid frames: a clip's exits and embedding do not depend on its batch, and a
    training step reads ``audio`` and ``length`` (not the batch's log-mel ``features``)."""
    torch.manual_seed(0)
    stage = SelfDistillStage(encoder=speech_config(), num_pseudo_classes=3, head_hidden_dim=8)
    assert len(stage.exit_heads) == 2  # one per transformer layer
    waves = clips([4000, 2600, 1500])
    batch = pad_waveforms(
        [{"audio": w, "pseudo_label": i % 3, "index": i} for i, w in enumerate(waves)]
    )
    encoder = stage.encoder.eval()
    with torch.no_grad():
        exits, embedding = encoder.forward_exits(*encoder_inputs(encoder, batch))
        for i, w in enumerate(waves):
            alone, alone_embedding = encoder.forward_exits(w[None], torch.tensor([len(w)]))
            for a, b in zip(alone, exits, strict=True):
                torch.testing.assert_close(a[0], b[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(alone_embedding[0], embedding[i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exits[-1], embedding)  # the last exit is the embedded layer
    loss = stage.train().training_step(batch | {"features": torch.zeros(3, 1, 8, 8)}, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(
        p.grad is not None for p in stage.encoder.model.encoder.transformer.parameters()
    )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # a step without a Trainer
@pytest.mark.parametrize("speech", ["teacher", "student"])
def test_coss_kd_feeds_each_encoder_what_it_declares(speech: str, tmp_path: Path) -> None:
    """A speech teacher distilled into a log-mel student, and a log-mel teacher into a
    speech student: each reads its own input, the speech one with lengths."""
    torch.manual_seed(0)
    speech_cfg = speech_config()
    teacher_cfg = speech_cfg if speech == "teacher" else LOGMEL
    teacher_path = tmp_path / "teacher.pt"
    save_encoder(teacher_path, build_encoder(teacher_cfg).eval(), teacher_cfg)
    stage = CoSSDistillStage(
        encoder=LOGMEL if speech == "teacher" else speech_cfg,
        teacher=EncoderArtifact.load(teacher_path),
        batches="random",
    ).eval()
    waves = clips([4000, 2600, 1500, 3000])
    batch = pad_waveforms([{"audio": w, "index": i} for i, w in enumerate(waves)])
    batch["features"] = torch.randn(4, 1, 16, 20)
    with torch.no_grad():
        loss = stage._step(batch, "val")
        teacher = stage.teacher(*encoder_inputs(stage.teacher, batch))
        student = stage.projection(stage.encoder(*encoder_inputs(stage.encoder, batch)))
    # The step's loss is that of the embeddings with lengths, which differ from those
    # of the padded waveforms taken whole (the speech side pools valid frames only).
    speech_side = stage.teacher if speech == "teacher" else stage.encoder
    with torch.no_grad():
        unmasked = speech_side(batch["audio"])
        masked = speech_side(batch["audio"], batch["length"])
    assert (unmasked - masked)[1:].abs().max() > 1e-3
    torch.testing.assert_close(loss, coss_loss(student, teacher)[0])


@pytest.mark.slow  # ~25 s: two stages, pseudo-labels, evaluation
def test_a_waveform_student_self_distils_on_pseudo_labels_through_the_runner(
    tmp_path: Path, data_cache: Path
) -> None:
    """``self_distill`` with a speech student: its exits are its transformer layers (pooled
    over valid frames), fed waveforms and lengths; the labels come from a speech teacher."""
    cfg = compose_config(
        [
            "experiment=hubert_pseudo_labels",
            *FAST,
            f"run_dir={tmp_path / 'run'}",
            f"data.cache_dir={data_cache}",
            "pipeline.stages.teacher.callbacks.pseudo_labeler.k=4",
            "pipeline.stages.self_distill.module.head_hidden_dim=16",
            "eval.plots=false",
            "eval.probe_epochs=2",
        ]
    )
    with open_dict(cfg):
        cfg.pipeline.stages.teacher.module.encoder = speech_config(embedding_layer=1)
        cfg.pipeline.stages.self_distill.module.encoder = speech_config("wavlm")
    validate(cfg)  # the contract accepts a speech encoder as a multi-exit student
    stages = Runner(cfg).run()
    assert [s.status for s in stages.values()] == ["done", "done"]
    checkpoint = latest_checkpoint(tmp_path / "run" / "self_distill")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    # One exit head per transformer layer of the student (2).
    assert {k.split(".")[1] for k in state if k.startswith("exit_heads.")} == {"0", "1"}
    assert "self_distill/eval/knn10_acc" in stages["self_distill"].metrics
    student, config = load_encoder(tmp_path / "run" / "self_distill" / "encoder.pt")
    assert isinstance(student, SpeechEncoder) and config["architecture"]["family"] == "wavlm"


@pytest.mark.slow  # ~20 s: a kNN-batch CoSS stage and its evaluation
def test_coss_kd_distils_a_speech_teacher_on_knn_batches_through_the_runner(
    tmp_path: Path, data_cache: Path
) -> None:
    """The teacher's neighbours (shared embedding, waveforms with lengths) and the step."""
    teacher_cfg = speech_config()
    torch.manual_seed(0)
    save_encoder(tmp_path / "teacher.pt", build_encoder(teacher_cfg).eval(), teacher_cfg)
    cfg = coss_only(tmp_path, data_cache, tmp_path / "teacher.pt")
    validate(cfg)
    record = Runner(cfg).run()["coss"]
    assert record.status == "done"
    assert record.metrics["coss/eval/embed_dim"] == 24  # the log-mel student
    assert 0 < record.metrics["coss/train/loss_epoch"] < 4


def test_the_contract_refuses_a_waveform_encoder_for_ssl_and_accepts_it_elsewhere(
    tmp_path: Path, data_cache: Path
) -> None:
    """At start-up, before anything trains: ``ssl``'s augmentations are log-mel only, so a
    speech encoder there is refused naming its key and why; as a multi-exit
    ``self_distill`` student or a ``coss_kd`` student it passes."""
    overrides = ["experiment=coss", f"run_dir={tmp_path / 'run'}", f"data.cache_dir={data_cache}"]
    cfg = compose_config(overrides)
    with open_dict(cfg):
        cfg.pipeline.stages.ssl.module.encoder = speech_config()
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    assert (
        "pipeline.stages.ssl.module.encoder: SpeechEncoder reads 'audio' (its input_key), "
        "which SSLStage cannot feed it: its views are BYOL-A augmentations"
    ) in str(refused.value)
    cfg = compose_config(overrides)
    with open_dict(cfg):
        cfg.pipeline.stages.coss.module.encoder = speech_config()
    validate(cfg)
    cfg = compose_config(["experiment=hubert_pseudo_labels", *overrides[1:]])
    with open_dict(cfg):
        cfg.pipeline.stages.self_distill.module.encoder = speech_config()
    validate(cfg)
    with pytest.raises(ValueError, match="module.encoder: SpeechEncoder reads 'audio'"):
        SSLStage(encoder=speech_config())


class WaveformTeacherWithoutMask(torch.nn.Module):
    """A user's waveform teacher: hidden states of waveforms, but no ``frame_mask``."""

    input_key = "audio"
    embed_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(1, self.embed_dim, kernel_size=400, stride=320)

    def forward_hidden_states(self, audio: torch.Tensor, lengths=None) -> list[torch.Tensor]:
        frames = self.conv(audio[:, None]).transpose(1, 2)
        return [frames, frames]


def test_a_waveform_teacher_without_frame_mask_is_refused_at_start_up(
    tmp_path: Path, data_cache: Path
) -> None:
    """The layer loss of a padded waveform batch averages over the teacher's
    ``frame_mask(lengths, T)``: a waveform teacher without one fails before training,
    naming the key (both stages, as the recipe's final teacher is the prune teacher)."""
    target = f"{__name__}.WaveformTeacherWithoutMask"
    cfg = compose_config(
        [
            "experiment=dphubert_hubert",
            f"run_dir={tmp_path / 'run'}",
            f"data.cache_dir={data_cache}",
        ]
    )
    with open_dict(cfg):
        cfg.pipeline.stages.prune_distill.module.teacher = {"_target_": target}
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    for stage, cls in (
        ("prune_distill", "PruneDistillStage"),
        ("final_distill", "FinalDistillStage"),
    ):
        assert (
            f"pipeline.stages.{stage}.module.teacher: WaveformTeacherWithoutMask lacks "
            f"frame_mask, which {cls} needs (required of an encoder reading 'audio': frame_mask)"
        ) in str(refused.value)
    with pytest.raises(
        ValueError, match="module.teacher: WaveformTeacherWithoutMask lacks frame_mask"
    ):
        FinalDistillStage(teacher={"_target_": target}, student_encoder=speech_config())
    # A log-mel teacher needs none (its frames are never padded), a speech encoder has one.
    FinalDistillStage(teacher=TINY_TRANSFORMER, student_encoder=TINY_TRANSFORMER)


def test_the_log_mel_dataset_distillation_stages_refuse_a_waveform_encoder(
    tmp_path: Path, data_cache: Path
) -> None:
    """KRR-ST learns log-mel inputs: its pool encoder, its pretrained encoder and its
    teacher must read log-mel (the teacher, an artifact file, when the stage is built)."""
    overrides = ["experiment=krr_st", f"run_dir={tmp_path / 'run'}", f"data.cache_dir={data_cache}"]
    cfg = compose_config(overrides)
    with open_dict(cfg):
        cfg.pipeline.stages.dataset_distill.module.encoder = speech_config()
        cfg.pipeline.stages.pretrain_synthetic.module.encoder = speech_config()
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    for stage, cls in (
        ("dataset_distill", "DatasetDistillStage"),
        ("pretrain_synthetic", "PretrainSyntheticStage"),
    ):
        assert (
            f"pipeline.stages.{stage}.module.encoder: SpeechEncoder reads 'audio' (its "
            f"input_key), which {cls} cannot feed it"
        ) in str(refused.value)
    validate(compose_config(overrides))  # the recipe's own log-mel encoders pass
    teacher_cfg = speech_config()
    save_encoder(tmp_path / "teacher.pt", build_encoder(teacher_cfg), teacher_cfg)
    with pytest.raises(ValueError, match="module.teacher: SpeechEncoder reads 'audio'"):
        DatasetDistillStage(encoder=LOGMEL, teacher=EncoderArtifact.load(tmp_path / "teacher.pt"))


@pytest.mark.slow  # ~10 s: a CLI process
def test_the_cli_refuses_a_speech_encoder_for_ssl_with_exit_2(
    tmp_path: Path, data_cache: Path
) -> None:
    result = distillery(
        "experiment=coss",
        "model@pipeline.stages.ssl.module.encoder=hubert_base",
        f"run_dir={tmp_path / 'run'}",
        cache=data_cache,
    )
    assert result.returncode == 2
    assert "pipeline.stages.ssl.module.encoder: SpeechEncoder reads 'audio'" in result.stdout
    assert not (tmp_path / "run" / "pipeline.json").exists()


@pytest.mark.ddp
@pytest.mark.slow  # 30-100 s each: two processes, four stages
@pytest.mark.parametrize("layout", ["below_last_layer", "large"])
def test_a_speech_encoder_trains_under_ddp_although_forward_skips_some_parameters(
    tmp_path: Path, layout: str
) -> None:
    """2 processes (gloo), ``finetune``, ``self_distill``, a ``coss_kd`` student and a
    ``final_distill`` student: the layers above ``embedding_layer`` (which the hidden states
    of ``final_distill`` do use) and the Large layout's final LayerNorm get no gradient; each
    stage freezes them (DDP would reject them at the second step), trains everything else,
    and both ranks end with the same weights."""
    from tests.helpers import spawn_two_ranks
    from tests.stages.speech_ddp_worker import KINDS, STEPS, fit_worker

    spawn_two_ranks(fit_worker, layout, str(tmp_path))
    for kind in KINDS:
        rank0, rank1 = (torch.load(tmp_path / f"{kind}-rank{r}.pt") for r in (0, 1))
        assert rank0["steps"] == rank1["steps"] == STEPS, kind
        for name, value in rank0["final"].items():
            torch.testing.assert_close(value, rank1["final"][name], msg=f"{kind}: {name}")
        trained = rank0["trained"]
        if layout == "large":
            assert not [n for n in trained if "transformer.layer_norm." in n], kind
        else:  # layer 1 of 2: above embedding_layer, but one of final_distill's states
            layer1 = [n for n in trained if "transformer.layers.1." in n]
            assert bool(layer1) == (kind == "final_distill"), kind
        assert any("transformer.layers.0.attention.k_proj.weight" in n for n in trained), kind
        for name in trained:  # every trainable parameter got gradients: none kept its value
            assert not torch.equal(rank0["final"][name], rank0["initial"][name]), (kind, name)
