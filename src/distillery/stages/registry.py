"""Short names of stage kinds, so configs and W&B say ``finetune``, not a class path."""

from __future__ import annotations

from hydra.utils import get_class

_STAGE_KINDS: dict[str, str] = {
    "finetune": "distillery.stages.finetune.FinetuneStage",
    "ssl": "distillery.stages.ssl.SSLStage",
    "self_distill": "distillery.stages.self_distill.SelfDistillStage",
    "partial_label_sd": "distillery.stages.partial_label_sd.PartialLabelSDStage",
    "coss_kd": "distillery.stages.coss_kd.CoSSDistillStage",
    "prune_distill": "distillery.stages.prune_distill.PruneDistillStage",
    "final_distill": "distillery.stages.final_distill.FinalDistillStage",
    "dataset_distill": "distillery.stages.dataset_distill.DatasetDistillStage",
    "pretrain_synthetic": "distillery.stages.pretrain_synthetic.PretrainSyntheticStage",
    "pseudo_label": "distillery.stages.pseudo_label.PseudoLabelStage",
}


def register_stage(kind: str, target: str) -> None:
    """Make ``kind`` usable in ``pipeline.stages.<name>.kind`` (e.g. from a plugin package)."""
    _STAGE_KINDS[kind] = target


def stage_kinds() -> list[str]:
    return sorted(_STAGE_KINDS)


def stage_target(kind: str, module_cfg: dict | None = None) -> str:
    """The class path for a stage: ``module._target_`` if given, else the registered kind."""
    if module_cfg and module_cfg.get("_target_"):
        return str(module_cfg["_target_"])
    if kind not in _STAGE_KINDS:
        raise KeyError(kind)
    return _STAGE_KINDS[kind]


def stage_class(kind: str, module_cfg: dict | None = None) -> type:
    return get_class(stage_target(kind, module_cfg))
