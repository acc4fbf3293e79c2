"""Finished stages shared between runs: a sweep over finetune settings trains the teacher once.

With ``stage_cache=DIR`` a stage that finished (``done``) is stored in
``DIR/<stage>-<key>/``: ``files/`` (its stage dir, hard-linked where the file system
allows, else copied) and ``record.json`` (its ``pipeline.json`` record, artifact paths
relative to the run dir). ``key`` covers the stage's name, its chained config hash (its own
settings and every earlier stage's) and the code: the version and a digest of distillery's
source files, so uncommitted edits do not reuse results either. A failed or interrupted
stage is never stored.

An entry is written under ``DIR/.tmp/`` and renamed into place, so a reader sees it whole
or not at all. Before a run computes a stage that it could reuse, it takes the entry's
lock (``DIR/<stage>-<key>.lock``, :func:`distillery.pipeline.run_lock.take`): a
concurrent job of the same sweep waits for that stage instead of computing it too, then
reuses it. Only the leading stages of a pipeline (none computed before them in this run)
are reused, and only by runs whose DDP processes Lightning starts itself (they are started
after the lookup and read ``pipeline.json``); ranks started together by ``srun`` or
``torchrun`` compute every stage. Clear the cache with ``rm -r DIR`` while no run uses it
(or remove one ``<stage>-<key>`` entry).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from distillery import artifacts
from distillery.pipeline import run_lock
from distillery.pipeline.manifest import StageRecord, code_version, relative_paths

log = logging.getLogger(__name__)

#: Seconds between looks at an entry another run is computing; a line every minute says so.
POLL_S = 2.0
WAIT_LOG_S = 60.0


@cache
def source_digest() -> str:
    """A digest of distillery's own source files (``*.py`` of the package)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def started_alone() -> bool:
    """Whether this process plans alone: no DDP rank started beside it by srun/torchrun,
    and not a rank Lightning started (those follow ``pipeline.json``)."""
    env = os.environ
    return (
        "LOCAL_RANK" not in env
        and env.get("WORLD_SIZE", "1") == "1"
        and (env.get("SLURM_NTASKS", "1") == "1")
    )


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # our writes replace files (rename), never edit them in place
    except OSError:
        shutil.copy2(src, dst)


class StageCache:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()

    def entry(self, name: str, config_hash: str) -> Path:
        text = json.dumps([name, config_hash, code_version(), source_digest()])
        return self.root / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    @contextlib.contextmanager
    def computing(self, entry: Path) -> Iterator[None]:
        """Hold ``entry``'s lock for the block, waiting while another live run holds it."""
        lock, waited, last_log = entry.with_suffix(".lock"), 0.0, -WAIT_LOG_S
        while (holder := run_lock.take(lock)) is not None:
            if waited - last_log >= WAIT_LOG_S:
                log.info(
                    "stage cache: %s is being computed by another run (%s); waiting "
                    "(if that run is gone, delete %s)",
                    entry.name, run_lock.describe(holder), lock,
                )  # fmt: skip
                last_log = waited
            time.sleep(POLL_S)
            waited += POLL_S
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()

    def store(self, entry: Path, run_dir: Path, name: str, record: StageRecord) -> None:
        """Copy a ``done`` stage (its stage dir and record) into ``entry``, atomically."""
        if record.status != "done" or entry.exists():
            return
        tmp = self.root / ".tmp" / f"{entry.name}-{uuid.uuid4().hex[:8]}"
        shutil.copytree(run_dir / name, tmp / "files", symlinks=True, copy_function=_link_or_copy)
        stored = dataclasses.asdict(record)
        stored["artifacts"] = relative_paths(record.artifacts, run_dir)
        stored["reused_from"] = stored["reused_from"] or {"run_dir": str(run_dir)}
        artifacts.write_json(tmp / "record.json", stored)
        try:
            tmp.rename(entry)
        except OSError:  # another run stored the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        artifacts.fsync_dir(self.root)
        log.info("stage %s stored in the stage cache: %s", name, entry)

    def restore(self, entry: Path, run_dir: Path, name: str) -> StageRecord:
        """Link or copy ``entry`` into ``run_dir/<name>``; its record."""
        stored = json.loads((entry / "record.json").read_text())
        stage_dir = run_dir / name
        if stage_dir.exists():  # an earlier, unfinished attempt of this run
            shutil.rmtree(stage_dir)
        shutil.copytree(entry / "files", stage_dir, symlinks=True, copy_function=_link_or_copy)
        stored["artifacts"] = {k: str(run_dir / p) for k, p in stored["artifacts"].items()}
        stored["reused_from"] = stored["reused_from"] | {"entry": str(entry)}
        stored["wandb_run_id"] = None  # its W&B run belongs to the run that computed it
        return StageRecord(**stored)
