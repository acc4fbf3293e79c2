"""``distillery-data``: generate the synthetic data set, or inspect a data source.

distillery-data synthetic --out DIR [--num-classes N] [--clips-per-class N] ...
distillery-data info PATH        # a manifest, a class-per-folder tree, a folder
                                 # holding manifest.csv / manifest.jsonl, or tar shards
distillery-data shards PATH --out DIR [--clips-per-shard N]   # write tar shards
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from distillery.data.audio_io import AudioFileError, AudioLimits
from distillery.data.index import build_index
from distillery.data.shards import scan_shards, write_shards
from distillery.data.sources import SourceTable, read_manifest, scan_folder
from distillery.data.synthetic import SyntheticSpec, generate_synthetic

__all__ = ["build_parser", "main"]

_MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillery-data", description="Generate or inspect audio data sources."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    defaults = SyntheticSpec()
    syn = commands.add_parser("synthetic", help="generate the synthetic data set (WAV + manifest)")
    syn.add_argument("--out", required=True, type=Path, help="cache folder to write into")
    syn.add_argument("--num-classes", type=int, default=defaults.num_classes)
    syn.add_argument("--clips-per-class", type=int, default=defaults.clips_per_class)
    syn.add_argument("--sample-rate", type=int, default=defaults.sample_rate, help="Hz")
    syn.add_argument("--clip-seconds", type=float, default=defaults.clip_seconds)
    syn.add_argument("--seed", type=int, default=defaults.seed)
    syn.add_argument("--snr-db-min", type=float, default=defaults.snr_db_min)
    syn.add_argument("--snr-db-max", type=float, default=defaults.snr_db_max)

    info = commands.add_parser("info", help="summarise a manifest or a folder of audio")
    info.add_argument(
        "path", type=Path, help="manifest file, class-per-folder root, or cache folder"
    )
    shards = commands.add_parser(
        "shards", help="write a manifest or folder as tar shards (data.source=shards)"
    )
    shards.add_argument("path", type=Path, help="manifest file or class-per-folder root")
    shards.add_argument("--out", required=True, type=Path, help="folder of the shards")
    shards.add_argument("--clips-per-shard", type=int, default=1000)
    return parser


def _class_counts(table: SourceTable) -> list[tuple[str, int]]:
    """Files per class (a multi-label file counts in each of its classes)."""
    counts = Counter(
        label
        for record in table.records
        for label in (record.labels or (-1,) if table.multi_label else (record.label,))
    )
    rows = [(name, counts.get(i, 0)) for i, name in enumerate(table.class_names)]
    if counts.get(-1):
        rows.append(("(unlabelled)", counts[-1]))
    return rows


def _print_table(rows: list[tuple[str, int]]) -> None:
    width = max([len("class")] + [len(name) for name, _ in rows])
    print(f"  {'class':<{width}}  {'files':>6}")
    for name, count in rows:
        print(f"  {name:<{width}}  {count:>6}")


def _load_table(path: Path) -> SourceTable:
    if path.is_file():
        return read_manifest(path)
    if path.is_dir() and any(path.glob("*.tar")):
        return scan_shards(path)
    if path.is_dir():
        for name in _MANIFEST_NAMES:
            if (path / name).is_file():
                return read_manifest(path / name)
        # A cache folder holds synthetic-<hash>/ sets; scanning it as class folders
        # would report each set as one class, so ask for the set instead.
        generated = sorted(path.glob("synthetic-*/manifest.csv"))
        if generated:
            listing = "\n  ".join(str(p.parent) for p in generated)
            raise ValueError(f"{path} is a synthetic cache folder; pass one of:\n  {listing}")
        return scan_folder(path)
    raise FileNotFoundError(f"{str(path)!r} does not exist")


def _cmd_synthetic(args: argparse.Namespace) -> int:
    spec = SyntheticSpec(
        num_classes=args.num_classes,
        clips_per_class=args.clips_per_class,
        sample_rate=args.sample_rate,
        clip_seconds=args.clip_seconds,
        seed=args.seed,
        snr_db_min=args.snr_db_min,
        snr_db_max=args.snr_db_max,
    )
    manifest = generate_synthetic(spec, args.out)
    print(f"manifest: {manifest}")
    _print_table(_class_counts(read_manifest(manifest)))
    return 0


def _cmd_shards(args: argparse.Namespace) -> int:
    table = _load_table(args.path)
    written = write_shards(table, args.out, args.clips_per_shard)
    print(f"{len(table.records)} clips in {len(written)} shard(s) under {args.out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    table = _load_table(args.path)
    rates: Counter[int] = Counter()
    channels: Counter[int] = Counter()
    total_s = 0.0
    bad: list[str] = []
    # Headers only, read in parallel: fast even for large sets.
    entries = build_index(
        [record.path for record in table.records],
        cache_dir=None,
        members=[record.member for record in table.records],
    )
    for i, (record, entry) in enumerate(zip(table.records, entries, strict=True)):
        if i in table.problems:  # a missing file, or a label outside the class list
            bad.append(table.problems[i])
            continue
        try:
            entry.check(record.path, AudioLimits())
        except AudioFileError as exc:
            bad.append(str(exc))
            continue
        rates[entry.sample_rate] += 1
        channels[entry.channels] += 1
        total_s += entry.frames / entry.sample_rate

    splits = Counter(record.split or "(none)" for record in table.records)
    print(f"source: {args.path}")
    print(f"files: {len(table.records)}")
    print(f"classes: {len(table.class_names)}")
    _print_table(_class_counts(table))
    print(f"splits: {', '.join(f'{name}={n}' for name, n in sorted(splits.items()))}")
    print(f"total duration: {total_s:.1f} s ({total_s / 3600:.2f} h)")
    print(f"sample rates (Hz): {', '.join(f'{r}: {n} files' for r, n in sorted(rates.items()))}")
    print(f"channels: {', '.join(f'{c}: {n} files' for c, n in sorted(channels.items()))}")
    if bad:
        print(
            f"bad files: {len(bad)} (NaN samples show only when decoded; rates and durations "
            "are checked against the data.* defaults)"
        )
        for message in bad:
            print(f"  {message}")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``distillery-data``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "synthetic":
            return _cmd_synthetic(args)
        if args.command == "shards":
            return _cmd_shards(args)
        return _cmd_info(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"distillery-data: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
