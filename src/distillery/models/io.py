"""Encoders as artifacts: weights plus the ``_target_`` config that rebuilds them."""

from __future__ import annotations

import os
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distillery import artifacts
from distillery.models.safe_load import check_artifact_config, load_tensors


def build_encoder(cfg: dict[str, Any] | DictConfig) -> nn.Module:
    """Instantiate an encoder from its ``_target_`` config."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return instantiate(cfg)


def self_contained_config(encoder: nn.Module, cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg``, or, when it reads a weights file, the encoder's weights-free
    ``architecture_config()``: a saved state dict replaces that file, which another
    machine may not have."""
    if isinstance(cfg, dict) and cfg.get("weights") and hasattr(encoder, "architecture_config"):
        return encoder.architecture_config()
    return cfg


def save_encoder(path: str | os.PathLike, encoder: nn.Module, cfg: dict[str, Any]) -> None:
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    config = dict(self_contained_config(encoder, cfg))
    artifacts.write_torch(path, {"config": config, "state_dict": state})


def load_encoder(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an encoder saved by :func:`save_encoder`; every weight must match (strict).

    The file is read as data and its config may only build models (see
    :mod:`distillery.models.safe_load`)."""
    payload = load_tensors(path)
    if not isinstance(payload, dict) or not {"config", "state_dict"} <= payload.keys():
        raise ValueError(f"{os.fspath(path)} is not an encoder artifact (config + state_dict)")
    check_artifact_config(payload["config"], path)
    encoder = build_encoder(payload["config"])
    encoder.load_state_dict(payload["state_dict"], strict=True)
    return encoder, payload["config"]
