"""Render the recipe x cell table of ``tests/test_ddp_matrix.py`` as Markdown.

    python -m tests.ddp_matrix_report bench/ddp_matrix.jsonl bench/ddp_matrix.md ["note"]

The input has one JSON row per cell run (``DDP_MATRIX_LOG``); a cell run twice keeps its
last row. Cells never run show as ``not run``. The note (e.g. the machine and its load,
which the wall times depend on) goes under the heading.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.test_config import EXPERIMENTS
from tests.test_ddp_matrix import CELLS, cell_id

COMMAND = "make ddp-matrix"


def read_rows(path: Path) -> dict[tuple[str, str], dict]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["recipe"], row["cell"]] = row
    return rows


def _steps(row: dict) -> str:
    """Steps per rank of each stage: ``ssl 2/2, finetune 1/1``."""
    return ", ".join(
        f"{stage} {'/'.join(map(str, ranks)) or '-'}"
        for stage, ranks in row.get("steps", {}).items()
    )


def render(rows: dict[tuple[str, str], dict], note: str = "") -> str:
    cells = [cell_id(c) for c in CELLS]
    passed = sum(r["passed"] for r in rows.values())
    failed = [r for r in rows.values() if not r["passed"]]
    lines = [
        "# DDP x accumulation x precision matrix",
        "",
        f"Every recipe in `conf/experiment/` at smoke size through the CLI (`{COMMAND}`, which",
        "runs `tests/test_ddp_matrix.py` with `DDP_MATRIX_LOG` set, then",
        "`python -m tests.ddp_matrix_report`). Cells: `p<processes>` (2 = CPU DDP, gloo),",
        "`acc<accumulate_grad_batches>`, `precision`. A cell passes when the run exits 0 and",
        "`pipeline.json` shows every stage `done`, optimizer steps > 0 on every rank and its",
        "artifacts on disk.",
        *(["", note] if note else []),
        "",
        f"{passed} of {len(rows)} cells run passed"
        f" ({len(EXPERIMENTS) * len(cells) - len(rows)} not run).",
        "",
        "## Pass and wall time (s)",
        "",
        "| recipe | " + " | ".join(cells) + " |",
        "| --- |" + " --- |" * len(cells),
    ]
    for recipe in EXPERIMENTS:
        entries = []
        for cell in cells:
            row = rows.get((recipe, cell))
            entries.append(
                "not run"
                if row is None
                else f"{'pass' if row['passed'] else '**fail**'} {row['wall_s']:.0f}"
            )
        lines.append(f"| {recipe} | " + " | ".join(entries) + " |")
    lines += [
        "",
        "## Optimizer steps per rank (stage: rank 0/rank 1)",
        "",
        "| recipe | cell | steps |",
        "| --- | --- | --- |",
    ]
    for recipe in EXPERIMENTS:
        for cell in cells:
            if (row := rows.get((recipe, cell))) is not None:
                lines.append(f"| {recipe} | {cell} | {_steps(row)} |")
    if failed:
        lines += ["", "## Failures", ""]
        for row in failed:
            error = " ".join(row.get("error", "").split())[-400:]
            lines.append(f"- {row['recipe']} {row['cell']}: `{error}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    source, target = Path(argv[0]), Path(argv[1])
    target.write_text(render(read_rows(source), note=" ".join(argv[2:])))
    print(f"wrote {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
