"""The one-node SLURM cluster of ``tests/cluster/slurm.sh``: tests marked ``cluster`` run on
it and are skipped, saying why, when it is not up."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

DEFAULT_CONF = "/tmp/distillery-slurm/slurm.conf"


@pytest.fixture(scope="session")
def slurm() -> dict[str, str]:
    """The environment for SLURM commands (``SLURM_CONF``)."""
    if shutil.which("sinfo") is None:
        pytest.skip("sinfo not found: `tests/cluster/slurm.sh install`, then `make test-cluster`")
    env = os.environ | {"SLURM_CONF": os.environ.get("SLURM_CONF", DEFAULT_CONF)}
    state = subprocess.run(
        ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30
    )
    if state.returncode != 0 or not state.stdout.strip():
        pytest.skip(
            f"no SLURM cluster answers ({env['SLURM_CONF']}): `make test-cluster` starts one"
        )
    return env
