"""What every reproduction report (``experiments/*/report.py``) shares: finished runs read
from their ``pipeline.json``, ``mean ± std`` cells, and the results written next to the
report (``results.json``) and into its README between two markers (a report with a second
table uses a second pair of markers and json file, named by ``block``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def mean_std(values: list[float], digits: int = 3) -> str:
    """``"0.875 ± 0.014"`` (sample std); one value alone, ``"-"`` for none."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


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
