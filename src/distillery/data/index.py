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

from distillery import artifacts
from distillery.data import audio_io
from distillery.data.audio_io import AudioFileError, AudioLimits, Member, check_limits

__all__ = ["FileEntry", "build_index"]

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


def _stat_key(path: Path, member: Member | None) -> list[int] | None:
    """The file's size and times; a shard member's are its tar's, plus its offset."""
    try:
        st = (path if member is None else path.parent).stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, *(member or ())]


def _read_entry(path: Path, member: Member | None) -> FileEntry:
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


def _lookup(
    paths: list[Path], keys: list[list[int] | None], cache_dir: Path | None
) -> tuple[list[FileEntry | None], dict[Path, dict[str, dict]]]:
    """The cached entry of each file whose key still matches (else None), and the stored
    entries by folder."""
    entries: list[FileEntry | None] = [None] * len(paths)
    stored: dict[Path, dict[str, dict]] = {}
    for i, path in enumerate(paths):
        if path.parent not in stored:
            stored[path.parent] = (
                {} if cache_dir is None else _load(_cache_file(cache_dir, path.parent))
            )
        hit = stored[path.parent].get(path.name)
        if keys[i] is not None and hit is not None and hit["key"] == keys[i]:
            entries[i] = FileEntry(**hit["entry"])
    return entries, stored


def _read_missing(
    paths: list[Path], members: list[Member | None], entries: list[FileEntry | None]
) -> list[int]:
    """Read the headers of the files without an entry; returns their positions."""
    todo = [i for i, entry in enumerate(entries) if entry is None]
    read = [paths[i] for i in todo], [members[i] for i in todo]
    with ThreadPoolExecutor(_THREADS) as pool:
        for i, entry in zip(todo, pool.map(_read_entry, *read), strict=True):
            entries[i] = entry
    return todo


def build_index(
    paths: Sequence[Path],
    cache_dir: str | os.PathLike[str] | None,
    members: Sequence[Member | None] | None = None,
) -> list[FileEntry]:
    """The header entry of every file in ``paths`` (in order), reading only those that
    are not cached under ``cache_dir`` with their current size and times (all of them
    when ``cache_dir`` is None). ``members``: each path's place in its tar shard, or None
    for a plain file."""
    paths = [Path(p) for p in paths]
    members = list(members) if members is not None else [None] * len(paths)
    cache = None if cache_dir is None else Path(cache_dir)
    with ThreadPoolExecutor(_THREADS) as pool:
        keys = list(pool.map(_stat_key, paths, members))
    entries, stored = _lookup(paths, keys, cache)
    todo: list[int] = []
    if cache is None:
        todo = _read_missing(paths, members, entries)
    elif None in entries:
        with _exclusive(cache):
            entries, stored = _lookup(paths, keys, cache)  # what a waited-for process wrote
            todo = _read_missing(paths, members, entries)
            changed = {paths[i].parent for i in todo}
            for i, path in enumerate(paths):
                if path.parent in changed and keys[i] is not None:  # missing: never cached
                    entry = dataclasses.asdict(entries[i])
                    stored[path.parent][path.name] = {"key": keys[i], "entry": entry}
            for folder in changed:
                _save(_cache_file(cache, folder), folder, stored[folder])
    log.info(
        "data index: %d file(s), %d read, %d cached", len(paths), len(todo), len(paths) - len(todo)
    )
    return entries
