"""The wheel is self-contained: installed into a fresh venv, it runs a pipeline anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*cmd: str | Path, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (cmd, result.stdout[-2000:], result.stderr[-4000:])
    return result


def test_wheel_in_a_fresh_venv_runs_the_smoke_pipeline_outside_the_checkout(
    tmp_path: Path, data_cache: Path
) -> None:
    wheels = tmp_path / "wheels"
    # Offline: the build tools are in the dev environment (no build isolation).
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "-q", "-w", wheels, REPO, timeout=300)  # fmt: skip
    (wheel,) = wheels.glob("distillery-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "distillery/conf/config.yaml" in names
    assert "distillery/conf/experiment/supervised.yaml" in names

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        ).stdout.strip()
    )
    # The dependencies come from this environment (nothing to download); distillery itself
    # only from the wheel: this environment's editable install is not on the new path.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        "-q", wheel, timeout=300)  # fmt: skip

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"WANDB_MODE": "offline"}
    where = run(python, "-c", "import distillery; print(distillery.__file__)", cwd=outside, env=env)
    assert where.stdout.strip().startswith(str(site)), where.stdout
    run_dir = outside / "run"
    run(venv / "bin" / "distillery", "experiment=supervised", "debug=smoke", "logger=csv",
        f"run_dir={run_dir}", f"data.cache_dir={data_cache}", cwd=outside, env=env,
        timeout=600)  # fmt: skip
    manifest = json.loads((run_dir / "pipeline.json").read_text())
    assert manifest["stages"]["finetune"]["status"] == "done"
