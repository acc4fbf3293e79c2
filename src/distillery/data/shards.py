"""Sharded sets: uncompressed tar shards in the WebDataset layout.

Each clip is two members with one key: ``<key>.<ext>`` (the audio file's bytes as they
were: wav, flac, ogg or mp3) and ``<key>.json`` (``{"label": name}`` or, multi-label,
``{"labels": [names]}``, plus ``"split"`` and the ``"source"`` file it came from). Any
WebDataset pipeline reads these shards; ``distillery-data shards`` writes them
(:func:`write_shards`) from a folder or manifest, ``split-NNNNNN.tar`` per split.

``data.source=shards data.path=<folder>`` (:func:`scan_shards`) reads the member list of
every ``*.tar`` in the folder (headers only) and each clip's JSON; a clip's record is
``<tar>/<member name>`` with the member's ``(offset, size)``, so the header index and
random access for evaluation read the bytes in place. Training reads shard by shard
(:class:`distillery.data.datamodule.ShardTrainSampler`).
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import webdataset

from distillery import artifacts
from distillery.data.sources import (
    AUDIO_EXTENSIONS,
    LabelledClip,
    SourceTable,
    labelled_table,
    row_labels,
)

__all__ = ["scan_shards", "write_shards"]

log = logging.getLogger(__name__)

_AUDIO = {ext.lstrip(".") for ext in AUDIO_EXTENSIONS}


def shard_files(root: str | os.PathLike[str]) -> list[Path]:
    """The ``*.tar`` files of folder ``root``, sorted by name."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"shard folder {str(root)!r} does not exist or is not a directory")
    tars = sorted(root.glob("*.tar"))
    if not tars:
        raise ValueError(f"shard folder {str(root)!r} holds no .tar files")
    return tars


def _open_shard(tar: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(tar, "r:")  # uncompressed: members are read in place
    except tarfile.ReadError as err:
        raise ValueError(f"{tar}: not an uncompressed tar file ({err})") from None


def _clips_of(tar: Path) -> list[tuple[str, tarfile.TarInfo, dict]]:
    """``(key, audio member, json)`` of every clip of one shard, in member order."""
    audio: dict[str, tarfile.TarInfo] = {}
    meta: dict[str, dict] = {}
    with _open_shard(tar) as archive:
        for member in archive.getmembers():
            if not member.isfile():
                continue
            folder, base = os.path.split(member.name)
            stem, _, ext = base.partition(".")  # WebDataset: the key ends at the first dot
            key = f"{folder}/{stem}" if folder else stem
            if ext.lower() in _AUDIO:
                if key in audio:
                    raise ValueError(f"{tar}: clip {key!r} has two audio members")
                audio[key] = member
            elif ext.lower() == "json":
                try:
                    meta[key] = json.loads(archive.extractfile(member).read())
                except ValueError as err:
                    raise ValueError(f"{tar}: member {member.name}: invalid JSON ({err})") from None
    orphans = sorted(set(meta) - set(audio))
    if orphans:
        raise ValueError(f"{tar}: clip {orphans[0]!r} has a .json but no audio member")
    return [(key, info, meta.get(key, {})) for key, info in audio.items()]


def scan_shards(root: str | os.PathLike[str], classes: Sequence[str] | None = None) -> SourceTable:
    """Every clip of the shards in folder ``root``, labelled as a manifest is (see
    :func:`distillery.data.sources.read_manifest`: the class list, ``label`` or
    ``labels``, a split for every clip or none).

    Raises:
        ValueError: naming the shard, for a compressed or damaged tar, invalid JSON, a
            malformed label list, or splits given for some clips only.
    """
    clips: list[LabelledClip] = []
    raw = []
    tars = shard_files(root)
    for tar in tars:
        raw += [(tar, key, info, meta) for key, info, meta in _clips_of(tar)]
    multi_label = any("labels" in meta for *_, meta in raw)
    for tar, _, info, meta in raw:
        where = f"{tar}: member {info.name}"
        split = str(meta.get("split") or "") or None
        names = row_labels(where, meta, multi_label)
        clips.append((where, tar / info.name, names, split, (info.offset_data, info.size)))
    given = [clip for clip in clips if clip[3] is not None]
    if given and len(given) < len(clips):
        missing = next(clip for clip in clips if clip[3] is None)
        raise ValueError(
            f"{missing[0]}: has no split while {len(given)} other clips have one; "
            "give every clip a split or none"
        )
    log.info("shards: %d clips in %d shard(s) under %s", len(clips), len(tars), root)
    return labelled_table(clips, multi_label, classes)


def _clip_bytes(path: Path, member: tuple[int, int] | None) -> bytes:
    if member is None:
        return path.read_bytes()
    with path.parent.open("rb") as f:
        f.seek(member[0])
        return f.read(member[1])


def write_shards(
    table: SourceTable, out: str | os.PathLike[str], clips_per_shard: int
) -> list[Path]:
    """Write ``table``'s clips into tar shards under ``out``: per split (``all`` when the
    source has none), in source order, ``clips_per_shard`` clips per shard, each written
    to a temporary file and renamed. Returns the shard paths.

    Raises:
        ValueError: when the table has problems (missing files, labels outside the class
            list): shards hold only usable clips.
    """
    if clips_per_shard < 1:
        raise ValueError(f"clips per shard must be >= 1, got {clips_per_shard}")
    if table.problems:
        listing = "\n  ".join(table.problems[i] for i in sorted(table.problems)[:10])
        raise ValueError(f"{len(table.problems)} clip(s) cannot be used:\n  {listing}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[int]] = {}
    for i, record in enumerate(table.records):
        by_split.setdefault(record.split or "all", []).append(i)
    written: list[Path] = []
    for split, rows in by_split.items():
        for number, start in enumerate(range(0, len(rows), clips_per_shard)):
            shard = out / f"{split}-{number:06d}.tar"
            fd, tmp = artifacts.temp_file_for(shard)
            os.close(fd)
            try:
                with webdataset.TarWriter(tmp) as writer:
                    for i in rows[start : start + clips_per_shard]:
                        writer.write(_sample(table, i))
                os.replace(tmp, shard)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            written.append(shard)
    return written


def _sample(table: SourceTable, i: int) -> dict:
    record = table.records[i]
    names = [table.class_names[c] for c in (record.labels or ())]
    meta: dict = {"source": str(record.path)}
    if table.multi_label:
        meta["labels"] = names
    else:
        meta["label"] = table.class_names[record.label] if record.label >= 0 else ""
    if record.split is not None:
        meta["split"] = record.split
    ext = record.path.suffix.lower().lstrip(".")
    return {"__key__": f"{i:09d}", ext: _clip_bytes(record.path, record.member), "json": meta}
