"""Where audio comes from: a manifest file, a class-per-folder tree, or a built-in set
(synthetic sounds, or spoken words).

Every source resolves to a :class:`SourceTable`: a list of absolute file paths with an
integer label (``-1`` = unknown) and, when the source defines one, a split name. A
multi-label manifest (a ``labels`` column: class names separated by ``;``) also gives
each record the indices of all its classes.

A row that cannot be used (a missing file, a label outside the class list) does not
raise here: it stays in the table, so record indices follow the source, and its reason
goes to ``SourceTable.problems``; the data module reports those together with the
undecodable files, or skips them all (``data.on_bad_file``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import get_method

from distillery.data.speech import SpeechSpec, generate_speech
from distillery.data.synthetic import SyntheticSpec, generate_synthetic

__all__ = [
    "AUDIO_EXTENSIONS",
    "LABEL_SEPARATOR",
    "SOURCES",
    "SPLIT_NAMES",
    "AudioRecord",
    "SourceTable",
    "limit_clips",
    "load_source",
    "read_manifest",
    "scan_folder",
]

log = logging.getLogger("distillery.data")

SPLIT_NAMES = ("train", "val", "test")
SOURCES = ("synthetic", "speech", "folder", "manifest", "shards")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
UNKNOWN_LABEL = -1
#: Separates the class names of a multi-label manifest's ``labels`` value (``dog;bark``).
LABEL_SEPARATOR = ";"

# Speech Commands style split lists (paths relative to the root, one per line).
_SPLIT_LISTS = {"val": "validation_list.txt", "test": "testing_list.txt"}


@dataclass(frozen=True)
class AudioRecord:
    """One audio file: absolute ``path``, ``label`` index (-1 = unknown), optional ``split``.

    Multi-label sources also set ``labels``, the indices of every class of the clip;
    ``label`` is then its first listed class (-1 when it has none), which stratifies
    splits and label subsets like a single label does. A clip in a tar shard has
    ``path`` ``<tar>/<member name>`` and its ``member`` bytes' ``(offset, size)``.
    """

    path: Path
    label: int
    split: str | None
    labels: tuple[int, ...] | None = None
    member: tuple[int, int] | None = None  # (offset, size) in the tar shard path.parent


@dataclass
class SourceTable:
    """The files of a source; ``label`` values index into ``class_names``.

    ``problems`` maps a record's index to why it cannot be used (a message naming the
    file, and the manifest line where there is one).
    """

    records: list[AudioRecord]
    class_names: list[str]
    problems: dict[int, str] = field(default_factory=dict)
    multi_label: bool = False  # records carry ``labels``; targets are multi-hot

    def __len__(self) -> int:
        return len(self.records)


# --------------------------------------------------------------------------- manifest


_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_manifest_text(path: Path) -> str:
    """The manifest's text: UTF-8, with or without a byte-order mark, UTF-16 with one, or
    else Latin-1 (with a warning: every byte is a Latin-1 character, so it cannot fail).

    Raises:
        ValueError: naming the file and line, for UTF-16 without a byte-order mark (or any
            file with NUL bytes) and for undecodable text after a byte-order mark.
    """
    data = path.read_bytes()
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), None)
    nul = data.find(b"\x00")
    if encoding is None and nul >= 0:  # valid UTF-8, but no manifest holds NUL bytes
        raise ValueError(
            f"{path}: line {_line_of(data, nul)}: cannot decode the manifest "
            "(NUL bytes: UTF-16 without a byte-order mark, or not text); save it as UTF-8"
        )
    try:
        return data.decode(encoding or "utf-8")
    except UnicodeDecodeError as err:
        line = _line_of(data, err.start)
        if encoding is not None:
            raise ValueError(
                f"{path}: line {line}: cannot decode the manifest ({encoding}); save it as UTF-8"
            ) from None
        log.warning("%s: line %d is not UTF-8; reading the manifest as Latin-1", path, line)
        return data.decode("latin-1")


def _manifest_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for each entry of a .csv or .jsonl manifest."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ValueError(f"{path}: unsupported manifest type {suffix!r}; use .csv or .jsonl")
    text = read_manifest_text(path)
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = [name.strip() for name in reader.fieldnames or []]
        if "path" not in fields:
            raise ValueError(
                f"{path}: line 1: the header has no 'path' column (found: {fields or 'nothing'})"
            )
        reader.fieldnames = fields
        for row in reader:
            yield reader.line_num, row
    else:
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {line_number}: invalid JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {line_number}: expected a JSON object")
            yield line_number, row


def _lines(numbers: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(n) for n in numbers[:limit])
    return shown + (f", ... ({len(numbers)} in all)" if len(numbers) > limit else "")


#: A manifest row: (line, absolute file path, class names, split).
ManifestRow = tuple[int, Path, tuple[str, ...], str | None]


def row_labels(where: str, row: dict[str, Any], multi_label: bool) -> tuple[str, ...]:
    """The class names of one manifest row (or shard clip, found at ``where``): ``label``
    (one name) or ``labels`` (names separated by :data:`LABEL_SEPARATOR`, or a JSON list);
    empty = unlabelled."""
    if "label" in row and "labels" in row:
        raise ValueError(
            f"{where}: has both 'label' and 'labels'; a manifest uses one: "
            f"'label' (one class) or 'labels' (classes separated by {LABEL_SEPARATOR!r})"
        )
    if not multi_label:
        label = _text(row.get("label"))
        return (label,) if label else ()
    if "labels" not in row:
        raise ValueError(
            f"{where}: key 'labels' is missing while other rows have it; "
            "give every row 'labels' (empty = unlabelled)"
        )
    value = row["labels"]
    if isinstance(value, list):
        names = [_text(name) for name in value]
    else:
        text = _text(value)
        names = [name.strip() for name in text.split(LABEL_SEPARATOR)] if text else []
    if not all(names):
        raise ValueError(
            f"{where}: key 'labels': an empty class name in {value!r} "
            f"(separate classes with {LABEL_SEPARATOR!r}, no empty items)"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{where}: key 'labels': {', '.join(map(repr, repeated))} listed twice")
    return tuple(names)


def read_manifest_rows(path: str | os.PathLike[str]) -> tuple[list[ManifestRow], bool]:
    """Every manifest row, checked without opening the audio, and whether the manifest
    is multi-label (it has a ``labels`` key: :func:`_row_labels`).

    Checked: every row has a ``path``; splits are known names and given for all rows or
    for none (a partial column would silently re-split everything); no file is in two
    splits; ``labels`` items are non-empty and distinct. Labels that differ only by case
    or inner whitespace get a warning.

    Raises:
        ValueError: naming the file and the lines.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    base = path.resolve().parent
    raw = list(_manifest_rows(path))
    multi_label = any("labels" in row for _, row in raw)
    rows: list[ManifestRow] = []
    for line, row in raw:
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
        labels = row_labels(f"{path}: line {line}", row, multi_label)
        rows.append((line, file_path, labels, split))
    if not rows:
        raise ValueError(f"{path}: the manifest lists no files")

    without = [line for line, *_, split in rows if split is None]
    if without and len(without) < len(rows):
        raise ValueError(
            f"{path}: lines {_lines(without)} have no split while {len(rows) - len(without)} "
            "other rows have one; give every row a split (train, val or test) or none"
        )
    first_seen: dict[Path, tuple[int, str | None]] = {}
    for line, file_path, _, split in rows:
        seen = first_seen.setdefault(os.path.normpath(file_path), (line, split))
        if seen[1] != split:
            raise ValueError(
                f"{path}: lines {seen[0]} and {line}: audio file {str(file_path)!r} is in "
                f"two splits ({seen[1]} and {split}); a clip may be in one only"
            )
    _warn_near_duplicate_labels(path, rows)
    return rows, multi_label


def _warn_near_duplicate_labels(path: Path, rows: list[ManifestRow]) -> None:
    spellings: dict[str, dict[str, int]] = {}
    for line, _, labels, _ in rows:
        for label in labels:
            spellings.setdefault(" ".join(label.split()).casefold(), {}).setdefault(label, line)
    for variants in spellings.values():
        if len(variants) > 1:
            log.warning(
                "%s: labels %s differ only by case or whitespace and are %d different classes "
                "(first seen on lines %s); fix them if they mean one class",
                path,
                " and ".join(repr(v) for v in variants),
                len(variants),
                _lines(list(variants.values())),
            )


def manifest_labels(path: str | os.PathLike[str]) -> list[str]:
    """The distinct labels of a manifest, sorted, after :func:`read_manifest_rows`' checks."""
    return sorted({label for _, _, labels, _ in read_manifest_rows(path)[0] for label in labels})


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _class_list(classes: Sequence[str]) -> list[str]:
    """``data.classes`` checked: non-empty, distinct, non-blank names."""
    names = [_text(name) for name in classes]
    if not names or not all(names):
        raise ValueError(f"data.classes: must list non-empty class names, got {list(classes)!r}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"data.classes: each class must be listed once; repeated: {duplicates}")
    return names


def _preview(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _warn_classes_without_files(classes: Sequence[str], used: set[str]) -> None:
    unused = [name for name in classes if name not in used]
    if unused:  # often a typo in data.classes itself
        log.warning("data.classes: no files for %d class(es): %s", len(unused), _preview(unused))


def read_manifest(
    path: str | os.PathLike[str], classes: Sequence[str] | None = None
) -> SourceTable:
    """Read a CSV or JSON-lines manifest with keys ``path``, optional ``label`` and ``split``.

    ``label`` is a class name (empty or missing = unknown, -1); ``split`` is one of
    train/val/test or empty. Relative paths are resolved against the manifest's folder.
    A multi-label manifest has ``labels`` instead of ``label``: class names separated by
    ``;`` (:data:`LABEL_SEPARATOR`; in JSON lines also a list), empty = unknown.

    The class list is ``classes`` (``data.classes``; label indices follow its order)
    when given; otherwise, when every row names its split, the sorted labels of the
    train rows (a val/test label no train row has cannot be learned: a typo, or a
    class missing from train); otherwise all distinct labels, sorted.

    Rows whose file does not exist or with a label outside the class list are kept
    (label -1) and listed in ``problems``, naming the manifest line and the label.

    Raises:
        ValueError: naming the file, line and key, for a missing ``path``, an unknown
            split, a split column given for only some rows, a file in two splits,
            a malformed ``labels`` list, undecodable text, invalid JSON, or a manifest
            with no rows.
    """
    path = Path(path)
    rows, multi_label = read_manifest_rows(path)
    located = [
        (f"{path}: line {line}", file, names, split, None) for line, file, names, split in rows
    ]
    return labelled_table(located, multi_label, classes)


#: A labelled clip before its labels are numbered: (where, for messages: the manifest line
#: or the shard member), file path, class names, split, tar ``member`` (or None).
LabelledClip = tuple[str, Path, tuple[str, ...], str | None, tuple[int, int] | None]


def labelled_table(
    clips: list[LabelledClip], multi_label: bool, classes: Sequence[str] | None
) -> SourceTable:
    """Number the clips' labels: the class list is ``classes`` when given, else the sorted
    labels of the train clips when every clip has a split, else all labels, sorted. A clip
    whose file does not exist or with a label outside the class list is kept (label -1)
    and listed in ``problems``, naming where it is and the label."""
    key = "labels" if multi_label else "label"
    labels = {label for _, _, names, _, _ in clips for label in names}
    if classes is not None:
        class_names = _class_list(classes)
        _warn_classes_without_files(class_names, labels)
        outside = f"is not in data.classes ({_preview(class_names)})"
    elif all(split is not None for *_, split, _ in clips):
        class_names = sorted(
            {name for *_, names, split, _ in clips if split == "train" for name in names}
        )
        outside = "occurs in no train row, so no model can learn it (fix the label, or list it in data.classes)"
    else:
        class_names = sorted(labels)
        outside = ""
    index = {name: i for i, name in enumerate(class_names)}

    records: list[AudioRecord] = []
    problems: dict[int, str] = {}
    for where, file_path, names, split, member in clips:
        unknown = [name for name in names if name not in index]
        if member is None and not file_path.is_file():
            reason = "file does not exist" if not file_path.exists() else "is not a regular file"
            problems[len(records)] = f"{where}: audio file {str(file_path)!r}: {reason}"
        elif unknown:
            problems[len(records)] = (
                f"{where}: audio file {str(file_path)!r}: key {key!r}: "
                f"{', '.join(map(repr, unknown))} {outside}"
            )
        ids = tuple(index[name] for name in names) if not unknown else ()
        label = ids[0] if ids else UNKNOWN_LABEL
        records.append(AudioRecord(file_path, label, split, ids if multi_label else None, member))
    return SourceTable(records, class_names, problems, multi_label)


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


def _class_folders(root: Path) -> list[Path]:
    """Subfolders of ``root`` that may be classes: not starting with ``_`` or ``.`` (e.g.
    ``_background_noise_``)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def folder_classes(
    root: str | os.PathLike[str], extensions: Sequence[str] = AUDIO_EXTENSIONS
) -> list[str]:
    """The class names :func:`scan_folder` would find (subfolders with audio), quickly:
    it stops at each folder's first audio file."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} does not exist or is not a directory")
    suffixes = {ext.lower() for ext in extensions}
    return [
        sub.name
        for sub in _class_folders(root)
        if any(p.suffix.lower() in suffixes and p.is_file() for p in sub.rglob("*"))
    ]


def scan_folder(
    root: str | os.PathLike[str],
    extensions: Sequence[str] = AUDIO_EXTENSIONS,
    classes: Sequence[str] | None = None,
) -> SourceTable:
    """Scan a class-per-subfolder tree: ``root/<class>/**/<file>.<ext>``.

    Subfolders starting with ``_`` or ``.`` (e.g. ``_background_noise_``) are skipped,
    and so are subfolders with no audio. Audio files directly in ``root`` have an
    unknown label (-1). When ``validation_list.txt`` and ``testing_list.txt`` exist
    in ``root`` (the Speech Commands layout), they define val/test and every other
    file is train; otherwise ``split`` is None.

    The class list is ``classes`` (``data.classes``; label indices follow its order)
    when given, else the sorted subfolder names. Files of a subfolder outside
    ``classes`` are kept (label -1) and listed in ``problems``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} does not exist or is not a directory")
    suffixes = {ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions}

    def audio_files(folder: Path, recursive: bool) -> list[Path]:
        candidates = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in candidates if p.suffix.lower() in suffixes and p.is_file())

    per_class: dict[str, list[Path]] = {}
    for sub in _class_folders(root):
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
    if classes is None:
        class_names = sorted(per_class)
    else:
        class_names = _class_list(classes)
        _warn_classes_without_files(class_names, set(per_class))

    def record(file_path: Path, label: int) -> AudioRecord:
        split = None
        if split_of is not None:
            split = split_of.get(file_path.relative_to(root).as_posix(), "train")
        return AudioRecord(file_path.resolve(), label, split)

    index = {name: i for i, name in enumerate(class_names)}
    records = [record(p, UNKNOWN_LABEL) for p in unlabelled]
    problems: dict[int, str] = {}
    for name, files in per_class.items():  # sorted by folder name
        for file_path in files:
            if name not in index:
                problems[len(records)] = (
                    f"audio file {str(file_path)!r}: its folder {name!r} is not in data.classes "
                    f"({_preview(class_names)})"
                )
            records.append(record(file_path, index.get(name, UNKNOWN_LABEL)))
    return SourceTable(records, class_names, problems)


# --------------------------------------------------------------------------- limit


def limit_clips(table: SourceTable, max_clips: int) -> SourceTable:
    """At most ``max_clips`` records of ``table``, stratified: one from each (split, label)
    group in turn, earliest first, so every class and split keeps clips. Source order and
    the problems of the kept records are kept."""
    if len(table) <= max_clips:
        return table
    groups: dict[tuple[str | None, int], list[int]] = {}
    for i, record in enumerate(table.records):
        groups.setdefault((record.split, record.label), []).append(i)
    chosen: list[int] = []
    for turn in range(max(len(g) for g in groups.values())):
        chosen += [g[turn] for g in groups.values() if turn < len(g)]
        if len(chosen) >= max_clips:
            break
    kept = sorted(chosen[:max_clips])
    log.info("data.max_clips=%d: using %d of %d clips", max_clips, len(kept), len(table))
    return SourceTable(
        [table.records[i] for i in kept],
        table.class_names,
        {new: table.problems[old] for new, old in enumerate(kept) if old in table.problems},
        table.multi_label,
    )


# --------------------------------------------------------------------------- dispatch


def load_source(
    source: str,
    *,
    root: str | os.PathLike[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    synthetic: SyntheticSpec | None = None,
    speech: SpeechSpec | None = None,
    classes: Sequence[str] | None = None,
    source_args: dict[str, Any] | None = None,
) -> SourceTable:
    """Resolve the configured data source (``data.source``) to a :class:`SourceTable`.

    - ``synthetic``: generate (or reuse) the synthetic set under ``cache_dir``.
    - ``speech``: generate (or reuse) the espeak-ng spoken-word set under ``cache_dir``;
      its manifest gives speaker-disjoint splits.
    - ``folder``: :func:`scan_folder` of ``root``.
    - ``manifest``: :func:`read_manifest` of ``path``.
    - ``shards``: :func:`~distillery.data.shards.scan_shards` of ``path`` (tar shards).
    - a dotted import path (``my_pkg.sources.my_source``): a user's function, called with
      ``source_args`` (``data.source_args``), that returns a :class:`SourceTable`.

    ``classes`` (``data.classes``) fixes the class list and its order, when given.
    """
    if source in ("synthetic", "speech"):
        if cache_dir is None:
            raise ValueError(
                f"data.source={source} needs data.cache_dir (where to write the audio)"
            )
        if source == "speech":
            return read_manifest(generate_speech(speech or SpeechSpec(), cache_dir), classes)
        return read_manifest(generate_synthetic(synthetic or SyntheticSpec(), cache_dir), classes)
    if source == "folder":
        if root is None or str(root) == "":
            raise ValueError("data.source=folder needs data.root (a folder of class subfolders)")
        return scan_folder(root, classes=classes)
    if source == "manifest":
        if path is None or str(path) == "":
            raise ValueError("data.source=manifest needs data.path (a .csv or .jsonl manifest)")
        return read_manifest(path, classes)
    if source == "shards":
        from distillery.data.shards import scan_shards  # it builds on this module

        if path is None or str(path) == "":
            raise ValueError("data.source=shards needs data.path (a folder of .tar shards)")
        return scan_shards(path, classes)
    if "." in source:
        table = get_method(source)(**(source_args or {}))
        if not isinstance(table, SourceTable):
            raise TypeError(
                f"data.source: {source} returned {type(table).__name__}, not a SourceTable"
            )
        return table
    raise ValueError(
        f"data.source: unknown value {source!r}; allowed: {', '.join(SOURCES)} "
        "or the import path of a function returning a SourceTable"
    )
