"""Artifacts are data: tensor files load without unpickling code, and the ``_target_``
config an artifact carries builds only models.

``torch.load(weights_only=True)`` refuses every pickled object but tensors and plain
containers, so a payload hidden in an ``encoder.pt`` never runs. The config stored next to
the weights still names what to build, and ``hydra.utils.instantiate`` would call any
importable callable (``builtins.open(path, "w")``, ``shutil.copyfile``, ...). Every loader
therefore passes that config through :func:`check_artifact_config` first: a target is
allowed when it is one of distillery's model classes or builders, or when the user's own
composed config names it (see :func:`trust_config_targets`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

#: Functions that build a model from a config (classes need no entry: any ``nn.Module``
#: subclass defined in ``distillery.models`` is allowed).
MODEL_BUILDERS = frozenset({"distillery.models.pruning.build_pruned"})
MODEL_PACKAGE = "distillery.models."

#: ``_target_`` strings of the composed config of this process: the user chose them.
_trusted_targets: set[str] = set()


class UnsafeArtifactError(ValueError):
    """An artifact that asks to run code, or to build something that is not a model."""


def _targets(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "_target_" in node:
            yield str(node["_target_"])
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list | tuple):
        for value in node:
            yield from _targets(value)


def trust_config_targets(cfg: Any) -> None:
    """Allow every ``_target_`` of the user's composed config (a dict or DictConfig)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, DictConfig | ListConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    _trusted_targets.update(_targets(cfg))


def is_model_target(target: str) -> bool:
    """A distillery model class or builder. Only ``distillery.models.*`` modules are
    imported to decide: importing anything else could itself run code."""
    if target in MODEL_BUILDERS:
        return True
    module_name, _, attr = target.rpartition(".")
    if not module_name.startswith(MODEL_PACKAGE) or not attr:
        return False
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return False
    return inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == module_name


def check_artifact_config(config: Any, source: str | os.PathLike) -> None:
    """Raise :class:`UnsafeArtifactError` naming ``source`` and the target unless every
    ``_target_`` in ``config`` is a model builder or named by the user's config.

    Interpolations (``${...}``) are refused too: resolvers read the environment and files.
    """
    for target in _targets(config):
        if target not in _trusted_targets and not is_model_target(target):
            raise UnsafeArtifactError(
                f"{os.fspath(source)}: refusing to instantiate _target_ {target!r}: an "
                "artifact's config may only build distillery models (distillery.models.*) "
                "or targets named in your own config"
            )
    for text in _strings(config):
        if "${" in text:
            raise UnsafeArtifactError(
                f"{os.fspath(source)}: refusing the interpolation {text!r} in the artifact's config"
            )


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list | tuple):
        for value in node:
            yield from _strings(value)


def load_tensors(path: str | os.PathLike) -> Any:
    """``torch.load`` that only reads tensors and plain containers (never runs code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False; keep only what the file asked for.
        found = re.search(r"Unsupported (global|operand)[^.]*", str(err))
        raise UnsafeArtifactError(
            f"{os.fspath(path)}: refused, it holds objects other than tensors and plain "
            f"containers (artifacts load as data only; {found[0] if found else 'not a tensor file'})"
        ) from None
