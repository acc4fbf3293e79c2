"""Start-up checks the schema cannot express: ``_target_`` arguments, ranges, stage wiring.

Every problem is collected and reported at once, each with its full key path, before any
stage runs: a typo must never surface an hour into a pipeline. What a stage's own class
must provide (the stage contract, its ``inputs``) is checked one layer up, in
:mod:`distillery.pipeline.contract`, which adds those problems to these.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import get_class, get_method, get_object
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, ValidationError

from distillery.config.schema import Config, DataConfig, StageConfig
from distillery.config.weights import check_encoder_weights

#: Trainer arguments the runner owns.
INJECTED_TRAINER_ARGS = (
    "default_root_dir",
    "callbacks",
    "logger",
    "plugins",
    "use_distributed_sampler",
)


#: A check of one data node's files: ``(data, key path) -> problems``.
DataCheck = Callable[[dict[str, Any], str], list[str]]

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


def _resolve_target(target: str) -> Any:
    return get_object(target)  # a class or a function (get_class logs an error on functions)


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
            # A stage module reads its scheduler's `interval` itself (per epoch or per step).
            interval = args.pop("interval", "epoch") if path.endswith(".module.scheduler") else None
            if interval not in (None, "epoch", "step"):
                problems.append(f"{path}.interval: must be 'epoch' or 'step', got {interval!r}")
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


INF = math.inf

#: Allowed values of the schema's numeric fields, by dotted key: (low, high, low_open,
#: high_open); a list value (``eval.knn_k``) is checked element by element. Every numeric
#: field of :class:`~distillery.config.schema.Config` has an entry (a test sweeps them).
SCHEMA_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "seed": (0, 2**32 - 1, False, False),  # what Lightning's seed_everything accepts
    "rank_zero_wait_min": (0, INF, True, True),  # minutes other ranks wait for rank 0 alone
    "pseudo_label_k": (2, INF, False, True),
    "data.sample_rate": (0, INF, True, True),
    "data.clip_seconds": (0, INF, True, True),
    # Assigned val/test splits must not be empty: evaluation needs both.
    "data.val_fraction": (0, 1, True, True),
    "data.test_fraction": (0, 1, True, True),
    "data.split_seed": (0, INF, False, True),
    "data.label_fraction": (0, 1, True, False),
    "data.val_labels_per_class": (1, INF, False, True),  # or null: every validation label
    "data.label_subset_seed": (0, INF, False, True),  # or null: split_seed
    "data.batch_size": (1, INF, False, True),
    "data.num_workers": (0, INF, False, True),
    "data.preload_max_mb": (0, INF, False, True),
    "data.max_clips": (1, INF, False, True),  # or null: every clip
    "data.min_sample_rate": (0, INF, True, True),  # and min <= sample_rate <= max
    "data.max_sample_rate": (0, INF, True, True),
    "data.max_clip_seconds": (0, INF, True, True),
    "data.synthetic.num_classes": (2, INF, False, True),  # at most the kinds: data/checks.py
    "data.synthetic.clips_per_class": (1, INF, False, True),
    "data.synthetic.seed": (0, INF, False, True),
    "data.synthetic.snr_db_min": (-INF, INF, True, True),  # finite, and min <= max
    "data.synthetic.snr_db_max": (-INF, INF, True, True),
    "data.speech.speakers": (3, INF, False, True),  # and one train, val and test speaker each
    "data.speech.clips_per_word": (1, INF, False, True),
    "data.speech.val_speakers": (1, INF, False, True),
    "data.speech.test_speakers": (1, INF, False, True),
    "data.speech.seed": (0, INF, False, True),
    "data.speech.snr_db_min": (-INF, INF, True, True),
    "data.speech.snr_db_max": (-INF, INF, True, True),
    "data.speech.rate_wpm": (80, 450, False, False),  # espeak-ng's range (words per minute)
    "data.speech.pitch": (0, 99, False, False),  # espeak-ng's 0-99 scale
    "data.features.n_mels": (1, INF, False, True),
    "data.features.n_fft": (2, INF, False, True),
    "data.features.hop_length": (1, INF, False, True),
    "data.features.f_min": (0, INF, False, True),
    "data.features.f_max": (0, INF, True, True),  # and f_min < f_max <= sample_rate / 2
    "eval.knn_k": (1, INF, False, True),
    "eval.probe_epochs": (1, INF, False, True),
}


def _lookup(node: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def check_ranges(
    node: dict[str, Any], prefix: str, path: str, skip: tuple[str, ...] = ()
) -> list[str]:
    """:data:`SCHEMA_RANGES` entries under ``prefix`` (e.g. ``data.``) but not under
    ``skip``, checked in ``node`` and reported under ``path``."""
    problems = []
    for key, (low, high, low_open, high_open) in SCHEMA_RANGES.items():
        if not key.startswith(prefix) or skip and key.startswith(skip):
            continue
        relative = key[len(prefix) :]
        value = _lookup(node, relative)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            where = f"{path}{relative}" + (f"[{i}]" if isinstance(value, list) else "")
            if isinstance(item, int | float) and not isinstance(item, bool):
                problems += _range(where, item, low, high, low_open=low_open, high_open=high_open)
    return problems


def check_data(data: dict[str, Any], path: str, file_checks: DataCheck | None = None) -> list[str]:
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
        "source": ("synthetic", "speech", "folder", "manifest", "shards"),
        "train_items": ("all", "labeled", "pseudo_labeled"),
        "on_bad_file": ("error", "skip"),
    }
    for key, allowed in choices.items():
        if data.get(key) not in allowed and not (key == "source" and "." in source):
            problems.append(f"{path}.{key}: {data.get(key)!r} is not one of {list(allowed)}")
    problems += check_ranges(data, "data.", f"{path}.")
    if data["val_fraction"] + data["test_fraction"] >= 1:
        problems.append(f"{path}.val_fraction + test_fraction must be < 1 (no training data left)")
    if not data["min_sample_rate"] <= data["sample_rate"] <= data["max_sample_rate"]:
        problems.append(
            f"{path}.sample_rate: {data['sample_rate']} is outside {path}.min_sample_rate.."
            f"max_sample_rate ({data['min_sample_rate']}..{data['max_sample_rate']})"
        )
    synthetic, features = data["synthetic"], data["features"]
    if synthetic["snr_db_min"] > synthetic["snr_db_max"]:
        problems.append(
            f"{path}.synthetic.snr_db_min: {synthetic['snr_db_min']} is above "
            f"{path}.synthetic.snr_db_max={synthetic['snr_db_max']}"
        )
    if features["f_min"] >= features["f_max"]:
        problems.append(
            f"{path}.features.f_min: {features['f_min']} must be below "
            f"{path}.features.f_max={features['f_max']}"
        )
    if features["f_max"] > data["sample_rate"] / 2:
        problems.append(
            f"{path}.features.f_max: {features['f_max']} Hz is above the Nyquist frequency "
            f"{data['sample_rate'] / 2:g} Hz of {path}.sample_rate={data['sample_rate']}"
        )
    if data["source"] == "folder" and not data.get("root"):
        problems.append(f"{path}.root: required with {path}.source=folder")
    if data["source"] in ("manifest", "shards") and not data.get("path"):
        problems.append(f"{path}.path: required with {path}.source={data['source']}")
    if not problems and file_checks is not None:
        problems += file_checks(data, path)
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
        "pool_momentum": (0, 1, False, True),
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


#: Stage names become directories of the run dir and parts of key paths (``inputs`` read
#: ``<stage>.<artifact>``, metrics ``<stage>/<split>/<name>``): letters, digits, ``_`` and
#: ``-`` only (so never ``..`` or ``/``), and not a name the run dir uses itself.
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
RESERVED_STAGE_NAMES = ("superseded", "wandb")


def check_stage_names(cfg: DictConfig) -> list[str]:
    problems = []
    named = [(f"pipeline.order[{i}]", name) for i, name in enumerate(cfg.pipeline.order)]
    named += [(f"pipeline.stages.{name}", name) for name in cfg.pipeline.stages]
    for path, name in named:
        if not STAGE_NAME.match(str(name)):
            problems.append(
                f"{path}: stage name {str(name)!r} must be letters, digits, '_' or '-', "
                "starting with a letter or digit (it names a directory of run_dir)"
            )
        elif name in RESERVED_STAGE_NAMES:
            problems.append(f"{path}: stage name {name!r} is reserved (a directory of run_dir)")
    return list(dict.fromkeys(problems))


#: Lightning Trainer arguments: (low, high, low_open, high_open), ints unless noted.
TRAINER_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "max_epochs": (1, INF, False, True),  # 0 trains nothing; -1 only with a step limit
    "min_epochs": (0, INF, False, True),
    "max_steps": (1, INF, False, True),  # or -1 (no step limit)
    "min_steps": (0, INF, False, True),
    "accumulate_grad_batches": (1, INF, False, True),
    "num_nodes": (1, INF, False, True),
    "check_val_every_n_epoch": (1, INF, False, True),
    "log_every_n_steps": (1, INF, False, True),
    "num_sanity_val_steps": (-1, INF, False, True),
    "gradient_clip_val": (0, INF, False, True),
    "val_check_interval": (0, INF, True, True),
}
#: Batch limits: a float is a fraction in [0, 1], an int a count; training needs one batch.
BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches")


def check_trainer_values(trainer: dict[str, Any], path: str) -> list[str]:
    problems = []
    for key, (low, high, low_open, high_open) in TRAINER_RANGES.items():
        value = trainer.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if (key, value) in (("max_epochs", -1), ("max_steps", -1)):
            continue  # Lightning's "no limit"; the stage as a whole is checked below
        problems += _range(
            f"{path}.{key}", value, low, high, low_open=low_open, high_open=high_open
        )
    for key in BATCH_LIMITS:
        value = trainer.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        train = key == "limit_train_batches"  # training needs at least one batch
        if isinstance(value, float) and not (0 < value <= 1 if train else 0 <= value <= 1):
            interval = "(0, 1]" if train else "[0, 1]"
            problems.append(f"{path}.{key}: {value} must be a fraction in {interval} or a count")
        elif isinstance(value, int) and value < int(train):
            problems.append(f"{path}.{key}: {value} must be >= {int(train)} batches")
    devices = trainer.get("devices")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices < 1 and devices != -1:
        problems.append(f"{path}.devices: {devices} must be >= 1, -1 (all), 'auto' or a list")
    return problems


def check_stage_length(cfg: DictConfig, name: str) -> list[str]:
    """A stage must end: ``max_epochs=-1`` needs ``max_steps`` or ``max_time``. Reported
    at the layer (top-level, stage or debug trainer) that set ``max_epochs``."""
    trainer = stage_trainer(cfg, name)
    if trainer.get("max_epochs") != -1 or trainer.get("max_steps", -1) != -1:
        return []
    if trainer.get("max_time"):
        return []
    layers = (
        ("debug.trainer", cfg.debug.trainer),
        (f"pipeline.stages.{name}.trainer", cfg.pipeline.stages[name].trainer),
    )
    where = next((path for path, layer in layers if "max_epochs" in layer), "trainer")
    return [
        f"{where}.max_epochs: -1 trains without end unless max_steps or max_time is set; "
        "give a number of epochs"
    ]


#: Optimizer hyper-parameters checked by key path; anything else the optimizer itself
#: rejects is found by building it on a dummy parameter.
OPTIMIZER_RANGES = {
    "lr": (0, INF, True, True),
    "weight_decay": (0, INF, False, True),
    "momentum": (0, INF, False, True),
}


def check_optimizers(node: Any, path: str) -> list[str]:
    """Every ``torch.optim.Optimizer`` target below ``node`` (``_partial_`` configs)."""
    problems: list[str] = []
    if isinstance(node, dict):
        target = node.get("_target_")
        cls = None
        if isinstance(target, str) and target.startswith("torch.optim."):
            with contextlib.suppress(Exception):
                cls = get_class(target)
        if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer):
            args = {k: v for k, v in node.items() if not (k.startswith("_") and k.endswith("_"))}
            found = []
            for key, (low, high, low_open, high_open) in OPTIMIZER_RANGES.items():
                if isinstance(value := args.get(key), int | float) and not isinstance(value, bool):
                    found += _range(
                        f"{path}.{key}", value, low, high, low_open=low_open, high_open=high_open
                    )
            if not found:
                try:
                    cls([torch.nn.Parameter(torch.zeros(1))], **args)
                except (ValueError, TypeError) as err:
                    found.append(f"{path}: {cls.__name__} rejects these arguments ({err})")
            problems += found
        for key, value in node.items():
            problems += check_optimizers(value, f"{path}.{key}")
    return problems


#: Callback arguments, by callback class name: (low, high, low_open, high_open).
CALLBACK_RANGES = {
    "PseudoLabeler": {
        "k": (2, INF, False, True),
        "niter": (1, INF, False, True),
        "every_n_epochs": (0, INF, False, True),
        "fit_sample": (1, INF, False, True),
        "pca_dim": (1, INF, False, True),
        "seed": (0, INF, False, True),
    },
}


def check_callback_values(callbacks: dict[str, Any], path: str) -> list[str]:
    problems = []
    for name, callback in callbacks.items():
        if not isinstance(callback, dict) or "_target_" not in callback:
            continue
        ranges = CALLBACK_RANGES.get(str(callback["_target_"]).rpartition(".")[2], {})
        for key, (low, high, low_open, high_open) in ranges.items():
            if isinstance(value := callback.get(key), int | float) and not isinstance(value, bool):
                problems += _range(
                    f"{path}.{name}.{key}", value, low, high, low_open=low_open, high_open=high_open
                )
    return problems


#: Stage module arguments that take a weights file given by path. Arguments typed as
#: artifacts (``pretrained``, ``teacher``, ...) are checked by the stage contract.
FILE_ARGUMENTS = ("teacher_weights",)


def check_input_files(module: dict[str, Any], path: str) -> list[str]:
    problems = []
    for key in FILE_ARGUMENTS:
        value = module.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_file():
            problems.append(f"{path}.{key}: file {value} does not exist")
    return problems


def stage_data(cfg: DictConfig, name: str) -> DictConfig:
    """The top-level data node with the stage's overrides merged in (schema-checked); the
    top-level node's interpolations (``label_subset_seed: ${seed}``) resolved first, while
    it is still part of the whole config."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return OmegaConf.merge(OmegaConf.structured(DataConfig), data, cfg.pipeline.stages[name].data)


def with_stage_kind_settings(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with ``stage_kind_settings.<kind>`` merged over every stage of that
    kind. A protocol (``protocol=few_label``) sets the finetune budget of every finetune stage
    of any pipeline this way; its values win over the stage's own, and each value it replaces
    is logged (change it through ``stage_kind_settings``)."""
    from distillery.stages.registry import stage_kinds  # the registry imports stage modules

    if not cfg.get("stage_kind_settings"):
        return cfg
    settings = OmegaConf.to_container(cfg.stage_kind_settings, resolve=True)
    if unknown := sorted(set(settings) - set(stage_kinds())):
        raise ConfigError(
            [f"stage_kind_settings.{kind}: no stage kind {kind!r} (known: {stage_kinds()})"
             for kind in unknown]
        )  # fmt: skip
    fields = {f.name for f in dataclasses.fields(StageConfig)}
    if bad := [
        f"{kind}.{key}" for kind, node in settings.items() for key in node if key not in fields
    ]:
        raise ConfigError(
            [
                f"stage_kind_settings.{key}: not a stage setting (one of {sorted(fields)})"
                for key in bad
            ]
        )
    cfg = copy.deepcopy(cfg)
    for name, stage in cfg.pipeline.stages.items():
        if stage.kind not in settings:
            continue
        with open_dict(cfg):  # a stage's trainer and module take any key
            merged = OmegaConf.merge(stage, settings[stage.kind])
            own, new = (OmegaConf.to_container(c) for c in (stage, merged))
            for key in changed_keys(own, new):
                if (old := OmegaConf.select(stage, key)) is not None:  # not newly added
                    log.info(
                        "pipeline.stages.%s.%s=%s replaced by stage_kind_settings.%s.%s=%s",
                        name, key, old, stage.kind, key, OmegaConf.select(merged, key),
                    )  # fmt: skip
            cfg.pipeline.stages[name] = merged
    return cfg


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


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


def config_problems(cfg: DictConfig, data_checks: DataCheck | None = None) -> list[str]:
    """Every problem of a composed config that the schema and ranges can tell, by key path.

    ``data_checks(data, path)`` looks at the data a valid data node names (the data layer's
    :func:`distillery.data.checks.check_data_files`, passed in from above).

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
    root = OmegaConf.to_container(cfg)
    problems += check_ranges(root, "", "", skip=("data.",))  # data: per stage, below
    problems += check_targets(OmegaConf.to_container(cfg.logger), "logger")
    trainer_args = OmegaConf.to_container(cfg.trainer)
    problems += check_call_args(pl.Trainer, trainer_args, "trainer", reserved=INJECTED_TRAINER_ARGS)
    problems += check_targets(trainer_args, "trainer")
    problems += check_trainer_values(trainer_args, "trainer")
    problems += check_trainer_values(OmegaConf.to_container(cfg.debug.trainer), "debug.trainer")
    data_problems = check_data(OmegaConf.to_container(cfg.data), "data", data_checks)
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
        problems += check_optimizers(module_args, f"{path}.module")
        problems += check_input_files(
            OmegaConf.to_container(stage.module, resolve=True), f"{path}.module"
        )
        callbacks = OmegaConf.to_container(stage.callbacks)
        problems += check_targets(callbacks, f"{path}.callbacks")
        problems += check_callback_values(callbacks, f"{path}.callbacks")
        problems += check_call_args(
            pl.Trainer,
            OmegaConf.to_container(stage.trainer),
            f"{path}.trainer",
            reserved=INJECTED_TRAINER_ARGS,
        )
        problems += check_trainer_values(OmegaConf.to_container(stage.trainer), f"{path}.trainer")
        problems += check_stage_length(cfg, name)
        problems += check_selection(OmegaConf.to_container(stage.selection), f"{path}.selection")
        try:  # report only what the stage's own data overrides add to the top-level problems
            stage_problems = check_data(
                OmegaConf.to_container(stage_data(cfg, name)), f"{path}.data", data_checks
            )
            problems += [
                p for p in stage_problems if p.replace(f"{path}.", "") not in data_problems
            ]
        except Exception as err:  # noqa: BLE001 - schema violation inside the stage override
            problems.append(f"{path}.data: {err}".splitlines()[0])
        problems += _check_cluster_counts(cfg, name, path)
    return list(dict.fromkeys(problems))  # shared nodes: reported once


def check_selection(selection: dict[str, Any], path: str) -> list[str]:
    """A stage selects its weights on its own validation split, never on the test split."""
    problems = []
    monitor, patience = selection.get("monitor"), selection.get("patience")
    if monitor is not None and not str(monitor).startswith("val/"):
        problems.append(
            f"{path}.monitor: {monitor!r} is not a validation metric; select on one of the "
            "stage's validation metrics, e.g. val/acc (the test split is evaluated once, on "
            "the selected weights)"
        )
    if selection.get("mode") not in ("max", "min"):
        problems.append(f"{path}.mode: must be 'max' or 'min', got {selection.get('mode')!r}")
    if patience is not None and (monitor is None or patience < 1):
        problems.append(
            f"{path}.patience: {patience} needs a monitor and must be >= 1 "
            "(validation epochs without improvement)"
        )
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
