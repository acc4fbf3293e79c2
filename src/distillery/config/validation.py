"""Start-up checks the schema cannot express: ``_target_`` arguments, ranges, stage wiring.

Every problem is collected and reported at once, each with its full key path, before any
stage runs: a typo must never surface an hour into a pipeline. What a stage's own class
must provide (the stage contract, its ``inputs``) is checked one layer up, in
:mod:`distillery.pipeline.contract`, which adds those problems to these.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from typing import Any

import lightning.pytorch as pl
from hydra.utils import get_class, get_method
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from distillery.config.schema import Config
from distillery.config.weights import check_encoder_weights

#: Trainer arguments the runner owns.
INJECTED_TRAINER_ARGS = (
    "default_root_dir",
    "callbacks",
    "logger",
    "plugins",
    "use_distributed_sampler",
)


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


def _resolve_target(target: str) -> Any:
    try:
        return get_class(target)
    except Exception:  # noqa: BLE001 - hydra raises several types; fall back to functions
        return get_method(target)


def _accepts_any_kwargs(sig: inspect.Signature) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def _type_problem(value: Any, annotation: Any) -> str | None:
    """A message when ``value`` clearly cannot be ``annotation`` (simple types only)."""
    if value is None or isinstance(value, str) and value.startswith("${"):
        return None
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        return None if value in allowed else f"must be one of {list(allowed)}, got {value!r}"
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        problems = [_type_problem(value, a) for a in args if a is not type(None)]
        return None if any(p is None for p in problems) else problems[0]
    checks = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    if annotation in checks:
        ok = isinstance(value, checks[annotation]) and not (
            annotation is not bool and isinstance(value, bool)
        )
        return None if ok else f"must be {annotation.__name__}, got {value!r}"
    return None


def check_call_args(
    target: Any, args: dict[str, Any], path: str, *, reserved: tuple[str, ...] = ()
) -> list[str]:
    """Problems with calling ``target(**args)``: unknown names, reserved names, wrong types."""
    try:
        sig = inspect.signature(target)
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except (TypeError, ValueError, NameError):
        return []
    params = {n: p for n, p in sig.parameters.items() if n != "self"}
    problems = []
    for key, value in args.items():
        if key.startswith("_") and key.endswith("_"):
            continue
        if key in reserved:
            problems.append(f"{path}.{key}: set by the runner, remove it from the config")
        elif key not in params and not _accepts_any_kwargs(sig):
            allowed = ", ".join(n for n in params if n not in reserved)
            problems.append(
                f"{path}.{key}: unknown argument of {target.__qualname__} (allowed: {allowed})"
            )
        elif key in hints and (msg := _type_problem(value, hints[key])):
            problems.append(f"{path}.{key}: {msg}")
    return problems


def check_targets(node: Any, path: str) -> list[str]:
    """Recursively check every ``_target_`` node below ``node``."""
    problems: list[str] = []
    if isinstance(node, dict):
        if "_target_" in node:
            try:
                target = _resolve_target(str(node["_target_"]))
            except Exception as err:  # noqa: BLE001
                return [f"{path}._target_: cannot import {node['_target_']!r} ({err})"]
            args = {k: v for k, v in node.items() if not isinstance(v, dict) or "_target_" not in v}
            problems += check_call_args(target, args, path)
        for key, value in node.items():
            problems += check_targets(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            problems += check_targets(value, f"{path}[{i}]")
    return problems


CODE_CHANGE_POLICIES = ("error", "rerun", "reuse")


def _range(
    path: str, value: float, low: float, high: float, *, low_open: bool, high_open: bool
) -> list[str]:
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if ok_low and ok_high:
        return []
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return [f"{path}: {value} is outside the allowed range {interval}"]


def check_data(data: dict[str, Any], path: str) -> list[str]:
    problems = []
    source = str(data.get("source"))
    if "." in source:  # a user's source function
        try:
            problems += check_call_args(
                get_method(source), data["source_args"], f"{path}.source_args"
            )
        except Exception as err:  # noqa: BLE001
            problems.append(f"{path}.source: cannot import {source!r} ({err})")
    choices = {
        "source": ("synthetic", "folder", "manifest"),
        "train_items": ("all", "labeled", "pseudo_labeled"),
        "on_bad_file": ("error", "skip"),
    }
    for key, allowed in choices.items():
        if data.get(key) not in allowed and not (key == "source" and "." in source):
            problems.append(f"{path}.{key}: {data.get(key)!r} is not one of {list(allowed)}")
    problems += _range(
        f"{path}.label_fraction", data["label_fraction"], 0, 1, low_open=True, high_open=False
    )
    for key in ("val_fraction", "test_fraction"):
        problems += _range(f"{path}.{key}", data[key], 0, 1, low_open=False, high_open=True)
    if data["val_fraction"] + data["test_fraction"] >= 1:
        problems.append(f"{path}.val_fraction + test_fraction must be < 1 (no training data left)")
    for key in ("batch_size", "sample_rate"):
        if data[key] <= 0:
            problems.append(f"{path}.{key}: must be > 0, got {data[key]}")
    if data["clip_seconds"] <= 0:
        problems.append(f"{path}.clip_seconds: must be > 0, got {data['clip_seconds']}")
    if data["source"] == "folder" and not data.get("root"):
        problems.append(f"{path}.root: required with {path}.source=folder")
    if data["source"] == "manifest" and not data.get("path"):
        problems.append(f"{path}.path: required with {path}.source=manifest")
    return problems


#: Allowed values of method parameters, by stage kind: key -> (low, high, low_open, high_open).
METHOD_RANGES: dict[str, dict[str, tuple[float, float, bool, bool]]] = {
    "partial_label_sd": {
        "noise_rate": (0, 1, False, True),
        "rounds": (1, math.inf, False, True),
        "epochs": (1, math.inf, False, True),
        "gce_q": (0, 1, True, False),
    },
    "coss_kd": {
        "cosine_weight": (0, math.inf, False, True),
        "space_weight": (0, math.inf, False, True),
    },
    "dataset_distill": {
        "size": (1, math.inf, False, True),
        "ridge": (0, math.inf, True, True),
        "pool_size": (1, math.inf, False, True),
        "pool_max_steps": (1, math.inf, False, True),
        "pool_lr": (0, math.inf, True, True),
        "pool_weight_decay": (0, math.inf, False, True),
        "final_lr_factor": (0, 1, True, False),
    },
    "pretrain_synthetic": {"batch_size": (1, math.inf, False, True)},
}


def _check_method_ranges(kind: str, module: dict[str, Any], path: str) -> list[str]:
    problems = []
    for key, (low, high, low_open, high_open) in METHOD_RANGES.get(kind, {}).items():
        if isinstance(value := module.get(key), int | float) and not isinstance(value, bool):
            problems += _range(
                f"{path}.{key}", value, low, high, low_open=low_open, high_open=high_open
            )
    clustered = kind == "partial_label_sd" and module.get("noise_kind") == "clustered"
    if clustered and not module.get("noise_clusters"):
        problems.append(f"{path}.noise_clusters: required with {path}.noise_kind=clustered")
    return problems


def stage_data(cfg: DictConfig, name: str) -> DictConfig:
    """The top-level data node with the stage's overrides merged in (schema-checked)."""
    return OmegaConf.merge(cfg.data, cfg.pipeline.stages[name].data)


def stage_trainer(cfg: DictConfig, name: str) -> dict[str, Any]:
    """Top-level trainer args, then the stage's, then ``debug.trainer`` (forced on all stages)."""
    layers = (cfg.trainer, cfg.pipeline.stages[name].trainer, cfg.debug.trainer)
    merged = OmegaConf.merge(*(OmegaConf.to_container(layer, resolve=True) for layer in layers))
    return OmegaConf.to_container(merged)


def check_schema(cfg: DictConfig) -> list[str]:
    """Re-check against the schema: ``+key=value`` overrides bypass it at composition."""
    try:
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(cfg))
    except (ConfigKeyError, ValidationError) as err:
        return [f"{err.full_key}: {str(err).splitlines()[0]}"]
    return []


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem of a composed config that the schema and ranges can tell, by key path.

    A schema violation is returned alone: the other checks assume the schema's shape.
    """
    problems = check_schema(cfg)
    if problems:
        return problems
    order = list(cfg.pipeline.order)
    stages = cfg.pipeline.stages
    if missing := [n for n in order if n not in stages]:
        problems.append(
            f"pipeline.order: {missing} have no entry in pipeline.stages (have {list(stages)})"
        )
    if extra := [n for n in stages if n not in order]:
        problems.append(f"pipeline.stages: {extra} are not in pipeline.order {order}")
    if len(set(order)) != len(order):
        problems.append(f"pipeline.order: duplicate stage names in {order}")

    if cfg.on_code_change not in CODE_CHANGE_POLICIES:
        problems.append(
            f"on_code_change: {cfg.on_code_change!r} is not one of {list(CODE_CHANGE_POLICIES)}"
        )
    problems += check_targets(OmegaConf.to_container(cfg.logger), "logger")
    trainer_args = OmegaConf.to_container(cfg.trainer)
    problems += check_call_args(pl.Trainer, trainer_args, "trainer", reserved=INJECTED_TRAINER_ARGS)
    problems += check_targets(trainer_args, "trainer")
    data_problems = check_data(OmegaConf.to_container(cfg.data), "data")
    problems += data_problems

    for name in order:
        if name not in stages:
            continue
        path = f"pipeline.stages.{name}"
        stage = stages[name]
        module_args = OmegaConf.to_container(stage.module)
        problems += check_encoder_weights(module_args, f"{path}.module")
        for key, high_open in (("target_sparsity", True), ("sparsity_warmup", False)):
            if isinstance(value := module_args.get(key), int | float):  # prune_distill
                problems += _range(
                    f"{path}.module.{key}", value, 0, 1, low_open=False, high_open=high_open
                )
        problems += _check_method_ranges(stage.kind, module_args, f"{path}.module")
        problems += check_targets(OmegaConf.to_container(stage.callbacks), f"{path}.callbacks")
        problems += check_call_args(
            pl.Trainer,
            OmegaConf.to_container(stage.trainer),
            f"{path}.trainer",
            reserved=INJECTED_TRAINER_ARGS,
        )
        try:  # report only what the stage's own data overrides add to the top-level problems
            stage_problems = check_data(
                OmegaConf.to_container(stage_data(cfg, name)), f"{path}.data"
            )
            problems += [
                p for p in stage_problems if p.replace(f"{path}.", "", 1) not in data_problems
            ]
        except Exception as err:  # noqa: BLE001 - schema violation inside the stage override
            problems.append(f"{path}.data: {err}".splitlines()[0])
        problems += _check_cluster_counts(cfg, name, path)
    return problems


def _check_cluster_counts(cfg: DictConfig, name: str, path: str) -> list[str]:
    """A callback's ``k`` (clusters) against the built-in data set's training clips.

    Only the synthetic source's size is known before its files are read; for the others
    the ``PseudoLabeler`` checks when its stage sets up, before training.
    """
    data = stage_data(cfg, name)
    if data.source != "synthetic":
        return []
    clips = data.synthetic.num_classes * data.synthetic.clips_per_class
    train = int(clips * (1 - data.val_fraction - data.test_fraction))
    problems = []
    for key, callback in cfg.pipeline.stages[name].callbacks.items():
        k = callback.get("k") if callback else None
        if isinstance(k, int) and k > train:
            problems.append(
                f"{path}.callbacks.{key}.k: {k} clusters for about {train} training clips "
                f"(data.synthetic: {data.synthetic.num_classes} classes x {data.synthetic.clips_per_class} "
                "clips, less val/test); k must be at most the number of clips"
            )
    return problems
