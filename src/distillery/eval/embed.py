"""Run a frozen encoder over a data loader and collect its embeddings.

Embeddings are kept in memory by default; with a :class:`NpyFeatureWriter` as ``out``
they stream batch by batch into a ``.npy`` file instead, so that embedding millions of
clips needs memory for one batch only.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from rich.progress import track
from torch import Tensor, nn

from distillery import artifacts
from distillery.models.inference import fuse_conv_bn

__all__ = ["FEATURE_DTYPES", "NpyFeatureWriter", "embed", "release_pages"]

#: Loaders with more batches than this show a progress bar; smaller runs stay quiet.
PROGRESS_MIN_BATCHES = 20


#: Storage dtypes of on-disk features. float16 halves disk and page-cache use; its
#: ~3 significant digits are far below the spread of embeddings that k-means separates.
FEATURE_DTYPES = ("float32", "float16")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _flat_int64(value: Any) -> np.ndarray:
    return torch.as_tensor(value).reshape(-1).cpu().numpy().astype(np.int64)


def release_pages(x: np.ndarray, lo: int, hi: int) -> None:
    """Unmap the pages of rows ``[lo, hi)`` of a file-backed memmap from this process.

    Touched pages of a file mapping count in the process's resident set until unmapped,
    so one pass over (or one write of) a feature file would leave all of it "resident":
    reclaimable page cache, but what RSS limits and monitors see. ``MADV_DONTNEED`` on a
    shared file mapping only drops the mapping; the data, written ones included, stay in
    the page cache and reach the file. Call it once rows up to ``hi`` are done with: the
    page holding row ``lo`` is released too (its earlier rows were done before), the one
    holding row ``hi`` is not. No-op for anything but a C-contiguous ``np.memmap`` of
    mode "r", "r+" or "w+" (a copy-on-write "c" map would lose its changes).
    """
    mm = getattr(x, "_mmap", None)
    if (
        mm is None
        or getattr(x, "mode", None) not in ("r", "r+", "w+")
        or not x.flags.c_contiguous
        or not hasattr(mm, "madvise")
        or not hasattr(mmap, "MADV_DONTNEED")
        or hi <= lo
    ):
        return
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    start = x.ctypes.data - base + lo * x.strides[0]
    end = x.ctypes.data - base + hi * x.strides[0]
    start = start // mmap.PAGESIZE * mmap.PAGESIZE
    end = end // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


class NpyFeatureWriter:
    """Streams (B, d) embedding batches into the ``.npy`` file ``path``, all-or-nothing.

    Rows go into a memory-mapped temporary file next to ``path`` (``open_memmap``, created
    when the first batch tells the width d). :meth:`close` checks that exactly ``n_rows``
    rows arrived, flushes, renames the file to ``path`` and returns it reopened read-only
    (``mmap_mode="r"``); :meth:`abort` deletes the temporary file. A process killed while
    writing therefore never leaves a half-written file under ``path``; at worst an orphan
    ``.<name>.*.tmp``, which the next writer to ``path`` deletes.

    Args:
        path: destination ``.npy`` file; its directory is created when needed.
        n_rows: rows that will be written, in total.
        dtype: storage dtype, one of :data:`FEATURE_DTYPES`.
    """

    def __init__(self, path: str | os.PathLike, n_rows: int, dtype: str = "float32") -> None:
        if str(dtype) not in FEATURE_DTYPES:
            raise ValueError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
        if n_rows < 0:
            raise ValueError(f"n_rows must be >= 0, got {n_rows}")
        self.path = Path(path)
        self.n_rows = int(n_rows)
        self.dtype = np.dtype(str(dtype))
        self.rows_written = 0
        self._tmp: Path | None = None
        self._array: np.memmap | None = None

    def _new_tmp(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Orphans of a writer that was killed: never read, only in the way.
        for orphan in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                orphan.unlink()
        fd, tmp = artifacts.temp_file_for(self.path)
        os.close(fd)
        self._tmp = Path(tmp)
        return self._tmp

    def write(self, batch: np.ndarray) -> None:
        """Append (B, d) rows (any float dtype; stored as ``dtype``)."""
        batch = np.asarray(batch)
        if batch.ndim != 2:
            raise ValueError(f"expected a (B, d) batch, got shape {batch.shape}")
        lo, hi = self.rows_written, self.rows_written + len(batch)
        if hi > self.n_rows:
            raise ValueError(
                f"more rows than the {self.n_rows} announced to the writer of {self.path}"
            )
        if self.dtype == np.float16 and batch.size and np.abs(batch).max() > _FLOAT16_MAX:
            # Would silently become inf and fail much later, in clustering.
            raise ValueError(
                f"embeddings exceed the float16 range ({_FLOAT16_MAX}); store them as float32"
            )
        if self._array is None:
            shape = (self.n_rows, batch.shape[1])
            self._array = open_memmap(self._new_tmp(), mode="w+", dtype=self.dtype, shape=shape)
        if batch.shape[1] != self._array.shape[1]:
            raise ValueError(
                f"batch has {batch.shape[1]} columns, earlier ones {self._array.shape[1]}"
            )
        self._array[lo:hi] = batch
        release_pages(self._array, lo, hi)  # keeps the writer's RSS at about one batch
        self.rows_written = hi

    def close(self) -> np.ndarray:
        """Finish the file and return it as a read-only (n_rows, d) memory map.

        With no rows at all the file holds a (0, 0) array, returned in memory.
        """
        if self.rows_written != self.n_rows:
            self.abort()
            raise ValueError(
                f"{self.path}: {self.rows_written} of the {self.n_rows} announced rows were written"
            )
        if self._array is None:  # n_rows == 0: nothing to map
            empty = np.zeros((0, 0), dtype=self.dtype)
            tmp = self._new_tmp()
            with tmp.open("wb") as f:
                np.save(f, empty)
            os.replace(tmp, self.path)
            self._tmp = None
            return empty
        self._array.flush()
        self._array = None  # unmaps
        os.replace(self._tmp, self.path)
        self._tmp = None
        return np.load(self.path, mmap_mode="r")

    def abort(self) -> None:
        """Delete the unfinished file (nothing happens under ``path``)."""
        self._array = None
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()
            self._tmp = None


def _waveform(audio: Tensor) -> Tensor:
    return audio


def embed(
    encoder: nn.Module,
    loader: Iterable[dict[str, Any]],
    featurize: Callable[[Tensor], Tensor],
    device: torch.device | str = "cpu",
    *,
    out: NpyFeatureWriter | None = None,
    timing: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings of every item of ``loader``, in loader order.

    The encoder runs in eval mode under ``torch.inference_mode()``, with BatchNorm folded
    into the preceding convolutions (:func:`~distillery.models.inference.fuse_conv_bn`, a
    copy: the encoder is not modified); the train/eval flag of
    each of its submodules is restored afterwards (also on error). The encoder is expected
    to already be on ``device``.

    Args:
        encoder: maps ``featurize(audio)`` to (B, d) embeddings.
        loader: batches are dicts with ``index`` (B,), ``audio`` (B, samples) and
            ``label`` (B,) (``-1`` for unlabeled items); a waveform encoder also gets
            ``length`` (B,) valid samples when the batch has it.
        featurize: (B, samples) audio on ``device`` -> encoder input (e.g. log-mel);
            not used for an encoder whose ``input_key`` is ``"audio"``.
        device: where the audio is moved before ``featurize``.
        out: stream the embeddings into this writer's file instead of memory (it must
            expect exactly n rows); on error its unfinished file is deleted.
        timing: when given, ``timing["seconds"]`` is set to the wall time spent moving
            batches to ``device``, featurizing and encoding them and copying the
            embeddings back (which waits for the device), data loading excluded.

    Returns:
        ``(indices, embeddings, labels)``: (n,) int64, (n, d) float32 and (n,) int64.
        With ``out``, embeddings is the finished file as a read-only (n, d) memory map
        of ``out.dtype``.
    """
    device = torch.device(device)
    # Per-module flags, not just encoder.training: a module may keep e.g. frozen
    # normalisation layers in eval mode while the rest trains.
    modes = {module: module.training for module in encoder.modules()}
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    batches: Iterable[dict[str, Any]] = loader
    if n_batches is not None and n_batches > PROGRESS_MIN_BATCHES:
        batches = track(loader, total=n_batches, description="embedding", transient=True)

    indices: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    waveform = getattr(encoder, "input_key", "features") == "audio"  # e.g. HuBERT
    if waveform:
        featurize = _waveform
    encoder.eval()
    model = fuse_conv_bn(encoder)  # BatchNorm folded into the convs: 0.70x AudioNTT CPU time
    compute = 0.0
    try:
        with torch.inference_mode():
            for batch in batches:
                start = time.perf_counter()
                audio = batch["audio"].to(device, non_blocking=True)
                if waveform and "length" in batch:  # pooling skips a short clip's zero padding
                    z = model(audio, batch["length"].to(device))
                else:
                    z = model(featurize(audio))
                if z.dim() != 2 or z.shape[0] != audio.shape[0]:
                    raise ValueError(
                        f"encoder output must be (B, d) with B={audio.shape[0]}, "
                        f"got {tuple(z.shape)}"
                    )
                index, label = _flat_int64(batch["index"]), _flat_int64(batch["label"])
                if len(index) != len(z) or len(label) != len(z):
                    raise ValueError(
                        f"batch of {len(z)} items has {len(index)} indices, {len(label)} labels"
                    )
                host = z.float().cpu().numpy()
                compute += time.perf_counter() - start
                indices.append(index)
                labels.append(label)
                if out is None:
                    embeddings.append(host)
                else:
                    out.write(host)
    except BaseException:
        if out is not None:
            out.abort()
        raise
    finally:
        for module, training in modes.items():
            module.training = training
    if timing is not None:
        timing["seconds"] = compute

    if out is not None:
        empty = np.zeros(0, dtype=np.int64)
        return (
            np.concatenate(indices) if indices else empty,
            out.close(),
            np.concatenate(labels) if labels else empty.copy(),
        )
    if not embeddings:
        empty = np.zeros(0, dtype=np.int64)
        return empty, np.zeros((0, 0), dtype=np.float32), empty.copy()
    return (
        np.concatenate(indices),
        np.concatenate(embeddings).astype(np.float32, copy=False),
        np.concatenate(labels),
    )
