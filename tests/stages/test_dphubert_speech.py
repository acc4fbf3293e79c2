"""The DPHuBERT recipes on HuBERT, wav2vec 2.0 and WavLM, from Hugging Face directories:
prune, final-distil, export, reload without distillery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.helpers import FAST, compose_config
from tests.models.test_standalone import run_without_distillery
from tests.speech_models import hf_model, tiny_architecture, write_huggingface
from tests.test_cli import distillery

from distillery.models import load_pruned
from distillery.models.encoders import count_parameters
from distillery.pipeline.contract import ConfigError, validate
from distillery.pipeline.runner import Runner
from distillery.stages.teacher_student import load_teacher

TEACHER = "pipeline.stages.prune_distill.module.teacher"


def recipe(family: str, weights: Path, run_dir: Path) -> list[str]:
    """``experiment=dphubert_<family>`` on the tiny model in ``weights``, a few steps."""
    return [
        f"experiment=dphubert_{family}",
        *FAST,
        f"run_dir={run_dir}",
        f"{TEACHER}.weights={weights}",
        f"{TEACHER}.arch=null",  # take the file's (tiny) architecture, not the preset's
        "pipeline.stages.prune_distill.module.distill_layers=[0,1,2]",
        "pipeline.stages.final_distill.module.distill_layers=[0,1,2]",
        "data.batch_size=4",
        "debug.trainer.limit_train_batches=2",
        "debug.trainer.limit_val_batches=1",
        "eval.plots=false",
        "eval.probe_epochs=2",
    ]


def check_outputs(run_dir: Path, teacher_params: int) -> None:
    """The final pruned encoder: smaller than the teacher, and its exported program,
    loaded without distillery, computes what the artifact does."""
    manifest = json.loads((run_dir / "pipeline.json").read_text())
    assert [s["status"] for s in manifest["stages"].values()] == ["done", "done"]
    summary = json.loads((run_dir / "prune_distill" / "pruning.json").read_text())
    assert summary["teacher_params"] == teacher_params
    final = load_pruned(run_dir / "final_distill" / "encoder.pt").eval()
    assert count_parameters(final) == summary["pruned_params"] < teacher_params
    inputs = [(torch.randn(2, 6000), torch.tensor([6000, 4500]))]
    [(embedding, states)] = run_without_distillery(run_dir / "final_distill" / "standalone", inputs)
    with torch.no_grad():
        torch.testing.assert_close(embedding, final(*inputs[0]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            states, torch.stack(final.forward_hidden_states(*inputs[0])), rtol=1e-5, atol=1e-5
        )


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n != "masked_spec_embed")


@pytest.mark.slow  # ~1.5 min: two CLI runs, two stages, two torch.export runs
def test_hubert_recipe_runs_from_an_hf_directory_on_the_command_line(
    tmp_path: Path, data_cache: Path
) -> None:
    missing = distillery(
        *recipe("hubert", tmp_path / "nowhere", tmp_path / "run"), cache=data_cache
    )
    assert missing.returncode == 2 and "nowhere: no such file or directory" in missing.stdout
    assert not (tmp_path / "run" / "pipeline.json").exists()
    model = hf_model("hubert")
    weights = write_huggingface(model, tmp_path / "hubert-hf")
    result = distillery(*recipe("hubert", weights, tmp_path / "run"), cache=data_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    check_outputs(tmp_path / "run", _params(model))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["wav2vec2", "wavlm"])
def test_wav2vec2_and_wavlm_recipes_prune_export_and_reload(
    tmp_path: Path, data_cache: Path, family: str
) -> None:
    model = hf_model(family)
    weights = write_huggingface(model, tmp_path / f"{family}-hf")
    cfg = compose_config(
        [*recipe(family, weights, tmp_path / "run"), f"data.cache_dir={data_cache}"]
    )
    Runner(cfg).run()
    check_outputs(tmp_path / "run", _params(model))


def test_missing_or_mismatched_weights_fail_at_start_up(tmp_path: Path, data_cache: Path) -> None:
    cfg = compose_config(recipe("hubert", tmp_path / "nowhere", tmp_path / "run"))
    with pytest.raises(ConfigError, match=rf"{TEACHER}.weights: weights .*nowhere: no such file"):
        validate(cfg)
    weights = write_huggingface(hf_model("wavlm"), tmp_path / "wavlm-hf")
    cfg = compose_config(
        [*recipe("hubert", weights, tmp_path / "run"), f"{TEACHER}.arch=hubert_base"]
    )
    with pytest.raises(ConfigError, match=r"wavlm-hf: its architecture is not hubert_base"):
        validate(cfg)


def test_teacher_weights_take_any_speech_format(tmp_path: Path, one_thread) -> None:
    """``teacher_weights`` pointing at a Hugging Face directory loads it (format detected)."""
    reference = hf_model("wav2vec2")
    weights = write_huggingface(reference, tmp_path / "w2v-hf")
    encoder = {
        "_target_": "distillery.models.speech.SpeechEncoder",
        "architecture": tiny_architecture("wav2vec2"),
    }
    teacher = load_teacher(encoder, str(weights))
    audio = torch.randn(1, 3000)
    with torch.no_grad():
        expected = reference(audio).last_hidden_state
        torch.testing.assert_close(
            teacher.forward_hidden_states(audio)[-1], expected, rtol=1e-4, atol=1e-4
        )
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
