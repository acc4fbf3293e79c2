"""Structured config schema: the typed shape every composed config must have.

Registered in Hydra's ConfigStore as ``distillery_schema`` and used as the first entry of
``conf/config.yaml``'s defaults list, so an unknown key or a wrong type fails at composition
time with the key's full path. Free-form nodes (``module``, ``trainer``, ``logger``,
``callbacks``) are checked against the signatures of their ``_target_`` classes by
:mod:`distillery.config.validation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from distillery.config import run_stamp  # noqa: F401 - registers ${run_stamp:...}


@dataclass
class FeatureConfig:
    """Log-mel front-end, computed on the accelerator after batch transfer."""

    n_mels: int = 64
    n_fft: int = 400  # 25 ms at 16 kHz
    hop_length: int = 160  # 10 ms at 16 kHz
    f_min: float = 60.0
    f_max: float = 7800.0


@dataclass
class SyntheticConfig:
    """Built-in generator of parametric sound classes (see distillery.data.synthetic)."""

    num_classes: int = 8
    clips_per_class: int = 100
    seed: int = 0
    snr_db_min: float = 0.0
    snr_db_max: float = 20.0


#: The default words of the built-in speech set (Speech Commands' ten command words).
SPEECH_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


@dataclass
class SpeechConfig:
    """Built-in spoken words synthesised by espeak-ng (see distillery.data.speech)."""

    words: list[str] = field(default_factory=lambda: list(SPEECH_WORDS))
    speakers: int = 12
    clips_per_word: int = 3  # per speaker
    val_speakers: int = 2  # speaker-disjoint splits: data.val/test_fraction do not apply
    test_speakers: int = 2
    seed: int = 0
    snr_db_min: float = 5.0
    snr_db_max: float = 30.0
    rate_wpm: list[float] = field(default_factory=lambda: [130.0, 220.0])
    pitch: list[float] = field(default_factory=lambda: [25.0, 75.0])


@dataclass
class DataConfig:
    #: synthetic | speech | folder | manifest, or the import path of a user's function that
    #: returns a ``distillery.data.sources.SourceTable``, called with ``source_args``.
    source: str = "synthetic"
    source_args: dict[str, Any] = field(default_factory=dict)
    root: str | None = None  # folder source: class-per-subfolder root
    path: str | None = None  # manifest source: CSV or JSONL file
    cache_dir: str = ".cache/distillery"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    sample_rate: int = 16000
    clip_seconds: float = 1.0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    label_fraction: float = 1.0  # fraction of train labels kept (stratified, seeded)
    #: Labelled validation clips kept per class (the rest become unlabelled training
    #: clips), so that validation uses no more labels than a few-label user has; null: all.
    val_labels_per_class: int | None = None
    #: Seed of the labelled subsets (label_fraction, val_labels_per_class); null: split_seed,
    #: the same subset for every run. ``${seed}`` draws one per seed.
    label_subset_seed: int | None = None
    train_items: str = "all"  # all | labeled | pseudo_labeled
    #: The class list, in label-index order; a label outside it is a bad file. Default:
    #: the folder names, or a manifest's labels (only its train rows' when it has splits).
    classes: list[str] | None = None
    batch_size: int = 64
    num_workers: int = 0
    #: Decode every clip once into memory at setup (val/test: their centre crop), or read
    #: each clip when a batch needs it (memory per process does not grow with the data).
    #: null: preload when the decoded clips fit in ``preload_max_mb`` per process.
    preload: bool | None = None
    preload_max_mb: float = 1024.0
    #: At most this many clips of the source, the same number from each (split, label)
    #: group in turn (``debug=smoke`` sets it); None = all.
    max_clips: int | None = None
    #: A header outside these is a bad file: its sample rate (Hz) or duration (seconds).
    min_sample_rate: int = 4000
    max_sample_rate: int = 192000
    max_clip_seconds: float = 600.0
    on_bad_file: str = (
        "error"  # error | skip: bad files listed in one error before training, or left out
    )
    features: FeatureConfig = field(default_factory=FeatureConfig)


@dataclass
class SelectionConfig:
    """Which weights a stage hands on and is tested with: the best on a validation metric.

    ``monitor`` is one of the stage's own validation metrics without the stage prefix
    (``val/acc`` for ``<stage>/val/acc``); null keeps the last epoch's weights.
    """

    monitor: str | None = None
    mode: str = "max"  # max | min
    #: Validation epochs without improvement before the stage stops early; null: never.
    patience: int | None = None


@dataclass
class StageConfig:
    """One stage of a pipeline.

    ``kind`` is a registered short name (``finetune``, ``ssl``, ...); ``module`` holds the
    stage module's constructor arguments (``_target_`` optional, defaults to the class
    registered for ``kind``). ``data`` and ``trainer`` override the top-level nodes for this
    stage only. ``inputs`` maps ``module.<arg>`` or ``data.<key>`` to ``<stage>.<artifact>``
    of an earlier stage.
    """

    kind: str = MISSING
    module: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    evaluate: bool = True
    selection: SelectionConfig = field(default_factory=SelectionConfig)


@dataclass
class PipelineConfig:
    name: str = MISSING
    order: list[str] = MISSING
    stages: dict[str, StageConfig] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Shared evaluation of every stage that yields an encoder."""

    knn_k: list[int] = field(default_factory=lambda: [10, 20])
    probe_epochs: int = 100
    plots: bool = True


@dataclass
class DebugConfig:
    """Trainer settings forced on every stage (e.g. ``debug=smoke``)."""

    name: str | None = None
    trainer: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    run_dir: str = MISSING
    seed: int = 0
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    experiment_name: str | None = None
    #: ``<stage>/<split>/<name>`` returned to a Hydra sweeper (e.g. Optuna) after the run.
    optimized_metric: str | None = None
    #: Settings merged over every stage of a kind, winning over the stage's own: kind ->
    #: a partial stage node (e.g. ``finetune: {trainer: {max_steps: 300}}``). Protocols
    #: (``protocol=few_label``) set it, so they apply to any pipeline's stages of that kind.
    stage_kind_settings: dict[str, Any] = field(default_factory=dict)
    #: A directory of finished stages shared between runs (sweep trials): a stage whose
    #: config (chained to the stages before it) and code match an entry is reused, not
    #: computed (distillery.pipeline.stage_cache); null: off.
    stage_cache: str | None = None
    #: Stages in ``run_dir`` made by another code version: error | rerun | reuse.
    on_code_change: str = "error"
    #: Minutes the other DDP ranks wait while rank 0 alone clusters, evaluates and exports
    #: (every other collective times out after ``trainer.strategy.timeout``).
    rank_zero_wait_min: float = 120
    #: The pseudo-labeler's k where a stage does not set its own (conf/callback/
    #: pseudo_labeler.yaml); debug=smoke lowers it to fit its tiny data.
    pseudo_label_k: int = 64


def register_configs() -> None:
    """Register the schema so ``conf/config.yaml`` can list it first in its defaults."""
    ConfigStore.instance().store(name="distillery_schema", node=Config)
