"""``distillery`` console script: compose the Hydra config and run the pipeline."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from distillery.config.schema import register_configs

#: The config tree inside the package (a link to the checkout's top-level conf/ in a source
#: tree, package data in an installed wheel).
CONF_DIR = str(Path(__file__).parent / "conf")
log = logging.getLogger("distillery")


@hydra.main(version_base="1.3", config_path="pkg://distillery.conf", config_name="config")
def _main(cfg: DictConfig) -> float | None:
    # Heavy imports only once Hydra has parsed argv, so `--help` stays quick.
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from distillery.config.validation import ConfigError
    from distillery.data.audio_io import AudioFileError
    from distillery.models.safe_load import UnsafeArtifactError
    from distillery.pipeline import faults, launch, run_lock
    from distillery.pipeline.manifest import RunDirError
    from distillery.pipeline.runner import Runner, StageInterrupted
    from distillery.pipeline.sweep import hydra_sweep_problems
    from distillery.pipeline.tracking import report_to_wandb_sweep

    launch.install()
    launch.fresh_store_after_torchrun_restart()
    launch.tag_rank_logs(rank_zero_only.rank)

    # The run dir Hydra created is the one every process (and DDP child) agrees on.
    with open_dict(cfg):
        cfg.run_dir = HydraConfig.get().runtime.output_dir
    try:
        if problems := hydra_sweep_problems(cfg.optimized_metric, HydraConfig.get()):
            raise ConfigError(problems)  # a search never selects on the test split
        with launch.job_processes():
            runner = Runner(cfg)  # validates the config
            runner.plan()  # refuses a run dir this run must not touch
            # One writer per run dir: a second run is refused before it writes anything.
            with (
                run_lock.hold(Path(cfg.run_dir), writer=rank_zero_only.rank == 0),
                accepted_run_records(runner.cfg, write_config=rank_zero_only.rank == 0),
            ):
                stages = runner.run()
    except (
        ConfigError,
        RunDirError,
        AudioFileError,
        UnsafeArtifactError,
    ) as err:  # bad input: the message says it all
        log.error("%s", err)
        sys.exit(2)
    except StageInterrupted as err:  # a stop signal: a checkpoint was saved
        log.warning("%s", err)
        faults.exit_after_stop(err.signum)
    if rank_zero_only.rank == 0:
        report_to_wandb_sweep(
            {k: v for record in stages.values() for k, v in record.metrics.items()}
        )
    return optimized_value(stages, cfg.optimized_metric) if cfg.optimized_metric else None


@contextlib.contextmanager
def accepted_run_records(cfg: DictConfig, write_config: bool) -> Iterator[None]:
    """What Hydra would have written before the run (``hydra.output_subdir`` is off so a
    refused run writes nothing): ``.hydra/config.yaml`` and ``overrides.yaml`` (by rank 0),
    and the log file ``<job name>.log`` while the run lasts, all in the run dir."""
    from distillery import artifacts

    hydra_cfg = HydraConfig.get()
    run_dir = Path(cfg.run_dir)
    if write_config:
        artifacts.write_text(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
        overrides = OmegaConf.create(list(hydra_cfg.overrides.task))
        artifacts.write_text(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(overrides))
    handler = logging.FileHandler(run_dir / f"{hydra_cfg.job.name}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:  # each job of a multirun logs to its own run dir
        logging.getLogger().removeHandler(handler)
        handler.close()


def optimized_value(stages: dict, metric: str) -> float:
    """The value of ``optimized_metric`` (``<stage>/<split>/<name>``) for a sweeper."""
    stage = metric.split("/")[0]
    metrics = stages[stage].metrics if stage in stages else {}
    if metric not in metrics:
        raise KeyError(
            f"optimized_metric={metric!r} was not produced (stage {stage!r} has: {sorted(metrics)})"
        )
    return metrics[metric]


def quiet_third_party_logs() -> None:
    """Keep the console to what the pipeline is doing: Lightning's tips and device banners,
    and deprecation notices from inside dependencies, are not actionable for a user."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("faiss.loader").setLevel(
        logging.WARNING
    )  # hydra.verbose=faiss.loader shows it
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval")


def main() -> None:
    register_configs()
    quiet_third_party_logs()
    _main()


if __name__ == "__main__":
    main()
