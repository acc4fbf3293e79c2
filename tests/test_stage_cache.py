"""The stage cache: a finished stage is reused by every run with the same chained config."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import open_dict

from distillery.pipeline.runner import Runner
from tests.helpers import cli_env
from tests.test_cli import distillery
from tests.test_runner import smoke_config, with_probe_stage


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage_files(stage_dir: Path) -> dict[str, str]:
    """Every regular file of a stage dir by relative path -> sha256."""
    return {
        str(p.relative_to(stage_dir)): digest(p)
        for p in sorted(stage_dir.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def probe_run(run_dir: Path, cache: Path, data_cache: Path, *extra: str):
    """finetune -> probe, without the shared evaluation (not what is tested here)."""
    cfg = with_probe_stage(smoke_config(run_dir, data_cache, *extra))
    with open_dict(cfg):
        cfg.stage_cache = str(cache)
        for stage in cfg.pipeline.stages.values():
            stage.evaluate = False
    return cfg


@pytest.mark.slow  # five smoke stages, about 15 s
def test_a_done_stage_is_reused_by_another_run_with_the_same_chained_config(
    tmp_path: Path, data_cache: Path, one_thread: None
) -> None:
    cache = tmp_path / "cache"
    first = Runner(probe_run(tmp_path / "a", cache, data_cache)).run()
    assert first["finetune"].reused_from is None and first["probe"].reused_from is None
    assert len(list(cache.glob("*/record.json"))) == 2

    # Another run that changes only the probe: finetune comes from the cache, the probe trains.
    cfg = probe_run(tmp_path / "b", cache, data_cache)
    cfg.pipeline.stages.probe.module.optimizer.lr = 0.01
    second = Runner(cfg).run()
    reused = second["finetune"]
    assert reused.reused_from["run_dir"] == str(tmp_path / "a")
    assert reused.status == "done" and reused.config_hash == first["finetune"].config_hash
    assert reused.metrics == first["finetune"].metrics
    assert second["probe"].reused_from is None and second["probe"].attempts == 1
    assert stage_files(tmp_path / "b" / "finetune") == stage_files(tmp_path / "a" / "finetune")
    for name, path in reused.artifacts.items():  # in the new run dir, byte-identical
        assert Path(path).is_relative_to(tmp_path / "b")
        assert digest(Path(path)) == digest(Path(first["finetune"].artifacts[name]))
    on_disk = json.loads((tmp_path / "b" / "pipeline.json").read_text())["stages"]["finetune"]
    assert on_disk["reused_from"]["entry"].startswith(str(cache))
    assert on_disk["artifacts"]["encoder"] == "finetune/encoder.pt"
    # The run dir is a normal one: a re-run skips both stages.
    assert [p.action for p in Runner(cfg).plan()] == ["skip", "skip"]

    # A change of the first stage changes every chained hash: nothing is reused.
    changed = probe_run(
        tmp_path / "c", cache, data_cache, "pipeline.stages.finetune.module.optimizer.lr=0.01"
    )
    third = Runner(changed).run()
    assert third["finetune"].reused_from is None and third["probe"].reused_from is None


def test_a_failed_stage_is_never_stored(tmp_path: Path, data_cache: Path, one_thread: None) -> None:
    cache = tmp_path / "cache"
    cfg = probe_run(tmp_path / "a", cache, data_cache)
    with open_dict(cfg):
        cfg.pipeline.stages.probe.callbacks["fail"] = {
            "_target_": "tests.helpers.FailOnceAtEpoch",
            "epoch": 0,
            "marker": str(tmp_path / "failed"),
        }
    with pytest.raises(RuntimeError, match="injected failure"):
        Runner(cfg).run()
    (entry,) = cache.glob("*/record.json")  # finetune's only
    assert json.loads(entry.read_text())["kind"] == "finetune"
    assert entry.parent.name.startswith("finetune-")
    assert not list(cache.glob("*.lock")) and not list((cache / ".tmp").iterdir())


@pytest.mark.slow  # three UnFuSeD smoke runs through the CLI, about a minute
def test_a_sweep_over_finetune_settings_trains_the_teacher_once(
    tmp_path: Path, data_cache: Path
) -> None:
    sweep = tmp_path / "sweep"
    result = distillery(
        "-m",
        "experiment=unfused",
        "debug=smoke",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"stage_cache={tmp_path / 'cache'}",
        "pipeline.stages.finetune.module.optimizer.lr=0.001,0.003,0.01",
        f"hydra.sweep.dir={sweep}",
        cache=data_cache,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [sweep / str(n) for n in range(3)]
    logs = [(job / "distillery.log").read_text() for job in jobs]
    manifests = [json.loads((job / "pipeline.json").read_text())["stages"] for job in jobs]

    # Fits: a stage trains where the runner logs "stage <name> (<kind>): fresh -> ...".
    def fits(stage: str) -> int:
        return sum(log.count(f"stage {stage} ({stage}): fresh ->") for log in logs)

    assert (fits("ssl"), fits("self_distill"), fits("finetune")) == (1, 1, 3)
    for stage in ("ssl", "self_distill"):
        assert manifests[0][stage]["reused_from"] is None
        for job, log, stages in zip(jobs[1:], logs[1:], manifests[1:], strict=True):
            assert f"stage {stage} reused from cache" in log
            assert stages[stage]["reused_from"]["run_dir"] == str(jobs[0])
            # The reused artifacts, byte-identical to the ones the first job computed.
            for name, path in stages[stage]["artifacts"].items():
                original = jobs[0] / manifests[0][stage]["artifacts"][name]
                assert digest(job / path) == digest(original), (stage, name)
    assert all(stages["finetune"]["reused_from"] is None for stages in manifests)
    accuracies = {stages["finetune"]["metrics"]["finetune/val/acc"] for stages in manifests}
    assert len(manifests) == 3 and accuracies  # every trial finetuned and was validated


@pytest.mark.slow  # a second Python process importing torch
def test_a_run_waits_for_an_entry_another_process_is_computing(tmp_path: Path) -> None:
    """The entry lock: a second process that needs the stage waits, then finds it stored."""
    from distillery.pipeline.stage_cache import StageCache

    cache = StageCache(tmp_path / "cache")
    entry = cache.entry("ssl", "0123456789abcdef")
    held = tmp_path / "held"
    holder = (
        "import sys, time, pathlib\n"
        "from distillery.pipeline import run_lock\n"
        "entry, held = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
        "assert run_lock.take(entry.with_suffix('.lock')) is None\n"
        "held.touch(); time.sleep(3)\n"
        "(entry / 'files').mkdir(parents=True); (entry / 'record.json').write_text('{}')\n"
        "entry.with_suffix('.lock').unlink()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder, str(entry), str(held)], env=cli_env())
    try:
        deadline = time.monotonic() + 60
        while not held.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        start = time.monotonic()
        with cache.computing(entry):
            waited = time.monotonic() - start
            assert (entry / "record.json").exists()  # reused, not computed again
        assert waited > 1.5
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
