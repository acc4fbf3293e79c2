"""What the benchmarks share: the composed project config, thread caps, the machine."""

from __future__ import annotations

import logging
import os
import platform
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from distillery.cli import CONF_DIR, quiet_third_party_logs
from distillery.config.schema import register_configs

#: The pipeline whose stages are benchmarked (what ``make demo`` runs).
EXPERIMENT = "experiment=unfused"


def compose_config(overrides: list[str]) -> DictConfig:
    """The real config tree, composed as the CLI does (no run-dir side effects)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def quiet() -> None:
    """Keep Lightning's banners and tips out of the benchmark output."""
    quiet_third_party_logs()
    for name in ("lightning.pytorch", "lightning.fabric", "distillery"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # A short benchmark epoch has fewer steps than the logging interval; that is intended.
    warnings.filterwarnings("ignore", message=r".*does not have many workers")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval")


@contextmanager
def thread_limit(threads: int | None) -> Iterator[None]:
    """Cap torch, BLAS/OpenMP (threadpoolctl) and FAISS threads for the block.

    ``None`` leaves everything as configured. On a small machine shared with other jobs,
    one thread keeps baseline and candidate equally exposed to the background load.
    """
    if threads is None:
        yield
        return
    import faiss
    from threadpoolctl import threadpool_limits

    torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        with threadpool_limits(limits=threads):
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            yield
    finally:
        torch.set_num_threads(torch_before)
        faiss.omp_set_num_threads(faiss_before)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int | None) -> dict[str, Any]:
    """CPU, library versions and thread settings, recorded next to the results."""
    import faiss
    import lightning
    import numpy
    import sklearn
    import torchaudio

    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_1min": os.getloadavg()[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchaudio": torchaudio.__version__,
        "lightning": lightning.__version__,
        "faiss": faiss.__version__,
        "sklearn": sklearn.__version__,
        "numpy": numpy.__version__,
        "threads_requested": threads,
        "torch_threads": threads or torch.get_num_threads(),
        "faiss_omp_threads": threads or faiss.omp_get_max_threads(),
    }
