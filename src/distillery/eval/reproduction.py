"""What every reproduction report (``experiments/*/report.py``) shares: finished runs read
from their ``pipeline.json``, grouped by data set, the protocol they ran under stated from
their own config, ``mean ± std`` cells, and the results written next to the report
(``results.json``) and into its README between two markers (a report with a second table
uses a second pair of markers and json file, named by ``block``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from distillery.data.splits import assign_splits


def mean_std(values: list[float], digits: int = 3) -> str:
    """``"0.875 ± 0.014"`` (sample std); one value alone, ``"-"`` for none."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def paired_difference(first: list[float], second: list[float], digits: int = 3) -> str:
    """``first - second`` seed by seed (runs of one seed share teacher, data and labelled
    subset): ``"+0.012 ± 0.030, higher in 3 of 5 seeds"``."""
    diffs = [a - b for a, b in zip(first, second, strict=True)]
    spread = f" ± {statistics.stdev(diffs):.{digits}f}" if len(diffs) > 1 else ""
    higher = sum(d > 0 for d in diffs)
    mean = round(statistics.mean(diffs), digits) + 0.0  # + 0.0: no "-0.000"
    return f"{mean:+.{digits}f}{spread}, higher in {higher} of {len(diffs)} seeds"


def finished_stages(manifest: Path) -> dict[str, dict]:
    """The stage records of a run whose every stage is done (else a message saying how to finish it)."""
    stages = json.loads(Path(manifest).read_text())["stages"]
    if unfinished := [name for name, stage in stages.items() if stage["status"] != "done"]:
        raise SystemExit(
            f"{manifest}: stages {unfinished} are not done; re-run the same command to resume them"
        )
    return stages


def finished_runs(
    runs_dir: Path, pattern: str, make_target: str
) -> list[tuple[Path, dict[str, dict]]]:
    """``(pipeline.json path, stages)`` of every run matching ``pattern`` under ``runs_dir``."""
    paths = sorted(Path(runs_dir).glob(pattern))
    if not paths:
        raise SystemExit(f"no runs under {runs_dir}: run `make {make_target}` first")
    return [(path, finished_stages(path)) for path in paths]


def runs_by_data(
    runs_dir: Path, pattern: str, make_target: str
) -> dict[str, list[tuple[Path, dict[str, dict]]]]:
    """Finished runs grouped by data set: ``runs_dir/<data>/<pattern>``, one folder per
    ``data=`` option the reproduction ran on (``make reproduce-* DATASETS=...``)."""
    groups = {
        folder.name: finished_runs(folder, pattern, make_target)
        for folder in sorted(Path(runs_dir).iterdir())
        if folder.is_dir() and any(folder.glob(pattern))
    }
    if not groups:
        raise SystemExit(f"no runs under {runs_dir}/<data>/: run `make {make_target}` first")
    return groups


def run_config(manifest: Path) -> DictConfig:
    """The composed config a run was started with (``<run>/.hydra/config.yaml``)."""
    return OmegaConf.load(Path(manifest).parent / ".hydra" / "config.yaml")


def num_classes(data: DictConfig) -> int:
    if data.source == "speech":
        return len(data.speech.words)
    if data.source == "synthetic":
        return int(data.synthetic.num_classes)
    raise SystemExit(f"data.source={data.source}: the reports know the built-in sources only")


def describe_data(data: DictConfig) -> str:
    """The built-in source, its classes (and chance), split and test-set size."""
    classes = num_classes(data)
    if data.source == "speech":
        sp = data.speech
        train = sp.speakers - sp.val_speakers - sp.test_speakers
        return (
            f"spoken words (espeak-ng), {classes} words (chance {1 / classes:.3f}), "
            f"{sp.speakers} speakers x {sp.clips_per_word} clips per word, split by speaker "
            f"{train}/{sp.val_speakers}/{sp.test_speakers} (train/val/test), "
            f"{sp.test_speakers * classes * sp.clips_per_word} test clips"
        )
    syn = data.synthetic
    labels = np.repeat(np.arange(classes), syn.clips_per_class)
    splits = assign_splits(labels, data.val_fraction, data.test_fraction, data.split_seed)
    return (
        f"synthetic sounds, {classes} classes (chance {1 / classes:.3f}) x "
        f"{syn.clips_per_class} clips, SNR {syn.snr_db_min:g} to {syn.snr_db_max:g} dB, "
        f"{int((splits == 'test').sum())} test clips"
    )


def _count(values: list[float]) -> str:
    low, high = int(min(values)), int(max(values))
    return str(low) if low == high else f"{low}-{high}"


def describe_protocol(runs: list[tuple[Path, dict[str, dict]]]) -> str:
    """What a reader needs to judge a table: the command, the data, the labelled clips of
    each stage that learns from labels and how finetunes were trained and selected, read
    from the runs (a pipeline without such stages gets only the clauses that apply)."""
    cfg = run_config(runs[0][0])
    overrides = OmegaConf.load(runs[0][0].parent / ".hydra" / "overrides.yaml")
    command = " ".join(
        o for o in overrides if not o.startswith(("seed=", "run_dir=", "trainer.enable_progress"))
    )
    seeds = ", ".join(str(run_config(path).seed) for path, _ in runs)
    labelled = {}
    for name, stage in runs[0][1].items():
        if f"{name}/data/labeled_train" not in stage["metrics"]:
            continue  # it learns from no labels (the runner counts them for those that do)
        train, val = (
            _count([s[name]["metrics"][f"{name}/data/labeled_{split}"] for _, s in runs])
            for split in ("train", "val")
        )
        labelled.setdefault(f"{train} / {val}", []).append(f"`{name}`")
    clauses = []
    if labelled:
        clauses.append(
            "labelled clips (train / val) per stage that learns from labels: "
            + "; ".join(f"{', '.join(names)}: {counts}" for counts, names in labelled.items())
        )
    clauses.append(
        "labelled subsets drawn per seed"
        if OmegaConf.select(cfg, "data.label_subset_seed", throw_on_resolution_failure=False)
        is not None
        else "the same labelled subset for every seed"
    )
    # The protocol's finetune budget is stated only where a finetune stage ran under it.
    has_finetune = any(stage["kind"] == "finetune" for stage in runs[0][1].values())
    finetune = cfg.get("stage_kind_settings", {}).get("finetune")
    if has_finetune and finetune:
        trainer, selection = finetune.get("trainer", {}), finetune.get("selection", {})
        clauses.append(
            f"every finetune trains for at most {trainer.max_steps} optimizer steps, validated "
            f"every {trainer.get('val_check_interval', 1)} steps, stops after "
            f"{selection.patience} validations without a better `{selection.monitor}` and is "
            "tested once, with its best-validation weights"
        )
    elif has_finetune:
        clauses.append("finetunes train for the experiment's epochs (no protocol)")
    statement = "; ".join(clauses)
    return (
        f"`distillery {command}`, seeds {seeds}. Data: {describe_data(cfg.data)}. "
        f"{statement[0].upper()}{statement[1:]}."
    )


def publish(here: Path, results: dict, table: str, block: str = "results") -> None:
    """Write ``<block>.json`` and put ``table`` between the README's markers
    ``<!-- <block>:begin -->`` and ``<!-- <block>:end -->``."""
    (here / f"{block}.json").write_text(json.dumps(results, indent=2) + "\n")
    readme = here / "README.md"
    body = readme.read_text()
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    if begin not in body or end not in body:
        raise SystemExit(f"{readme}: no {begin} ... {end} markers to put the table between")
    start, stop = body.index(begin) + len(begin), body.index(end)
    readme.write_text(body[:start] + "\n" + table + "\n" + body[stop:])
    print(table)
