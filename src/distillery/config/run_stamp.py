"""The default run dir's name, the same on every rank however the ranks were started.

``run_dir: outputs/${run_stamp:%Y-%m-%d_%H-%M-%S}``: one process formats the current time.
Ranks started from outside (``srun``, ``torchrun``) each compose the config themselves, a
few seconds apart, so a time would give each its own directory; they take the launcher's
id of the job instead, which a requeued or restarted job keeps (it then resumes there).
"""

from __future__ import annotations

import os
from datetime import datetime

from omegaconf import OmegaConf


class RunStampError(ValueError):
    """Ranks of this launch have no shared name for a default run dir."""


def run_stamp(pattern: str) -> str:
    """``pattern`` applied to the current time, or the launcher's job id under srun/torchrun."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        if env["TORCHELASTIC_RUN_ID"] in ("", "none"):
            raise RunStampError(
                "run_dir: torchrun without --rdzv-id (or --standalone) gives its ranks no "
                "shared id to name the run dir by; set run_dir=... or pass --rdzv-id"
            )
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    if int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1:
        step = env.get("SLURM_STEP_ID", "0")
        return f"slurm-{env.get('SLURM_JOB_ID', 'job')}.{step}"
    return datetime.now().strftime(pattern)


# Registered on import: a submitit job unpickles the CLI's task function without running main().
OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)
