"""``run_dir/pipeline.json``: what each stage did, so a re-run knows what to skip or resume."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distillery import __version__, artifacts

MANIFEST_NAME = "pipeline.json"
STATUSES = ("pending", "running", "done", "failed", "interrupted")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunDirError(ValueError):
    """The run dir holds results this run must not mix with its own."""


#: Set by the first process of a job: DDP children (which inherit the environment) report
#: the launcher's code version even if the checkout changes while the job runs.
CODE_VERSION_ENV = "DISTILLERY_CODE_VERSION"


def code_version() -> str:
    """``<version>+g<commit>`` when the package runs from a git checkout, else the version.

    Uncommitted edits do not change it: it names the code a result came from closely
    enough to notice a checkout moved, without flagging every edit while developing.
    """
    if version := os.environ.get(CODE_VERSION_ENV):
        return version
    source = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        version = f"{__version__}+g{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        version = __version__
    os.environ[CODE_VERSION_ENV] = version
    return version


def _import_paths(node: Any) -> list[str]:
    """Every ``_target_`` in a config tree, and dotted strings given as such (a stage class)."""
    if isinstance(node, dict):
        found = [str(node["_target_"])] if "_target_" in node else []
        return found + [
            p for key, value in node.items() if key != "_target_" for p in _import_paths(value)
        ]
    if isinstance(node, list):
        return [p for value in node for p in _import_paths(value)]
    return []


def _defining_module(target: str) -> tuple[str, Path] | None:
    """The module (name, source file) that defines ``target`` (``pkg.mod.Name``), if any."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            module = sys.modules.get(name) or importlib.import_module(name)
        except Exception:  # noqa: BLE001 - not a module at this depth; try the parent
            continue
        source = getattr(module, "__file__", None)
        return (name, Path(source)) if source else None
    return None


def source_hashes(nodes: list[Any]) -> dict[str, str]:
    """``{module: sha256 prefix of its file}`` for the user code that ``nodes`` name.

    ``nodes`` are config trees (their ``_target_`` values count) and plain import paths.
    distillery's own code is tracked as a whole by :func:`code_version`, installed
    packages by their versions; a user's plugin modules are hashed file by file, so
    editing one changes the config hash of every stage that names it.
    """
    targets = [n for n in nodes if isinstance(n, str) and "." in n]
    targets += [t for n in nodes if not isinstance(n, str) for t in _import_paths(n)]
    hashes = {}
    for target in targets:
        found = _defining_module(target)
        if found is None or found[0].split(".")[0] == "distillery":
            continue
        name, path = found
        installed = {"site-packages", "dist-packages"} & set(path.parts)
        if not installed and path.suffix == ".py" and path.exists():
            hashes[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return dict(sorted(hashes.items()))


@dataclass
class StageRecord:
    kind: str
    status: str = "pending"
    attempts: int = 0
    config_hash: str = ""
    code_version: str = ""
    #: The hashed settings (stage, data, trainer, seed), to show what changed on a re-run.
    config: dict = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    wandb_run_id: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    #: Seconds the stage took, a resumed stage's earlier attempts included up to the
    #: checkpoint it resumed from.
    wall_time_s: float | None = None
    error: str | None = None
    #: Optimizer steps each rank took in the stage (all ranks of a DDP run alike).
    optimizer_steps: list[int] = field(default_factory=list)
    #: The checkpoint the stage was tested with and hands on when it selects on validation
    #: (``selection.monitor``): its path (relative to the run dir), epoch, step and value.
    selected: dict[str, Any] | None = None
    #: Set when the stage was taken from the stage cache: the run dir that computed it and
    #: the cache entry (see distillery.pipeline.stage_cache).
    reused_from: dict[str, str] | None = None

    def artifact_path(self, name: str) -> Path | None:
        """Where artifact ``name`` of this stage lies, or None if the stage did not write it."""
        return Path(self.artifacts[name]) if name in self.artifacts else None


@dataclass
class RunManifest:
    """The pipeline's record. Only rank 0 saves it, always atomically."""

    path: Path
    run_id: str
    pipeline: str
    code_version: str = __version__
    created_at: str = field(default_factory=now_iso)
    stages: dict[str, StageRecord] = field(default_factory=dict)

    @classmethod
    def load_or_create(cls, run_dir: Path, pipeline: str) -> RunManifest:
        """Artifact paths come back absolute, resolved against ``run_dir`` where it is now."""
        path = Path(run_dir) / MANIFEST_NAME
        if not path.exists():
            run_id = f"{pipeline}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            return cls(path=path, run_id=run_id, pipeline=pipeline)
        try:
            raw = json.loads(path.read_text())
            stages = {name: StageRecord(**rec) for name, rec in raw.pop("stages").items()}
            for record in stages.values():
                record.artifacts = {
                    k: str(path.parent / p) for k, p in record.artifacts.items()
                }  # absolute paths stay as they are
            return cls(path=path, stages=stages, **raw)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable pipeline manifest ({err})") from err

    def stage(self, name: str, kind: str) -> StageRecord:
        return self.stages.setdefault(name, StageRecord(kind=kind))

    def save(self) -> None:
        """Artifact paths are stored relative to the run dir, so a moved or copied run dir
        reads its own files."""
        payload = {k: v for k, v in asdict(self).items() if k != "path"}
        for record in payload["stages"].values():
            record["artifacts"] = relative_paths(record["artifacts"], self.path.parent)
        artifacts.write_json(self.path, payload)


def relative_paths(paths: dict[str, str], run_dir: Path) -> dict[str, str]:
    """``paths`` inside ``run_dir`` made relative to it; others (none expected) unchanged."""
    out = {}
    for key, value in paths.items():
        path = Path(value)
        out[key] = str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else value
    return out
