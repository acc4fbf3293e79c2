"""The header index of a data set: every file's frames and rate, or why it is bad.

Built once, by a thread pool (header reads wait on the file system, not the CPU), and
kept under ``data.cache_dir/index``: one small JSON file per audio folder (or tar shard:
its members are ``<tar>/<name>`` paths with an ``(offset, size)``), each entry
keyed by the file's path, size, modification and status-change time (the last catches a
``chmod`` that makes an unreadable file readable). Every stage and every rank that
uses the same files reads it instead of opening each file again, and a changed file
(new size or mtime) is read again on its own. Missing files are never cached. Processes
that index at the same time (DDP ranks) take turns under a file lock, so the first
reads the headers and the others find them cached.

The cache holds what the header says, not the verdict on it: the rate and duration
limits (:class:`AudioLimits`) are applied when the index is used, so changing them
needs no new scan.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distillery import artifacts
from distillery.data import audio_io
from distillery.data.audio_io import AudioFileError, AudioLimits, Member, check_limits

__all__ = ["FileEntry", "FileIndex", "build_index"]

log = logging.getLogger(__name__)

# Entries in a cache file written by another layout are ignored, not misread.
_FORMAT = 2
_THREADS = 16


@dataclass(frozen=True)
class FileEntry:
    """One file's header (``frames``, ``sample_rate``, ``channels``), or ``error``: why
    it is bad."""

    frames: int = 0
    sample_rate: int = 0
    channels: int = 0
    error: str | None = None

    def check(self, path: Path, limits: AudioLimits) -> None:
        """Raise the file's AudioFileError: a bad header, or a rate/duration outside limits."""
        if self.error is not None:
            raise AudioFileError(self.error)
        check_limits(path, self.sample_rate, self.frames, limits)


def _stat_key(path: str, member: Member | None) -> list[int] | None:
    """The file's size and times; a shard member's are its tar's, plus its offset."""
    try:
        st = os.stat(path if member is None else os.path.dirname(path))
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, *(member or ())]


def _read_entry(path: str, member: Member | None) -> FileEntry:
    try:
        info = audio_io.audio_info(path, member)
    except AudioFileError as err:
        return FileEntry(error=str(err))
    return FileEntry(info["frames"], info["sample_rate"], info["channels"])


def _cache_file(cache_dir: Path, folder: Path) -> Path:
    digest = hashlib.sha1(str(folder).encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return cache_dir / "index" / f"{digest}.json"


def _load(file: Path) -> dict[str, dict]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, or half-written by a crashed older version
        return {}
    return data.get("files", {}) if data.get("format") == _FORMAT else {}


def _save(file: Path, folder: Path, entries: dict[str, dict]) -> None:
    """Atomic: a rank reading it meanwhile sees the old or the new file, whole."""
    record = {"format": _FORMAT, "folder": str(folder), "files": entries}
    artifacts.write_bytes(file, json.dumps(record).encode("utf-8"))


@contextmanager
def _exclusive(cache_dir: Path) -> Iterator[None]:
    """Held while reading and storing headers: of several processes indexing the same
    files (DDP ranks, pipelines sharing a cache), one reads them and the others wait and
    then find them cached."""
    lock = cache_dir / "index" / ".lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        yield


class FileIndex(Sequence[FileEntry]):
    """Every file's header entry, column-wise: frames, rates and channels in integer
    arrays and the few errors in a dict, so a rank holds a few bytes per file;
    ``index[i]`` is file ``i``'s :class:`FileEntry`."""

    def __init__(self, n: int) -> None:
        self.frames = np.zeros(n, np.int64)
        self.sample_rate = np.zeros(n, np.int64)
        self.channels = np.zeros(n, np.int32)
        self.errors: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # IndexError out of range, as a list
        if i in self.errors:
            return FileEntry(error=self.errors[i])
        return FileEntry(int(self.frames[i]), int(self.sample_rate[i]), int(self.channels[i]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FileIndex):
            return NotImplemented
        return self.errors == other.errors and all(
            np.array_equal(getattr(self, c), getattr(other, c))
            for c in ("frames", "sample_rate", "channels")
        )

    def put(self, i: int, entry: FileEntry) -> None:
        if entry.error is not None:
            self.errors[i] = entry.error
        else:
            self.frames[i], self.sample_rate[i] = entry.frames, entry.sample_rate
            self.channels[i] = entry.channels


def _by_folder(paths: Sequence[str | os.PathLike[str]]) -> Iterator[tuple[str, np.ndarray]]:
    """(folder, positions of its files in ``paths``) for each folder, so that only one
    folder's cache file and stat keys are in memory at a time."""
    folders: dict[str, int] = {}
    folder_of = np.empty(len(paths), np.int64)
    for i in range(len(paths)):
        folder = os.path.dirname(os.fspath(paths[i]))
        folder_of[i] = folders.setdefault(folder, len(folders))
    order = np.argsort(folder_of, kind="stable")
    bounds = np.searchsorted(folder_of[order], np.arange(len(folders) + 1))
    for folder, f in folders.items():
        yield folder, order[bounds[f] : bounds[f + 1]]


def _lookup(
    names: list[str], keys: list[list[int] | None], stored: dict[str, dict]
) -> list[FileEntry | None]:
    """The cached entry of each file whose key still matches, else None."""
    entries: list[FileEntry | None] = [None] * len(names)
    for j, name in enumerate(names):
        hit = stored.get(name)
        if keys[j] is not None and hit is not None and hit["key"] == keys[j]:
            entries[j] = FileEntry(**hit["entry"])
    return entries


def _read_missing(
    paths: list[str], members: list[Member | None], entries: list[FileEntry | None]
) -> list[int]:
    """Read the headers of the files without an entry; returns their positions."""
    todo = [i for i, entry in enumerate(entries) if entry is None]
    read = [paths[i] for i in todo], [members[i] for i in todo]
    with ThreadPoolExecutor(_THREADS) as pool:
        for i, entry in zip(todo, pool.map(_read_entry, *read), strict=True):
            entries[i] = entry
    return todo


def _index_folder(
    folder: Path, paths: list[str], members: list[Member | None], cache: Path | None
) -> tuple[list[FileEntry], int]:
    """The entries of one folder's files, and how many were read rather than cached."""
    with ThreadPoolExecutor(_THREADS) as pool:
        keys = list(pool.map(_stat_key, paths, members))
    names = [os.path.basename(p) for p in paths]
    if cache is None:
        entries: list[FileEntry | None] = [None] * len(paths)
        return entries, len(_read_missing(paths, members, entries))  # type: ignore[return-value]
    file = _cache_file(cache, folder)
    stored = _load(file)
    entries = _lookup(names, keys, stored)
    if None not in entries:
        return entries, 0  # type: ignore[return-value]
    with _exclusive(cache):
        stored = _load(file)  # what a waited-for process wrote
        entries = _lookup(names, keys, stored)
        todo = _read_missing(paths, members, entries)
        for j, name in enumerate(names):
            if keys[j] is not None:  # missing: never cached
                stored[name] = {"key": keys[j], "entry": dataclasses.asdict(entries[j])}
        if todo:
            _save(file, folder, stored)
    return entries, len(todo)  # type: ignore[return-value]


def build_index(
    paths: Sequence[str | os.PathLike[str]],
    cache_dir: str | os.PathLike[str] | None,
    members: Sequence[Member | None] | None = None,
) -> FileIndex:
    """The header entry of every file in ``paths`` (in order), reading only those that
    are not cached under ``cache_dir`` with their current size and times (all of them
    when ``cache_dir`` is None). ``members``: each path's place in its tar shard, or None
    for a plain file. Works folder by folder, on path strings: its memory is the
    result's few bytes per file plus one folder's cache."""
    cache = None if cache_dir is None else Path(cache_dir)
    index = FileIndex(len(paths))
    read = 0
    for folder, positions in _by_folder(paths):
        folder_paths = [os.fspath(paths[i]) for i in positions]
        folder_members = [None if members is None else members[i] for i in positions]
        entries, count = _index_folder(Path(folder), folder_paths, folder_members, cache)
        read += count
        for i, entry in zip(positions.tolist(), entries, strict=True):
            index.put(i, entry)
    log.info("data index: %d file(s), %d read, %d cached", len(paths), read, len(paths) - read)
    return index
