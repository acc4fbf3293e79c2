"""Start-up checks of the data a config names: what can be known before a stage reads it."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from distillery.data.shards import scan_shards
from distillery.data.sources import folder_classes, manifest_labels
from distillery.data.speech import SpeechSpec, require_espeak
from distillery.data.splits import assign_splits
from distillery.data.synthetic import CLASS_NAMES as SYNTHETIC_KINDS


@functools.lru_cache(maxsize=8)
def _source_classes(source: str, location: str) -> list[str]:
    """Cached: every stage's data node usually names the same folder, manifest or shards."""
    if source == "shards":
        return scan_shards(location).class_names
    return folder_classes(location) if source == "folder" else manifest_labels(location)


def check_data_files(data: dict[str, Any], path: str) -> list[str]:
    """What can be known of the data before a stage reads it: the folder or manifest
    exists, names at least two classes (one cannot be learned or evaluated), and a
    manifest's own rules hold (see :func:`distillery.data.sources.read_manifest_rows`).
    The built-in set's val and test splits must not be empty."""
    classes = data.get("classes")
    if classes is not None and len(classes) < 2:
        return [f"{path}.classes: lists {len(classes)} class(es) {classes}; at least 2 are needed"]
    found: list[str] | None = None
    key = {"folder": "root", "manifest": "path", "shards": "path"}.get(data["source"])
    try:
        if key is not None:
            found = _source_classes(data["source"], str(data[key]))
    except (OSError, ValueError) as err:
        return [f"{path}.{key}: {err}"]
    if found is not None and classes is None and len(found) < 2:
        return [
            f"{path}.{key}: {data[key]!r} has {len(found)} class(es) {found}; "
            "at least 2 are needed (or list them in data.classes)"
        ]
    if data["source"] == "speech":
        return _check_speech(data, path)
    if data["source"] == "synthetic":
        synthetic = data["synthetic"]
        if synthetic["num_classes"] > len(SYNTHETIC_KINDS):
            return [
                f"{path}.synthetic.num_classes: {synthetic['num_classes']} is more than the "
                f"{len(SYNTHETIC_KINDS)} sound kinds of the built-in set"
            ]
        labels = np.repeat(np.arange(synthetic["num_classes"]), synthetic["clips_per_class"])
        splits = assign_splits(labels, data["val_fraction"], data["test_fraction"], 0)
        for split in ("val", "test"):
            if not (splits == split).any():
                return [
                    f"{path}.{split}_fraction: {data[f'{split}_fraction']} of "
                    f"{synthetic['clips_per_class']} clips per class gives an empty {split} split; "
                    f"raise it or {path}.synthetic.clips_per_class"
                ]
    return []


def _check_speech(data: dict[str, Any], path: str) -> list[str]:
    """The spoken-word set: espeak-ng is installed and the speaker splits are possible."""
    try:
        SpeechSpec(
            **data["speech"], sample_rate=data["sample_rate"], clip_seconds=data["clip_seconds"]
        )
        require_espeak()
    except (ValueError, FileNotFoundError) as err:
        return [f"{path}.speech: {err}"]
    return []
