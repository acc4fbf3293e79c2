from __future__ import annotations

import os
from pathlib import Path

import pytest

# Offline W&B everywhere in tests, and a shared synthetic-data cache across tests.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-cache")
