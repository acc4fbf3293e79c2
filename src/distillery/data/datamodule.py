"""The LightningDataModule every stage uses: one audio source, split, subset, batched."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import track
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from distillery.config.schema import DataConfig
from distillery.data.audio_io import AudioFileError, AudioLimits, read_audio
from distillery.data.features import LogMel
from distillery.data.index import FileIndex, build_index
from distillery.data.sources import SourceTable, limit_clips, load_source
from distillery.data.speech import SpeechSpec
from distillery.data.splits import assign_splits, label_subset, per_class_subset
from distillery.data.synthetic import SyntheticSpec

if TYPE_CHECKING:  # the artifact kinds build on the data layer, not the other way round
    from distillery.artifact_kinds import PseudoLabels

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TRAIN_ITEMS = ("all", "labeled", "pseudo_labeled")
NORM_STATS_CLIPS = 256


def as_data_config(cfg: DataConfig | DictConfig | dict[str, Any]) -> DataConfig:
    """Validate a data node against the schema and return the typed object."""
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)
    return OmegaConf.to_object(merged)


def centre_crop(audio: np.ndarray, num_samples: int) -> np.ndarray:
    """The middle ``num_samples`` of ``audio`` (all of it when shorter): what evaluation reads."""
    start = max(0, len(audio) - num_samples) // 2
    return audio[start : start + num_samples]


class TrainSampler(DistributedSampler):
    """Shuffles per epoch from (seed, epoch), one shard per rank (one replica outside DDP).

    Items are ``(seed, epoch, i)`` keys: :class:`ClipDataset` draws the clip's random crop
    from them, so the data of an epoch is a function of the seed and the epoch alone, not
    of the process, the worker or how many draws came before (a resumed stage reads
    exactly what an uninterrupted one would).

    ``resume_at = (epoch, consumed)``: the first pass over ``epoch`` skips the ``consumed``
    items this rank had already trained on when a mid-epoch checkpoint was saved, so the
    resumed epoch reads only the batches the interrupted one had not.
    """

    resume_at: tuple[int, int] | None = None

    def epoch_items(self) -> list[int]:
        """This rank's dataset positions for ``self.epoch``, in reading order."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        items = self.epoch_items()
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            items = items[self.resume_at[1] :]
            self.resume_at = None
        return ((self.seed, self.epoch, i) for i in items)


class ShardTrainSampler(TrainSampler):
    """:class:`TrainSampler` of a sharded source (``data.source=shards``): reads shard by
    shard. Each epoch shuffles the order of the shards and of the clips within each shard
    (from the seed and the epoch), and rank r takes the r-th of ``num_replicas`` equal
    contiguous parts of that sequence: a rank reads whole shards (at most two of them in
    part) and no clip is read by two ranks. When the clips do not split evenly, the
    ``n mod num_replicas`` at the end of the sequence sit that epoch out (different ones
    each epoch), as with ``DistributedSampler(drop_last=True)``: no clip is duplicated.

    ``shards``: each dataset position's shard (any hashable name).
    """

    def __init__(
        self, dataset: Dataset, shards: list[str], num_replicas: int, rank: int, seed: int
    ) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        names, shard_of = np.unique(np.array(shards), return_inverse=True)
        self.groups = [np.flatnonzero(shard_of == g) for g in range(len(names))]

    def epoch_items(self) -> list[int]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.groups))
        sequence = np.concatenate([rng.permutation(self.groups[g]) for g in order])
        start = self.rank * self.num_samples
        return sequence[start : start + self.num_samples].tolist()


class ClipDataset(Dataset):
    """Items are dicts: ``index`` (into the source table), ``audio`` (samples,), ``length``
    (its valid samples: fewer than ``num_samples`` for a zero-padded short clip), ``label``,
    ``pseudo_label`` when pseudo-labels are attached, and with ``num_classes`` (a
    multi-label source) ``targets``: the (num_classes,) multi-hot float vector of the
    clip's classes, all zero when its label is hidden or unknown. Training crops are random (from
    the ``(seed, epoch, i)`` key of a :class:`TrainSampler`, else torch's global RNG),
    evaluation crops are the clip's centre, so evaluation is deterministic."""

    def __init__(
        self,
        indices: np.ndarray,
        source: SourceTable,
        labels: np.ndarray,
        num_samples: int,
        sample_rate: int,
        *,
        train: bool,
        cache: dict[int, np.ndarray] | None,
        limits: AudioLimits,
        pseudo_labels: np.ndarray | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.indices = indices
        self.source = source
        self.labels = labels
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.train = train
        self.cache = cache
        self.limits = limits
        self.pseudo_labels = pseudo_labels
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def _audio(self, index: int) -> np.ndarray:
        if self.cache is not None:
            return self.cache[index]
        try:
            source = self.source
            return read_audio(
                source.path(index), self.sample_rate, self.limits, source.member(index)
            )
        except AudioFileError as err:  # what a header check cannot see, e.g. NaN samples
            raise AudioFileError(
                err.path,
                f"{err.reason} (found when first read: with data.preload=false, or null on a "
                "set larger than data.preload_max_mb, only headers are checked before "
                "training; data.preload=true or data.on_bad_file=skip decodes every file at "
                "start-up)",
            ) from err

    def _fixed_length(self, audio: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        excess = len(audio) - self.num_samples
        if excess < 0:
            return np.pad(audio, (0, -excess))
        if not self.train:
            return centre_crop(audio, self.num_samples)
        start = (
            int(rng.integers(0, excess + 1))
            if rng
            else int(torch.randint(0, excess + 1, ()).item())
        )
        return audio[start : start + self.num_samples]

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict[str, Any]:
        rng = None
        if isinstance(key, tuple):  # (seed, epoch, i) from a TrainSampler
            seed, epoch, key = key
            rng = np.random.default_rng((seed, epoch, int(self.indices[key])))
        index = int(self.indices[key])
        audio = self._audio(index)
        item = {
            "index": index,
            "audio": torch.from_numpy(np.ascontiguousarray(self._fixed_length(audio, rng))),
            "length": min(len(audio), self.num_samples),  # valid samples before zero-padding
            "label": int(self.labels[index]),
        }
        if self.pseudo_labels is not None:
            item["pseudo_label"] = int(self.pseudo_labels[index])
        if self.num_classes is not None:
            item["targets"] = torch.from_numpy(
                multi_hot(self.source, self.labels, np.array([index]), self.num_classes)[0]
            )
        return item


def multi_hot(
    source: SourceTable, labels: np.ndarray, indices: np.ndarray, num_classes: int
) -> np.ndarray:
    """(len(indices), num_classes) float32 multi-hot targets of a multi-label source; rows
    whose ``labels`` entry is -1 (unknown, or hidden by ``data.label_fraction``) are zero."""
    targets = np.zeros((len(indices), num_classes), dtype=np.float32)
    for row, index in enumerate(indices):
        if labels[index] >= 0:
            targets[row, list(source.label_set(index))] = 1.0
    return targets


@dataclass
class SplitTable:
    """The resolved data set: every record's split and the labels a stage may see."""

    source: SourceTable
    splits: np.ndarray  # (n,) of "train" | "val" | "test"
    true_labels: np.ndarray  # (n,) int64, -1 unknown
    visible_labels: np.ndarray  # true labels with train labels outside label_fraction -> -1

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)


def resolve_splits(source: SourceTable, cfg: DataConfig) -> SplitTable:
    true_labels = source.labels.copy()
    splits = source.splits()
    if splits is None:
        splits = assign_splits(true_labels, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    visible = true_labels.copy()
    subset_seed = cfg.split_seed if cfg.label_subset_seed is None else cfg.label_subset_seed
    train = np.flatnonzero(splits == "train")
    labeled_train = train[true_labels[train] >= 0]
    if cfg.label_fraction < 1.0 and len(labeled_train):
        keep = labeled_train[
            label_subset(true_labels[labeled_train], cfg.label_fraction, subset_seed)
        ]
        hidden = np.setdiff1d(labeled_train, keep)
        visible[hidden] = -1
    if cfg.val_labels_per_class is not None:
        # A few-label user has few labelled validation clips too: the rest of the
        # validation split are unlabelled training clips.
        val = np.flatnonzero(splits == "val")
        labeled_val = val[true_labels[val] >= 0]
        keep = labeled_val[
            per_class_subset(true_labels[labeled_val], cfg.val_labels_per_class, subset_seed)
        ]
        moved = np.setdiff1d(labeled_val, keep)
        splits[moved], visible[moved] = "train", -1
    return SplitTable(source, splits, true_labels, visible)


class AudioDataModule(pl.LightningDataModule):
    """Audio clips from one source (``synthetic``, ``speech``, ``folder`` or ``manifest``).

    ``train_items`` picks the training items: ``all`` (unlabeled use), ``labeled`` (the
    ``label_fraction`` subset) or ``pseudo_labeled`` (items with a label in
    ``pseudo_labels``, an int64 array over the source's records, -1 = none).
    """

    def __init__(
        self,
        cfg: DataConfig | DictConfig | dict[str, Any],
        *,
        pseudo_labels: PseudoLabels | None = None,
    ) -> None:
        super().__init__()
        self.cfg = as_data_config(cfg)
        self.attached_pseudo_labels = pseudo_labels
        self.num_samples = round(self.cfg.clip_seconds * self.cfg.sample_rate)
        self.limits = AudioLimits(
            self.cfg.min_sample_rate, self.cfg.max_sample_rate, self.cfg.max_clip_seconds
        )
        self._source: SourceTable | None = None
        self._index: FileIndex | None = None
        self.table: SplitTable | None = None
        self.cache: dict[int, np.ndarray] | None = None
        self.pseudo_labels: np.ndarray | None = None
        self.features: LogMel | None = None
        self.skipped_files: list[str] = []
        self.preload: bool | None = None  # data.preload, or what null chose (at setup)
        self._train_resume_at: tuple[int, int] | None = None

    # -- set-up ---------------------------------------------------------------------------
    def _load_source(self) -> SourceTable:
        if self._source is None:
            self._source = self._read_source()
        return self._source

    def _read_source(self) -> SourceTable:
        cfg = self.cfg
        spec = SyntheticSpec(
            **dataclasses.asdict(cfg.synthetic),
            sample_rate=cfg.sample_rate,
            clip_seconds=cfg.clip_seconds,
        )
        speech = None
        if cfg.source == "speech":  # its spec checks its values, so only when used
            speech = SpeechSpec(
                **dataclasses.asdict(cfg.speech),
                sample_rate=cfg.sample_rate,
                clip_seconds=cfg.clip_seconds,
            )
        table = load_source(
            cfg.source,
            root=cfg.root,
            path=cfg.path,
            cache_dir=cfg.cache_dir,
            synthetic=spec,
            speech=speech,
            classes=cfg.classes,
            source_args=cfg.source_args,
        )
        return table if cfg.max_clips is None else limit_clips(table, cfg.max_clips)

    def _file_index(self) -> FileIndex:
        """Every record's header entry, from the shared index under ``data.cache_dir``."""
        if self._index is None:
            source = self._load_source()
            self._index = build_index(source.paths, self.cfg.cache_dir, source.members)
        return self._index

    def prepare_data(self) -> None:
        # Runs once per node before setup: generates the synthetic set if it is not cached
        # and builds the header index, which the other ranks then read from the cache.
        self._file_index()

    def setup(self, stage: str | None = None) -> None:
        if self.table is not None:
            return
        self.table = resolve_splits(self._load_source(), self.cfg)
        if self.attached_pseudo_labels is not None:
            self.pseudo_labels = self._check_pseudo_labels(self.attached_pseudo_labels)
        self.cache = self._check_files()
        self.features = self._fit_features()
        counts = {s: len(self.table.indices(s)) for s in SPLITS}
        log.info(
            "data: %d clips from %s (%s), %d classes, train items: %d",
            len(self.table.source),
            self.cfg.source,
            counts,
            len(self.class_names),
            len(self.train_indices()),
        )

    def _check_pseudo_labels(self, pseudo: PseudoLabels) -> np.ndarray:
        n = len(self.table.source)
        if pseudo.labels.shape != (n,):
            raise ValueError(
                f"pseudo-labels have shape {pseudo.labels.shape}, expected ({n},) — one per "
                "record of the data source; were they computed on a different data set?"
            )
        return pseudo.labels

    def _check_files(self) -> dict[int, np.ndarray] | None:
        """Check every file before training; returns the preloaded clips with ``preload``.

        Found here, all together: the source's problems (missing files, labels outside the
        class list), every file whose header the index (:mod:`distillery.data.index`)
        rejects or finds outside the rate and duration limits, and every file
        :func:`read_audio` rejects. With
        ``preload`` or ``on_bad_file=skip`` each file is decoded, which also finds NaN/Inf
        samples and damaged compressed streams (e.g. a truncated FLAC); with
        ``preload=false`` and ``on_bad_file=error`` only headers are read (fast), and those
        two show up when the clip is first read, in an error naming the file.

        Preloaded val/test clips keep only their centre crop, all that evaluation reads,
        so long recordings cost memory only where random training crops need them.
        """
        source, splits, cfg = self.table.source, self.table.splits, self.cfg
        bad = dict(self.table.source.problems)
        index = self._file_index()
        self.preload = self._choose_preload(index) if cfg.preload is None else cfg.preload
        decode = self.preload or cfg.on_bad_file == "skip"
        cache: dict[int, np.ndarray] = {}
        short = 0
        for i in track(range(len(source)), description="checking audio", transient=True):
            if i in bad:
                continue
            try:
                path = source.path(i)
                index[i].check(path, self.limits)
                if decode:
                    audio = read_audio(path, cfg.sample_rate, self.limits, source.member(i))
                    length = len(audio)
                else:
                    length = round(index[i].frames / index[i].sample_rate * cfg.sample_rate)
            except AudioFileError as err:
                bad[i] = str(err)
                continue
            short += length < self.num_samples
            if self.preload:  # val/test: a copy of the crop, so the full recording is freed
                crop = splits[i] != "train"
                cache[i] = centre_crop(audio, self.num_samples).copy() if crop else audio
        if short:
            log.info("data: %d clip(s) shorter than %g s are zero-padded", short, cfg.clip_seconds)
        self._leave_out(bad)
        return cache if self.preload else None

    def _choose_preload(self, index: FileIndex) -> bool:
        """``data.preload=null``: preload when the decoded clips (float32 at the target rate;
        val/test their centre crop) fit in ``data.preload_max_mb``."""
        ok = index.sample_rate > 0  # a bad header has rate 0
        lengths = np.round(index.frames[ok] / index.sample_rate[ok] * self.cfg.sample_rate)
        train = self.table.splits[ok] == "train"
        samples = np.where(train, lengths, np.minimum(lengths, self.num_samples)).sum()
        megabytes = float(samples) * 4 / 2**20
        preload = megabytes <= self.cfg.preload_max_mb
        log.info(
            "data: decoded clips take %.0f MB; %s (data.preload_max_mb=%g)",
            megabytes,
            "preloading them" if preload else "reading each clip when a batch needs it",
            self.cfg.preload_max_mb,
        )
        return preload

    def _leave_out(self, bad: dict[int, str]) -> None:
        """Raise one error listing every bad file (``on_bad_file=error``), or take them out
        of every split and count them in ``skipped_files`` (``on_bad_file=skip``). The other
        clips keep their dataset indices, so pseudo-labels stay aligned."""
        if not bad:
            return
        listing = [bad[i] for i in sorted(bad)]
        train_bad = [bad[i] for i in sorted(bad) if self.table.splits[i] == "train"]
        if self.cfg.on_bad_file == "error":
            raise AudioFileError(
                f"{len(bad)} bad audio file(s) (fix or remove them, or set data.on_bad_file=skip "
                "to leave them out):\n  " + "\n  ".join(listing)
            )
        self.table.splits = self.table.splits.astype("<U7")  # room for "skipped"
        self.table.splits[sorted(bad)] = "skipped"
        self.skipped_files = listing
        log.warning(
            "data: skipped %d bad audio file(s) (data.on_bad_file=skip), e.g.\n  %s",
            len(bad),
            "\n  ".join(listing[:3]),
        )
        if train_bad and not len(self.table.indices("train")):
            raise AudioFileError(
                f"data.on_bad_file=skip left no train clips: all {len(train_bad)} train files "
                f"are bad, e.g. {train_bad[0]}"
            )

    def _fit_features(self) -> LogMel:
        f = self.cfg.features
        features = LogMel(self.cfg.sample_rate, f.n_mels, f.n_fft, f.hop_length, f.f_min, f.f_max)
        train = self.table.indices("train")
        rng = np.random.default_rng(self.cfg.split_seed)
        sample = rng.choice(train, size=min(NORM_STATS_CLIPS, len(train)), replace=False)
        dataset = self._dataset(np.sort(sample), train=False)
        audio = torch.stack([dataset[i]["audio"] for i in range(len(dataset))])
        with torch.no_grad():  # summed in float64: alike for any thread count (and rank)
            values = features.log_mel(audio).double()
        features.mean, features.std = values.mean().item(), values.std().item() + 1e-5
        return features

    # -- items ----------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return self.table.source.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def multi_label(self) -> bool:
        """Whether clips have several classes (a manifest ``labels`` column): items carry
        multi-hot ``targets`` and classifiers train with a sigmoid per class."""
        return self.table.source.multi_label

    def multi_hot(self, indices: np.ndarray) -> np.ndarray:
        """The visible multi-hot targets of records ``indices`` (see :func:`multi_hot`)."""
        table = self.table
        return multi_hot(table.source, table.visible_labels, indices, self.num_classes)

    @property
    def num_pseudo_classes(self) -> int:
        """k of the attached pseudo-labels."""
        if self.attached_pseudo_labels is None:
            raise ValueError("no pseudo-labels attached: set inputs.data.pseudo_labels")
        return self.attached_pseudo_labels.k

    def train_indices(self) -> np.ndarray:
        train = self.table.indices("train")
        if self.cfg.train_items == "labeled":
            return train[self.table.visible_labels[train] >= 0]
        if self.cfg.train_items == "pseudo_labeled":
            if self.pseudo_labels is None:
                raise ValueError("data.train_items=pseudo_labeled needs data.pseudo_labels")
            return train[self.pseudo_labels[train] >= 0]
        return train

    def split_indices(self, split: str) -> np.ndarray:
        return self.train_indices() if split == "train" else self.table.indices(split)

    def _dataset(self, indices: np.ndarray, *, train: bool) -> ClipDataset:
        return ClipDataset(
            indices,
            self.table.source,
            self.table.visible_labels,
            self.num_samples,
            self.cfg.sample_rate,
            train=train,
            cache=self.cache,
            limits=self.limits,
            pseudo_labels=self.pseudo_labels,
            num_classes=self.num_classes if self.multi_label else None,
        )

    def dataloader(
        self,
        split: str,
        *,
        train: bool = False,
        indices: np.ndarray | None = None,
        sharded: bool = False,
    ) -> DataLoader:
        """A loader over ``split`` (or explicit ``indices``); ``train`` shuffles and crops randomly.

        ``sharded``: under DDP, this rank's part only. Training uses a :class:`TrainSampler`
        (shuffled per epoch, equal shard sizes); evaluation takes a strided shard without
        padding, so no clip is counted twice in validation or test metrics.
        """
        indices = self.split_indices(split) if indices is None else indices
        dataset = self._dataset(indices, train=train)
        sampler = self._shard_sampler(dataset, train) if sharded else None
        # A ragged last training batch is dropped only when this rank has a full one: the
        # decision is per rank (its shard), or a small labelled split trains on nothing.
        per_rank = len(sampler) if isinstance(sampler, TrainSampler) else len(indices)
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and per_rank > self.cfg.batch_size,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def _shard_sampler(self, dataset: ClipDataset, train: bool) -> Sampler | None:
        trainer = self.trainer
        world, rank = (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)
        if train:
            # Same seed on every rank (all ranks are seeded alike), different per run seed.
            seed = torch.initial_seed() % 2**31
            if self.cfg.source == "shards":
                source = self.table.source
                shards = [str(source.path(i).parent) for i in dataset.indices]
                sampler = ShardTrainSampler(dataset, shards, world, rank, seed)
            else:
                sampler = TrainSampler(dataset, world, rank, shuffle=True, seed=seed)
            sampler.resume_at = self._train_resume_at
            return sampler
        if len(dataset) < world:  # a process without a batch would wait forever in the metric sync
            raise ValueError(
                f"data: an evaluation split has {len(dataset)} clips, fewer than the {world} "
                "processes; each needs at least one (raise data.val_fraction / data.test_fraction "
                "or use fewer devices)"
            )
        return None if world == 1 else list(range(rank, len(dataset), world))

    # -- the train sampler's position, carried in checkpoints --------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Mid-epoch only: where training is in its epoch (epoch, items this rank has
        trained on). A checkpoint of a finished epoch needs none: the next one starts afresh.

        Counted from the batches the fit loop has processed, not from the sampler's
        iterator, which the loader has read ahead of training.
        """
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return {}
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if not 0 < batches < trainer.num_training_batches:
            return {}
        return {"train_position": [trainer.current_epoch, batches * self.cfg.batch_size]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if position := state_dict.get("train_position"):
            self._train_resume_at = (int(position[0]), int(position[1]))

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", train=True, sharded=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val", sharded=True)

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test", sharded=True)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        # Log-mel runs wherever the batch now lives (the accelerator, when there is one).
        batch["features"] = self.featurize(batch["audio"])
        return batch

    def featurize(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, samples) waveforms -> (B, 1, n_mels, frames) normalised log-mel, computed in
        float32 and returned in the waveforms' dtype (the trainer's precision converts the
        batch before this, e.g. to float64 under ``precision: 64-true``)."""
        self.features.to(audio.device)
        with torch.no_grad():
            return self.features(audio.float()).to(audio.dtype)
