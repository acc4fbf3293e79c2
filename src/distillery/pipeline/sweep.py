"""Sweeps: what they may select on, and one table of every job's results.

A search selects on a validation metric, never on the test split, and does not search the
settings that define the experiment (:func:`selection_problems`); Hydra sweeps are checked
when the multirun starts and in each job, a W&B sweep file by ``distillery-sweep check``.

Each job is its own pipeline run (own run dir, own W&B group); the table puts them side
by side: ``<sweep dir>/sweep_results.md`` and, with the W&B logger, a ``sweep`` run
holding the same table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from distillery import artifacts
from distillery.pipeline.report import COLUMNS, format_value

log = logging.getLogger(__name__)

#: Settings that define the experiment (which labels a run may use), not values to tune:
#: a search over them picks the one that uses the most labels.
NOT_SEARCHABLE = ("data.label_fraction", "data.val_labels_per_class")


def selection_problems(
    objective_key: str, objective: Any, searched: Mapping[str, str]
) -> list[str]:
    """Problems of a search: its objective (``<stage>/<split>/<name>``, named by
    ``objective_key``) must be a validation metric; ``searched`` (where -> config key) must
    leave the experiment's settings alone."""
    problems = []
    if objective is not None:
        stage, _, rest = str(objective).partition("/")
        split = rest.partition("/")[0]
        if split != "val":
            on_test = " (eval/* scores are computed on the test split)" if split == "eval" else ""
            problems.append(
                f"{objective_key}: {objective!r} is not a validation metric{on_test}; a search "
                f"must select on one, e.g. {stage}/val/acc: the test split is evaluated once, "
                "on the selected weights"
            )
    for where, key in searched.items():
        if key in NOT_SEARCHABLE:
            problems.append(
                f"{where}: {key} is a setting of the experiment, not a value to search; "
                "run one search per value"
            )
    return problems


def hydra_sweep_problems(optimized_metric: str | None, hydra_cfg: DictConfig) -> list[str]:
    """:func:`selection_problems` of a Hydra run: ``optimized_metric``, the sweeper's
    ``params`` (Optuna) and the sweep overrides of the command line (``key=a,b``)."""
    params = OmegaConf.select(hydra_cfg, "sweeper.params") or {}
    searched = {f"hydra.sweeper.params.{key}": key for key in params}
    overrides = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    searched |= {
        f"override {o.input_line}": o.key_or_group for o in overrides if o.is_sweep_override()
    }
    return selection_problems("optimized_metric", optimized_metric, searched)


def wandb_sweep_problems(path: Path) -> list[str]:
    """:func:`selection_problems` of a W&B sweep file (``metric.name``, ``parameters``)."""
    try:
        sweep = yaml.safe_load(Path(path).read_text())  # data, never code
    except (OSError, yaml.YAMLError) as err:
        return [f"{path}: cannot read a sweep file ({err})"]
    if not isinstance(sweep, dict):
        return [f"{path}: not a W&B sweep file (a mapping with metric and parameters)"]
    metric = (sweep.get("metric") or {}).get("name")
    if metric is None:
        return [f"{path}: metric.name: missing; name a validation metric, e.g. finetune/val/acc"]
    searched = {f"{path}: parameters.{key}": key for key in sweep.get("parameters") or {}}
    return selection_problems(f"{path}: metric.name", metric, searched)


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
    """Hydra callback (``hydra.callbacks``): refuses a search on the test split before any
    job starts (exit 2), and writes the sweep's table when a multirun ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if problems := hydra_sweep_problems(config.get("optimized_metric"), config.hydra):
            log.error("invalid sweep:\n  - %s", "\n  - ".join(problems))
            sys.exit(2)

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


def main(argv: list[str] | None = None) -> None:
    """``distillery-sweep check FILE...``: the checks of a Hydra sweep, on W&B sweep files
    (run it before ``wandb sweep``). Exit status 2 when a file selects on test data."""
    parser = argparse.ArgumentParser(prog="distillery-sweep", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check W&B sweep files")
    check.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    problems = [p for path in args.files for p in wandb_sweep_problems(path)]
    if problems:
        print("invalid sweep:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        sys.exit(2)
    print(f"ok: {', '.join(map(str, args.files))} select on validation metrics")


if __name__ == "__main__":
    main()
