"""The stage contract: what a stage class must provide, what it may declare, and its checks.

A stage is any ``LightningModule`` subclass (``pipeline.stages.<name>.module._target_``, or
a registered ``kind``). It **must** define ``training_step`` and ``configure_optimizers``,
and every constructor argument without a default must get a value from the config, from
``inputs`` or from the runner. It **may** declare (a plain ``LightningModule`` gets the
defaults, so it runs as a stage as it is):

- ``produces: dict[str, type[Artifact]]``: the artifacts it returns from
  ``export_artifacts()`` by name and kind (default: none besides the ``checkpoint``);
- ``encoder_for_eval() -> nn.Module | None``: the encoder the shared evaluation scores
  (default: none, no evaluation);
- ``export_artifacts() -> dict[str, Artifact]``: what the runner saves into the stage dir;
- ``configure_data(data: AudioDataModule) -> LightningDataModule``: the data it trains on
  (default: the shared ``AudioDataModule``, which is also what it is evaluated on);
- ``encoder_requirements: dict[str, tuple[str, ...]]``: attributes an encoder config
  argument must give (e.g. ``exit_dims`` for a multi-exit student), or, by the encoder's
  ``input_key``, a dict of them (``{"audio": ("frame_mask",)}``: waveform encoders only);
- ``refused_encoder_inputs: dict[str, dict[str, str]]``: per encoder config argument, the
  inputs (the encoder's ``input_key``: ``features`` = log-mel, ``audio`` = waveforms) the
  stage cannot feed, each with the reason (e.g. ``ssl``'s log-mel augmentations);
- constructor arguments the runner fills in when the signature names them: ``stage_name``,
  ``num_classes`` (of the data), ``multi_label`` (the data has several classes per clip:
  a stage that takes ``num_classes`` but not ``multi_label`` is refused on such data)
  and ``num_pseudo_classes`` (k of the ``data.pseudo_labels`` input);
- constructor arguments annotated with an artifact kind (``pretrained: EncoderArtifact |
  None``): ``inputs`` hands them an earlier stage's artifact, or the config a file path;
  the runner loads either into that kind.

Everything here is checked for every stage at start-up, before any stage trains.
:func:`validate` reports these problems together with the config's own
(:func:`distillery.config.validation.config_problems`).
"""

from __future__ import annotations

import inspect
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from distillery.artifact_kinds import Artifact, Checkpoint, PseudoLabels
from distillery.config.validation import (
    ConfigError,
    check_call_args,
    check_schema,
    check_stage_names,
    check_targets,
    config_problems,
)
from distillery.data.checks import check_data_files
from distillery.stages.base import lacking_attributes, refused_input
from distillery.stages.registry import stage_class, stage_kinds

__all__ = ["ConfigError", "StageContract", "validate"]

#: Constructor arguments the runner fills in itself; a config may not set them.
INJECTED_MODULE_ARGS = ("stage_name", "num_classes", "num_pseudo_classes", "multi_label")
#: ``data.<key>`` inputs the shared data module takes, and the kind each expects.
DATA_INPUTS: dict[str, type[Artifact]] = {"pseudo_labels": PseudoLabels}


def _overrides(cls: type, hook: str) -> bool:
    return getattr(cls, hook, None) is not getattr(pl.LightningModule, hook)


def artifact_kinds_of(annotation: Any) -> tuple[type[Artifact], ...]:
    """The artifact kinds an annotation names (``EncoderArtifact | None`` -> EncoderArtifact)."""
    if inspect.isclass(annotation):
        return (annotation,) if issubclass(annotation, Artifact) else ()
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(k for arg in typing.get_args(annotation) for k in artifact_kinds_of(arg))
    return ()


class StageContract:
    """What the runner knows of a stage class, with the contract's defaults filled in."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.params = {
            n: p
            for n, p in inspect.signature(cls).parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        self.any_kwargs = any(
            p.kind is p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values()
        )
        try:
            self.hints = typing.get_type_hints(cls.__init__)
        except Exception:  # noqa: BLE001 - unresolvable annotations: no kinds to check
            self.hints = {}

    @property
    def name(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    def produces(self) -> dict[str, type[Artifact]]:
        declared = getattr(self.cls, "produces", {})  # a malformed one is reported by problems()
        return {"checkpoint": Checkpoint} | (declared if isinstance(declared, dict) else {})

    def input_kinds(self, arg: str) -> tuple[type[Artifact], ...]:
        """The artifact kinds constructor argument ``arg`` is annotated with (may be none)."""
        return artifact_kinds_of(self.hints.get(arg))

    def artifact_args(self) -> dict[str, tuple[type[Artifact], ...]]:
        return {n: kinds for n in self.params if (kinds := self.input_kinds(n))}

    def injected(self, data: Any) -> dict[str, Any]:
        """The runner's constructor arguments this class takes, from the built data module."""
        values: dict[str, Any] = {}
        for name in INJECTED_MODULE_ARGS:
            if name in self.params:
                values[name] = getattr(data, name, None)
        if (
            getattr(data, "multi_label", False)
            and "num_classes" in values
            and "multi_label" not in values
        ):
            raise ValueError(
                f"{self.name} trains on one class per clip, but the data is multi-label (a "
                "manifest 'labels' column); use a stage that takes multi_label, e.g. finetune"
            )
        return values

    def problems(self, path: str) -> list[str]:
        """Pieces of the contract the class itself lacks (independent of any config)."""
        cls, missing = self.cls, []
        if not (inspect.isclass(cls) and issubclass(cls, pl.LightningModule)):
            return [f"{path}: {self.name} is not a LightningModule subclass"]
        for hook in ("training_step", "configure_optimizers"):
            if not _overrides(cls, hook):
                missing.append(f"{path}: {self.name} defines no {hook}()")
        produced = getattr(cls, "produces", {})
        if not isinstance(produced, dict) or not all(
            inspect.isclass(k) and issubclass(k, Artifact) for k in produced.values()
        ):
            missing.append(
                f"{path}: {self.name}.produces must map artifact names to kinds from "
                f"distillery.artifact_kinds, got {produced!r}"
            )
        return missing


# -- start-up checks -------------------------------------------------------------------------
def stage_contract(cfg: DictConfig, name: str) -> StageContract:
    stage = cfg.pipeline.stages[name]
    return StageContract(stage_class(stage.kind, stage.module))


def stage_produces(cfg: DictConfig, name: str) -> dict[str, type[Artifact]]:
    """Every artifact a stage's run yields: its class's and its callbacks' (e.g. pseudo-labels)."""
    stage = cfg.pipeline.stages[name]
    produced = stage_contract(cfg, name).produces()
    for callback in stage.callbacks.values():
        if callback and "_target_" in callback:
            produced |= dict(getattr(get_class(callback._target_), "produces", {}) or {})
    return produced


def _check_encoders(contract: StageContract, module: dict[str, Any], path: str) -> list[str]:
    """Encoder configs against the attributes and the input the stage needs, built on the
    meta device."""
    problems = []
    requirements = getattr(contract.cls, "encoder_requirements", {})
    refused = getattr(contract.cls, "refused_encoder_inputs", {})
    for arg in dict.fromkeys([*requirements, *refused]):
        encoder_cfg = module.get(arg)
        if not isinstance(encoder_cfg, dict) or "_target_" not in encoder_cfg:
            continue
        try:
            with torch.device("meta"), warnings.catch_warnings():  # only the structure
                # An encoder that reads its weights file copies it into meta tensors: a no-op.
                warnings.filterwarnings("ignore", message=".*to a meta parameter.*no-op")
                encoder = instantiate(encoder_cfg)
        except Exception as err:  # noqa: BLE001
            problems.append(f"{path}.module.{arg}: cannot build {encoder_cfg['_target_']} ({err})")
            continue
        if lacking := lacking_attributes(contract.cls, arg, encoder):
            problems.append(f"{path}.module.{arg}: {lacking}")
        if why := refused_input(contract.cls, arg, encoder):
            problems.append(f"{path}.module.{arg}: {why}")
    return problems


def _check_inputs(
    cfg: DictConfig, contract: StageContract, earlier: list[str], path: str
) -> list[str]:
    problems = []
    inputs = OmegaConf.to_container(cfg.pipeline.stages[path.rsplit(".", 1)[1]].inputs)
    for dest, source in inputs.items():
        target, _, arg = dest.partition(".")
        if target == "module":
            if arg not in contract.params and not contract.any_kwargs:
                allowed = ", ".join(n for n in contract.params if n not in INJECTED_MODULE_ARGS)
                problems.append(
                    f"{path}.inputs.{dest}: {contract.cls.__name__} has no constructor argument "
                    f"{arg!r} (arguments: {allowed})"
                )
                continue
            expected = contract.input_kinds(arg)
        elif target == "data":
            if arg not in DATA_INPUTS:
                problems.append(
                    f"{path}.inputs.{dest}: the data module takes no input {arg!r} "
                    f"(inputs: {', '.join('data.' + k for k in DATA_INPUTS)})"
                )
                continue
            expected = (DATA_INPUTS[arg],)
        else:
            problems.append(f"{path}.inputs.{dest}: must start with 'module.' or 'data.'")
            continue
        producer, _, artifact = str(source).partition(".")
        if producer not in earlier:
            problems.append(
                f"{path}.inputs.{dest}: {source!r} names stage {producer!r}, which does not run "
                f"before this one (earlier stages: {earlier})"
            )
            continue
        produced = stage_produces(cfg, producer)
        if artifact not in produced:
            problems.append(
                f"{path}.inputs.{dest}: stage {producer!r} produces no {artifact!r} "
                f"(it produces: {sorted(produced)})"
            )
        elif expected and not issubclass(produced[artifact], expected):
            names = " or ".join(k.__name__ for k in expected)
            problems.append(
                f"{path}.inputs.{dest}: {source!r} is a {produced[artifact].__name__}, "
                f"but {dest} takes a {names}"
            )
    return problems


def _check_stage(cfg: DictConfig, name: str, earlier: list[str]) -> list[str]:
    path = f"pipeline.stages.{name}"
    stage = cfg.pipeline.stages[name]
    try:
        contract = stage_contract(cfg, name)
    except KeyError:
        return [f"{path}.kind: unknown stage kind {stage.kind!r} (known: {stage_kinds()})"]
    except Exception as err:  # noqa: BLE001
        return [f"{path}.module._target_: cannot import ({err})"]
    problems = contract.problems(f"{path}.module")
    if problems and not issubclass(contract.cls, pl.LightningModule):
        return problems
    module = OmegaConf.to_container(stage.module)
    inputs = OmegaConf.to_container(stage.inputs)
    problems += check_call_args(
        contract.cls, module, f"{path}.module", reserved=INJECTED_MODULE_ARGS
    )
    problems += check_targets(module, f"{path}.module")
    wired = {dest.partition(".")[2] for dest in inputs if dest.startswith("module.")}
    for arg, param in contract.params.items():
        given = module.get(arg) is not None or arg in wired or arg in INJECTED_MODULE_ARGS
        if param.default is inspect.Parameter.empty and not given:
            problems.append(
                f"{path}.module.{arg}: required by {contract.cls.__name__}; set it in the config "
                f"or wire it through {path}.inputs"
            )
    if "num_pseudo_classes" in contract.params and "data.pseudo_labels" not in inputs:
        problems.append(
            f"{path}.inputs: {contract.cls.__name__} trains on pseudo-labels; wire "
            "data.pseudo_labels to an earlier stage's pseudo_labels"
        )
    try:
        resolved = OmegaConf.to_container(stage.module, resolve=True)
    except Exception as err:  # noqa: BLE001 - a broken interpolation
        problems.append(f"{path}.module: {err}".splitlines()[0])
        resolved = {}
    for arg in contract.artifact_args():  # artifacts given as file paths in the config
        value = resolved.get(arg)
        if isinstance(value, str) and f"module.{arg}" not in inputs and not Path(value).exists():
            problems.append(f"{path}.module.{arg}: file {value} does not exist")
    problems += _check_encoders(contract, resolved, path)
    problems += _check_inputs(cfg, contract, earlier, path)
    return problems


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of a composed config and its stages."""
    if schema := check_schema(cfg):  # the checks below assume the schema's shape
        raise ConfigError(schema)
    if names := check_stage_names(cfg):  # the checks below use stage names in key paths
        raise ConfigError(names)
    problems = config_problems(cfg, check_data_files)
    order = [n for n in cfg.pipeline.order if n in cfg.pipeline.stages]
    for position, name in enumerate(order):
        problems += _check_stage(cfg, name, order[:position])
    if problems:
        raise ConfigError(problems)
