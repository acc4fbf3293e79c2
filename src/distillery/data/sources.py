"""Where audio comes from: a manifest file, a class-per-folder tree, or the synthetic set.

Every source resolves to a :class:`SourceTable`: a list of absolute file paths with an
integer label (``-1`` = unknown) and, when the source defines one, a split name.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillery.data.synthetic import SyntheticSpec, generate_synthetic

__all__ = [
    "AUDIO_EXTENSIONS",
    "SOURCES",
    "SPLIT_NAMES",
    "AudioRecord",
    "SourceTable",
    "load_source",
    "read_manifest",
    "scan_folder",
]

log = logging.getLogger("distillery.data")

SPLIT_NAMES = ("train", "val", "test")
SOURCES = ("synthetic", "folder", "manifest")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
UNKNOWN_LABEL = -1

# Speech Commands style split lists (paths relative to the root, one per line).
_SPLIT_LISTS = {"val": "validation_list.txt", "test": "testing_list.txt"}


@dataclass(frozen=True)
class AudioRecord:
    """One audio file: absolute ``path``, ``label`` index (-1 = unknown), optional ``split``."""

    path: Path
    label: int
    split: str | None


@dataclass
class SourceTable:
    """The files of a source; ``label`` values index into ``class_names``."""

    records: list[AudioRecord]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.records)


# --------------------------------------------------------------------------- manifest


def _manifest_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for each entry of a .csv or .jsonl manifest."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [name.strip() for name in reader.fieldnames or []]
            if "path" not in fields:
                raise ValueError(
                    f"{path}: line 1: the header has no 'path' column (found: {fields or 'nothing'})"
                )
            reader.fieldnames = fields
            for row in reader:
                yield reader.line_num, row
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {line_number}: invalid JSON ({exc})") from exc
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {line_number}: expected a JSON object")
                yield line_number, row
    else:
        raise ValueError(f"{path}: unsupported manifest type {suffix!r}; use .csv or .jsonl")


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def read_manifest(path: str | os.PathLike[str]) -> SourceTable:
    """Read a CSV or JSON-lines manifest with keys ``path``, optional ``label`` and ``split``.

    ``label`` is a class name (empty or missing = unknown, -1); ``split`` is one of
    train/val/test or empty. Relative paths are resolved against the manifest's folder.
    ``class_names`` are the sorted distinct labels.

    Raises:
        ValueError: naming the file, line and key, for a missing ``path``, an unknown
            split, or referenced files that do not exist (all of them are listed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    base = path.resolve().parent

    entries: list[tuple[Path, str, str | None]] = []
    missing: list[str] = []
    for line, row in _manifest_rows(path):
        file_text = _text(row.get("path"))
        if not file_text:
            raise ValueError(f"{path}: line {line}: key 'path' is missing or empty")
        split = _text(row.get("split")) or None
        if split is not None and split not in SPLIT_NAMES:
            raise ValueError(
                f"{path}: line {line}: key 'split' has unknown value {split!r}; "
                f"allowed: {', '.join(SPLIT_NAMES)} or empty"
            )
        file_path = Path(file_text).expanduser()
        if not file_path.is_absolute():
            file_path = base / file_path
        if not file_path.is_file():
            missing.append(f"line {line}: {file_path}")
        entries.append((file_path, _text(row.get("label")), split))

    if missing:
        listing = "\n  ".join(missing)
        raise ValueError(
            f"{path}: key 'path': {len(missing)} referenced file(s) do not exist:\n  {listing}"
        )
    if not entries:
        raise ValueError(f"{path}: the manifest lists no files")

    class_names = sorted({label for _, label, _ in entries if label})
    index = {name: i for i, name in enumerate(class_names)}
    records = [
        AudioRecord(file_path, index[label] if label else UNKNOWN_LABEL, split)
        for file_path, label, split in entries
    ]
    return SourceTable(records, class_names)


# --------------------------------------------------------------------------- folder


def _read_split_lists(root: Path) -> dict[str, str] | None:
    """Map relative posix path -> split from Speech Commands style lists, if both exist."""
    lists = {split: root / name for split, name in _SPLIT_LISTS.items()}
    if not all(p.is_file() for p in lists.values()):
        return None
    assignment: dict[str, str] = {}
    for split, list_path in lists.items():
        for line in list_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                assignment[line.strip()] = split
    return assignment


def scan_folder(
    root: str | os.PathLike[str], extensions: Sequence[str] = AUDIO_EXTENSIONS
) -> SourceTable:
    """Scan a class-per-subfolder tree: ``root/<class>/**/<file>.<ext>``.

    Subfolders starting with ``_`` or ``.`` (e.g. ``_background_noise_``) are skipped,
    and so are subfolders with no audio. Audio files directly in ``root`` have an
    unknown label (-1). When ``validation_list.txt`` and ``testing_list.txt`` exist
    in ``root`` (the Speech Commands layout), they define val/test and every other
    file is train; otherwise ``split`` is None.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} does not exist or is not a directory")
    suffixes = {ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions}

    def audio_files(folder: Path, recursive: bool) -> list[Path]:
        candidates = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in candidates if p.suffix.lower() in suffixes and p.is_file())

    per_class: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name.startswith(("_", ".")):
            continue
        files = audio_files(sub, recursive=True)
        if files:
            per_class[sub.name] = files
        else:
            log.warning("Skipping %s: no audio files with extensions %s", sub, sorted(suffixes))
    unlabelled = audio_files(root, recursive=False)
    if not per_class and not unlabelled:
        raise ValueError(
            f"data folder {str(root)!r} contains no audio files with extensions {sorted(suffixes)}"
        )

    split_of = _read_split_lists(root)
    class_names = sorted(per_class)

    def record(file_path: Path, label: int) -> AudioRecord:
        split = None
        if split_of is not None:
            split = split_of.get(file_path.relative_to(root).as_posix(), "train")
        return AudioRecord(file_path.resolve(), label, split)

    records = [record(p, UNKNOWN_LABEL) for p in unlabelled]
    for label, name in enumerate(class_names):
        records.extend(record(p, label) for p in per_class[name])
    return SourceTable(records, class_names)


# --------------------------------------------------------------------------- dispatch


def load_source(
    source: str,
    *,
    root: str | os.PathLike[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    synthetic: SyntheticSpec | None = None,
) -> SourceTable:
    """Resolve the configured data source (``data.source``) to a :class:`SourceTable`.

    - ``synthetic``: generate (or reuse) the synthetic set under ``cache_dir``.
    - ``folder``: :func:`scan_folder` of ``root``.
    - ``manifest``: :func:`read_manifest` of ``path``.
    """
    if source == "synthetic":
        if cache_dir is None:
            raise ValueError(
                "data.source=synthetic needs data.cache_dir (where to write the audio)"
            )
        return read_manifest(generate_synthetic(synthetic or SyntheticSpec(), cache_dir))
    if source == "folder":
        if root is None or str(root) == "":
            raise ValueError("data.source=folder needs data.root (a folder of class subfolders)")
        return scan_folder(root)
    if source == "manifest":
        if path is None or str(path) == "":
            raise ValueError("data.source=manifest needs data.path (a .csv or .jsonl manifest)")
        return read_manifest(path)
    raise ValueError(f"data.source: unknown value {source!r}; allowed: {', '.join(SOURCES)}")
