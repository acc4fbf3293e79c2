"""``distillery`` console script: compose the Hydra config and run the pipeline."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

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
    from distillery.pipeline import launch
    from distillery.pipeline.manifest import RunDirError
    from distillery.pipeline.runner import Runner, StageInterrupted
    from distillery.pipeline.tracking import report_to_wandb_sweep

    launch.install()

    # The run dir Hydra created is the one every process (and DDP child) agrees on.
    with open_dict(cfg):
        cfg.run_dir = HydraConfig.get().runtime.output_dir
    try:
        with launch.job_processes():
            stages = Runner(cfg).run()
    except (ConfigError, RunDirError, AudioFileError) as err:  # bad input: the message says it all
        log.error("%s", err)
        sys.exit(2)
    except (
        StageInterrupted
    ) as err:  # SIGTERM: a checkpoint was saved; 128 + SIGTERM, as for a killed job
        log.warning("%s", err)
        sys.exit(143)
    if rank_zero_only.rank == 0:
        report_to_wandb_sweep(
            {k: v for record in stages.values() for k, v in record.metrics.items()}
        )
    return optimized_value(stages, cfg.optimized_metric) if cfg.optimized_metric else None


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
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval")


def main() -> None:
    register_configs()
    quiet_third_party_logs()
    _main()


if __name__ == "__main__":
    main()
