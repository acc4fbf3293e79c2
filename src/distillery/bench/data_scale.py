"""Data at scale: the header index, memory per rank, the lazy path and the embedding pass.

- **Index build time** per 10k files: :func:`~distillery.data.index.build_index` over
  folders of 1k, 10k and 100k generated clips, cold (an empty index cache; the files were
  just written, so the OS page cache is warm: a cold *disk* would be slower) and cached
  (the second build, reading the cache). The clips are 0.1 s WAV files (16 kHz, 16 bit,
  10 class folders) to keep disk use (~340 MB at 100k) and generation time small; headers
  cost the same whatever the length.
- **Peak RSS per rank** of one training epoch of the ``finetune`` stage's module (the plain
  loop of :mod:`distillery.bench.training`) on each folder, lazy loading
  (``data.preload=false``), ``num_workers=0``, one process per size (one rank; peak
  ``ru_maxrss`` of the whole process: source table, index, model, one epoch).
  Goal: RSS at 100k <= 1.1 x RSS at 10k.
- **Lazy vs in memory**: training throughput on the built-in set (1 s clips) read lazily
  with the best of 0 and 2 loader workers, against precomputed log-mel in memory.
  Goal >= 0.9.
- **Embedding pass** (what pseudo-labeling runs): ``eval.embed.embed`` over the lazy
  loader, against the encoder's forward alone on log-mel batches already in memory, with
  the pass split into decode (iterating the loader), log-mel and model. Goal >= 0.9.
"""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from distillery.bench.input_pipeline import precomputed_loader
from distillery.bench.timing import Comparison, interleaved, median
from distillery.bench.training import (
    FULL,
    QUICK,
    Sizes,
    build_datamodule,
    epoch_throughput,
    fresh_module,
    plain_loop,
    stage_config,
)
from distillery.data.index import build_index
from distillery.data.sources import scan_folder
from distillery.eval.embed import embed
from distillery.models.inference import fuse_conv_bn

FULL_COUNTS = (1_000, 10_000, 100_000)
QUICK_COUNTS = (100, 300)
CLIP_SECONDS = 0.1
SAMPLE_RATE = 16_000
CLASSES = 10
VARIANTS = 16
WORKER_CHOICES = (0, 2)
RSS_GOAL = 1.1
THROUGHPUT_GOAL = 0.9


def clip_folder(cache_dir: Path, count: int) -> Path:
    """``count`` 0.1 s clips in ``CLASSES`` class folders, generated once under ``cache_dir``:
    a tone per class plus one of ``VARIANTS`` noises, encoded once and written as bytes
    (100k files in seconds rather than the minutes of one encode per file)."""
    root = cache_dir / "bench-data-scale" / str(count)
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    t = np.arange(round(CLIP_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    encoded = []
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        tone = 0.3 * np.sin(2 * np.pi * (300 + 250 * c) * t)
        variants = []
        for _ in range(VARIANTS):
            buffer = io.BytesIO()
            audio = tone + 0.05 * rng.normal(size=len(t))
            sf.write(buffer, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
            variants.append(buffer.getvalue())
        encoded.append(variants)
    for i in range(count):
        c = i % CLASSES
        (root / f"class{c}" / f"{i:06d}.wav").write_bytes(encoded[c][(i // CLASSES) % VARIANTS])
    done.touch()
    return root


def index_seconds(root: Path) -> tuple[float, float]:
    """(cold, cached) seconds of building the header index of every file under ``root``."""
    paths = [r.path for r in scan_folder(root).records]
    with tempfile.TemporaryDirectory(prefix="distillery-index-") as cache:
        start = time.perf_counter()
        build_index(paths, cache)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        build_index(paths, cache)
        return cold, time.perf_counter() - start


def _epoch_overrides(root: Path, cache_dir: Path) -> tuple[str, ...]:
    return (
        "data.source=folder",
        f"data.root={root}",
        "data.preload=false",
        "data.num_workers=0",
        f"data.clip_seconds={CLIP_SECONDS}",
        "data.batch_size=64",
    )


def one_epoch(root: Path, cache_dir: Path) -> dict[str, float]:
    """Train one epoch on ``root`` in this process; its peak RSS (run it in a fresh one)."""
    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        sizes = Sizes(epochs=1, repeats=1, overrides=FULL.overrides)
        cfg = stage_config(Path(tmp) / "run", cache_dir, sizes, _epoch_overrides(root, cache_dir))
        start = time.perf_counter()
        datamodule = build_datamodule(cfg)
        module, optimizer = fresh_module(cfg, datamodule, 0)
        times = plain_loop(
            module, optimizer, datamodule.train_dataloader(), datamodule.featurize, 1
        )
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": time.perf_counter() - start,
        "train_clips": times.samples,
    }


def epoch_in_subprocess(root: Path, cache_dir: Path) -> dict[str, float]:
    """:func:`one_epoch` in a fresh process (this module's ``__main__``), so its peak RSS
    is that of one rank training on ``root`` alone."""
    result = subprocess.run(
        [sys.executable, "-m", "distillery.bench.data_scale", str(root), str(cache_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"one-epoch run on {root} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def lazy_vs_memory(quick: bool, cache_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Train throughput: lazy loading with each worker count vs precomputed log-mel."""
    base = QUICK if quick else FULL
    sizes = Sizes(epochs=2 if quick else 3, repeats=1 if quick else 2, overrides=base.overrides)
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        modules = {
            f"lazy{w}": build_datamodule(
                stage_config(
                    Path(tmp) / "run",
                    cache_dir,
                    sizes,
                    ("data.preload=false", f"data.num_workers={w}"),
                )
            )
            for w in WORKER_CHOICES
        }
        cfg = stage_config(Path(tmp) / "run", cache_dir, sizes)
        memory = build_datamodule(cfg)
        loaders = {k: (dm.train_dataloader(), dm.featurize) for k, dm in modules.items()}
        loaders["memory"] = (precomputed_loader(memory), None)

        def variant(key: str) -> Any:
            def go() -> float:
                loader, featurize = loaders[key]
                module, optimizer = fresh_module(cfg, memory, seed)
                times = plain_loop(module, optimizer, loader, featurize, sizes.epochs)
                samples.setdefault(key, []).extend(epoch_throughput(times.epochs))
                return times.seconds

            return go

        interleaved({key: variant(key) for key in loaders}, sizes.repeats)
        loaders.clear()  # shuts the workers down before the temporary directory goes
    return {key: median(values) for key, values in samples.items()}


def embedding_pass(quick: bool, cache_dir: Path, seed: int = 0) -> dict[str, float]:
    """Seconds per clip of the embedding pass and of its parts (medians over repeats)."""
    sizes = QUICK if quick else FULL
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        cfg = stage_config(Path(tmp) / "run", cache_dir, sizes, ("data.preload=false",))
        datamodule = build_datamodule(cfg)
        encoder = fresh_module(cfg, datamodule, seed)[0].encoder.eval()
        loader = datamodule.dataloader("train")
        audio = [batch["audio"] for batch in loader]
        with torch.inference_mode():
            features = [datamodule.featurize(a) for a in audio]
        model = fuse_conv_bn(encoder)  # as embed() runs it
        clips = sum(len(a) for a in audio)

        def decode() -> None:
            for _ in loader:
                pass

        def featurize() -> None:
            with torch.inference_mode():
                for a in audio:
                    datamodule.featurize(a)

        def forward() -> None:
            with torch.inference_mode():
                for f in features:
                    model(f)

        def embedding() -> None:
            embed(encoder, loader, datamodule.featurize)

        seconds = interleaved(
            {
                "pass": embedding,
                "decode": decode,
                "featurize": featurize,
                "forward": forward,
            },
            repeats,
        )
    return {key: median(values) / clips for key, values in seconds.items()} | {"clips": clips}


def run(quick: bool, cache_dir: Path) -> tuple[dict[str, Any], list[Comparison]]:
    counts = QUICK_COUNTS if quick else FULL_COUNTS
    per = 10_000
    index: dict[int, dict[str, float]] = {}
    epochs: dict[int, dict[str, float]] = {}
    for count in counts:
        root = clip_folder(cache_dir, count)
        cold, cached = index_seconds(root)
        index[count] = {
            "cold_s_per_10k": cold / count * per,
            "cached_s_per_10k": cached / count * per,
        }
        epochs[count] = epoch_in_subprocess(root, cache_dir)
    throughput = lazy_vs_memory(quick, cache_dir)
    best = max(WORKER_CHOICES, key=lambda w: throughput[f"lazy{w}"])
    parts = embedding_pass(quick, cache_dir)

    rows: list[Comparison] = []
    name = "data at scale"
    for count in counts:
        rows.append(
            Comparison(
                benchmark=name,
                measure="index build time per 10k files",
                unit="s",
                candidate=f"cached index, {count} clips",
                baseline=f"cold (empty cache), {count} clips",
                candidate_value=index[count]["cached_s_per_10k"],
                baseline_value=index[count]["cold_s_per_10k"],
                higher_is_better=False,
                note="0.1 s WAV clips; cold = no index cache, OS page cache warm",
            )
        )
    for small, large in zip(counts, counts[1:], strict=False):
        goal = RSS_GOAL if large == counts[-1] and not quick else None
        rows.append(
            Comparison(
                benchmark=name,
                measure="peak RSS of one rank, one training epoch (lazy)",
                unit="MiB",
                candidate=f"{large} clips",
                baseline=f"{small} clips",
                candidate_value=epochs[large]["peak_rss_mib"],
                baseline_value=epochs[small]["peak_rss_mib"],
                higher_is_better=False,
                goal=goal,
                note=f"epoch of {large} clips took {epochs[large]['seconds']:.0f} s",
            )
        )
    rows.append(
        Comparison(
            benchmark=name,
            measure="train throughput",
            unit="samples/s",
            candidate=f"lazy, best worker count ({best} of {list(WORKER_CHOICES)})",
            baseline="precomputed log-mel in memory",
            candidate_value=throughput[f"lazy{best}"],
            baseline_value=throughput["memory"],
            higher_is_better=True,
            goal=THROUGHPUT_GOAL,
            note=", ".join(f"{w} workers {throughput[f'lazy{w}']:.0f}/s" for w in WORKER_CHOICES)
            + "; built-in set, 1 s clips",
        )
    )
    rows.append(
        Comparison(
            benchmark=name,
            measure="embedding throughput (pseudo-labeling pass)",
            unit="clips/s",
            candidate="embed(): lazy loader + log-mel + encoder",
            baseline="encoder forward on log-mel in memory",
            candidate_value=1 / parts["pass"],
            baseline_value=1 / parts["forward"],
            higher_is_better=True,
            goal=THROUGHPUT_GOAL,
            note="per clip: decode {:.2f} ms, log-mel {:.2f} ms, model {:.2f} ms".format(
                parts["decode"] * 1e3, parts["featurize"] * 1e3, parts["forward"] * 1e3
            ),
        )
    )
    raw = {
        "clip_seconds": CLIP_SECONDS,
        "counts": list(counts),
        "index": index,
        "epoch": epochs,
        "train_throughput": throughput,
        "best_workers": best,
        "embedding_seconds_per_clip": parts,
    }
    return raw, rows


if __name__ == "__main__":  # one rank's epoch, for epoch_in_subprocess
    from distillery.bench.common import quiet, thread_limit

    quiet()
    with thread_limit(1):
        print(json.dumps(one_epoch(Path(sys.argv[1]), Path(sys.argv[2]))))
