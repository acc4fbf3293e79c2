"""Atomic artifact writes: a reader sees the old file or the new one, never half of one.

Every artifact goes to a temporary file in the destination directory, is flushed and
fsync'ed, then renamed over the destination (``os.replace`` is atomic on POSIX), so a process
killed mid-write leaves the previous version intact. The directory is fsync'ed after the
rename so the new name survives a power loss, and the file gets the permissions the umask
gives any new file (``mkstemp`` alone would make it private, 0600), so teammates sharing a
group directory can read and resume a run.

A kill between ``mkstemp`` and the rename leaves a temporary file, ``.<name>.<random>.tmp``;
:func:`remove_stale_temp_files` deletes those when a run starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` can only
    be read by setting it, which races with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return int(
            next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8
        )
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file_for(path: Path) -> tuple[int, str]:
    """``mkstemp`` next to ``path``, with the permissions ``open()`` would give ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename ``tmp`` over ``path`` and fsync the directory."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path`` for binary writing; rename it on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temp_files(root: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left under ``root``; returns them.

    Call only while no process writes under ``root`` (at the start of a run).
    """
    removed = []
    for tmp in Path(root).rglob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_numpy(path: str | os.PathLike, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes(path, buffer.getvalue())


def write_torch(path: str | os.PathLike, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())
