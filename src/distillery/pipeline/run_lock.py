"""One run dir, one writer: ``run_dir/.lock`` names the run that writes there.

Two runs on one run dir would move each other's stages aside and interleave
``pipeline.json``. The first process of a run (rank 0) creates the lock file atomically with
its host, pid, start time and SLURM job; another run finds it and is refused with that
message. A lock whose holder is gone is taken over: same host and its pid no longer runs
this process, or the same SLURM job (a requeued job restarts, possibly on another node).
:func:`take` is the same lock on any file (the stage cache locks its entries with it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from distillery.pipeline.manifest import RunDirError, now_iso

LOCK_NAME = ".lock"


class RunDirLocked(RunDirError):
    """Another live run holds the run dir."""


def _process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), None if no such process: a pid
    reused by another program after the holder died does not look alive."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), after "pid (comm)"


def _this_process() -> dict[str, str | int | None]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "started_at": now_iso(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def _is_stale(holder: dict) -> bool:
    me = _this_process()
    if holder.get("slurm_job_id") and holder["slurm_job_id"] == me["slurm_job_id"]:
        return True  # an earlier run of this (requeued) job
    if holder.get("host") != me["host"]:
        return False  # cannot see another host's processes
    alive = _process_start(int(holder.get("pid", -1)))
    return alive is None or alive != holder.get("process_start")


def take(path: Path) -> dict | None:
    """Create the lock file ``path`` for this process, taking over a stale one.

    Returns None once this process holds it, or the record of the live process that does.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a stale lock removed, then created again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                holder = {}  # being written right now, or removed: look again
            if holder and not _is_stale(holder):
                return holder
            if holder:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(_this_process(), f)
        return None
    raise RunDirLocked(f"could not take the lock {path}; try again")


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')}{job}, "
        f"started {holder.get('started_at')}"
    )


def acquire(run_dir: Path) -> Path:
    """Create ``run_dir/.lock`` for this process, taking over a stale one.

    Raises :class:`RunDirLocked` naming the holder when another live run has it.
    """
    path = Path(run_dir) / LOCK_NAME
    if (holder := take(path)) is not None:
        raise RunDirLocked(
            f"run_dir {run_dir} is in use by another run ({describe(holder)}): wait "
            f"for it to finish or choose another run_dir; if that run is gone, delete {path}"
        )
    return path


@contextlib.contextmanager
def hold(run_dir: Path, *, writer: bool) -> Iterator[None]:
    """Hold the run dir's lock for the block (``writer``: rank 0; other ranks take none)."""
    if not writer:
        yield
        return
    path = acquire(run_dir)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
