"""What every reproduction report (``experiments/*/report.py``) shares: finished runs read
from their ``pipeline.json``, ``mean ± std`` cells, and the results written next to the
report (``results.json``) and into its README between two markers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


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


def publish(here: Path, results: dict, table: str) -> None:
    """Write ``results.json`` and put ``table`` between the README's result markers."""
    (here / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    readme = here / "README.md"
    body = readme.read_text()
    start, end = body.index(BEGIN) + len(BEGIN), body.index(END)
    readme.write_text(body[:start] + "\n" + table + "\n" + body[end:])
    print(table)
