"""Files loaded from users are data: no shared artifact can run code or build anything but a model."""

from __future__ import annotations

import pathlib
import subprocess
from pathlib import Path

import pytest
import torch

from distillery.models import safe_load
from distillery.models.encoders import AudioNTT
from distillery.models.io import load_encoder, save_encoder
from distillery.models.pruning import load_pruned
from distillery.models.safe_load import UnsafeArtifactError, trust_config_targets
from distillery.pipeline.checkpoints import AtomicCheckpointIO
from distillery.stages.teacher_student import load_teacher
from tests.test_cli import distillery

TINY = {"_target_": "distillery.models.encoders.AudioNTT", "n_mels": 64, "channels": 4, "dim": 16}


class TouchOnUnpickle:
    """A pickle payload: unpickling it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def pickle_bomb(path: Path, marker: Path) -> Path:
    torch.save({"config": TINY, "state_dict": {"w": TouchOnUnpickle(marker)}}, path)
    return path


@pytest.mark.parametrize(
    "load",
    [
        load_encoder,
        load_pruned,
        lambda p: load_teacher(TINY, str(p)),
        lambda p: AtomicCheckpointIO().load_checkpoint(p),
    ],
    ids=["encoder", "pruned", "teacher_weights", "checkpoint"],
)
def test_a_pickle_payload_is_refused_without_running(tmp_path: Path, load) -> None:
    marker = tmp_path / "created-by-the-payload"
    path = pickle_bomb(tmp_path / "evil.pt", marker)
    with pytest.raises(Exception, match="evil.pt|Unsupported global") as err:
        load(path)
    assert not marker.exists()
    assert "weights_only=False" not in str(err.value)  # no advice to run the payload


def test_a_pickle_payload_error_names_the_file_and_the_global(tmp_path: Path) -> None:
    marker = tmp_path / "created-by-the-payload"
    with pytest.raises(UnsafeArtifactError) as err:
        load_encoder(pickle_bomb(tmp_path / "evil.pt", marker))
    assert str(tmp_path / "evil.pt") in str(err.value)
    assert "Unsupported global" in str(err.value)
    assert not marker.exists()


def malicious_targets(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    copy = tmp_path / "copied.txt"
    return {
        "open_for_writing": (
            {"_target_": "builtins.open", "file": str(victim), "mode": "w"},
            "builtins.open",
        ),
        "copyfile": (
            {"_target_": "shutil.copyfile", "src": str(victim), "dst": str(copy)},
            "shutil.copyfile",
        ),
        "nested_in_a_model_builder": (
            {
                "_target_": "distillery.models.pruning.build_pruned",
                "_recursive_": False,
                "base": {"_target_": "builtins.open", "file": str(victim), "mode": "w"},
                "kept": {},
            },
            "builtins.open",
        ),
        # In distillery.models, but a function that writes files, not a model builder.
        "a_distillery_function": (
            {
                "_target_": "distillery.models.io.save_encoder",
                "path": str(copy),
                "encoder": TINY,
                "cfg": {},
            },
            "distillery.models.io.save_encoder",
        ),
    }


@pytest.mark.parametrize(
    "case", ["open_for_writing", "copyfile", "nested_in_a_model_builder", "a_distillery_function"]
)
@pytest.mark.parametrize("loader", [load_encoder, load_pruned])
def test_a_malicious_target_is_refused_naming_file_and_target(
    tmp_path: Path, case: str, loader
) -> None:
    config, target = malicious_targets(tmp_path)[case]
    path = tmp_path / "encoder.pt"
    torch.save({"config": config, "state_dict": {}}, path)
    with pytest.raises(ValueError) as err:
        loader(path)
    if loader is load_pruned and config["_target_"] != "distillery.models.pruning.build_pruned":
        assert "is not a pruned-model artifact" in str(err.value)
    else:
        assert isinstance(err.value, UnsafeArtifactError)
        assert str(path) in str(err.value) and repr(target) in str(err.value)
    assert (tmp_path / "victim.txt").read_text() == "precious"  # not truncated
    assert not (tmp_path / "copied.txt").exists()


def test_models_and_targets_named_by_the_user_still_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(safe_load, "_trusted_targets", set())
    encoder = AudioNTT(n_mels=64, channels=4, dim=16)
    save_encoder(tmp_path / "encoder.pt", encoder, TINY)
    loaded, config = load_encoder(tmp_path / "encoder.pt")
    assert config == TINY
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), encoder.state_dict().values(), strict=True)
    )

    # A user's own encoder class outside distillery: refused until their config names it.
    user_cfg = {"_target_": "torch.nn.Identity"}
    torch.save({"config": user_cfg, "state_dict": {}}, tmp_path / "user.pt")
    with pytest.raises(UnsafeArtifactError, match="'torch.nn.Identity'"):
        load_encoder(tmp_path / "user.pt")
    trust_config_targets({"pipeline": {"stages": {"s": {"module": {"encoder": user_cfg}}}}})
    assert isinstance(load_encoder(tmp_path / "user.pt")[0], torch.nn.Identity)


def test_cli_refuses_a_malicious_pretrained_encoder(tmp_path: Path, data_cache: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    evil = tmp_path / "shared" / "encoder.pt"
    evil.parent.mkdir()
    torch.save(
        {
            "config": {"_target_": "builtins.open", "file": str(victim), "mode": "w"},
            "state_dict": {},
        },
        evil,
    )
    result: subprocess.CompletedProcess = distillery(
        "experiment=supervised",
        "debug=smoke",
        "logger=csv",
        f"run_dir={tmp_path / 'run'}",
        f"pipeline.stages.finetune.module.pretrained={evil}",
        cache=data_cache,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"{evil}: refusing to instantiate _target_ 'builtins.open'" in result.stdout + result.stderr
    )
    assert "Traceback" not in result.stderr
    assert victim.read_text() == "precious"
