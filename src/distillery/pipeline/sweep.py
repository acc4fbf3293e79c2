"""The sweep-level view: when a Hydra multirun ends, one table of every job's results.

Each job is its own pipeline run (own run dir, own W&B group); this table puts them side
by side: ``<sweep dir>/sweep_results.md`` and, with the W&B logger, a ``sweep`` run
holding the same table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from distillery import artifacts
from distillery.pipeline.report import COLUMNS, format_value

log = logging.getLogger(__name__)


def sweep_table(sweep_dir: Path) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: one row per job (``<sweep dir>/<n>/pipeline.json``) with its
    overrides and every ``<stage>/<column>`` of :data:`~distillery.pipeline.report.COLUMNS`
    that some job reports."""
    jobs = []
    for manifest_path in sorted(
        Path(sweep_dir).glob("*/pipeline.json"), key=lambda p: (len(p.parent.name), p.parent.name)
    ):
        job_dir = manifest_path.parent
        manifest = json.loads(manifest_path.read_text())
        overrides_path = job_dir / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_path) if overrides_path.exists() else []
        metrics = {k: v for rec in manifest["stages"].values() for k, v in rec["metrics"].items()}
        statuses = {rec["status"] for rec in manifest["stages"].values()}
        status = "done" if statuses == {"done"} else ", ".join(sorted(statuses))
        jobs.append((job_dir.name, list(overrides), manifest["run_id"], status, metrics))
    # Overrides every job shares say nothing about the difference between rows.
    shared = set.intersection(*(set(job[1]) for job in jobs)) if len(jobs) > 1 else set()
    jobs = [(n, " ".join(o for o in ov if o not in shared), *rest) for n, ov, *rest in jobs]
    keys = sorted(
        {k for *_, metrics in jobs for k in metrics if k.partition("/")[2] in COLUMNS},
        key=lambda k: (COLUMNS.index(k.partition("/")[2]), k),
    )
    header = ["job", "overrides", "run id", "status", *keys]
    rows = [[*job[:4], *(job[4].get(k) for k in keys)] for job in jobs]
    return header, rows


def sweep_markdown(header: list[str], rows: list[list[Any]]) -> str:
    def cell(column: str, value: Any) -> str:
        if value is None:
            return "-"
        return format_value(column, value) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(map(cell, header, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class SweepResults(Callback):
    """Hydra callback (``hydra.callbacks``): the sweep's table when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        header, rows = sweep_table(sweep_dir)
        if not rows:
            return
        text = sweep_markdown(header, rows)
        artifacts.write_text(sweep_dir / "sweep_results.md", text)
        log.info("sweep results (also in %s):\n%s", sweep_dir / "sweep_results.md", text)
        log_sweep_table(config, sweep_dir, header, rows)


def log_sweep_table(
    config: DictConfig, sweep_dir: Path, header: list[str], rows: list[list[Any]]
) -> None:
    """With a W&B logger: a ``sweep`` run (group ``sweep-<sweep dir name>``) holding the table."""
    from distillery.pipeline.tracking import finish_loggers, summary_loggers

    loggers = summary_loggers(
        OmegaConf.to_container(config.logger, resolve=True),
        run_dir=sweep_dir,
        group=f"sweep-{sweep_dir.name}",
        job_type="sweep",
        config={"sweep_dir": str(sweep_dir)},
    )
    try:
        for logger in loggers:
            logger.log_table("results", columns=header, data=rows)
    finally:
        finish_loggers(loggers)
