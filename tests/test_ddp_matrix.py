"""Every shipped recipe, through the CLI, on 1 and 2 processes (CPU, gloo), with
``accumulate_grad_batches`` 1 and 2 and ``precision`` 32 and bf16-mixed (CPU autocast), at
smoke size. Each cell asserts from ``pipeline.json`` that every stage is ``done``, took an
optimizer step on every rank and wrote its artifacts.

The table (recipe x cell: pass, steps per rank, wall time) is ``make ddp-matrix``: with
``DDP_MATRIX_LOG=<file>`` every cell appends one JSON row to that file, and
``python -m tests.ddp_matrix_report <file> bench/ddp_matrix.md`` renders it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillery.models.io import build_encoder, save_encoder
from tests.helpers import FAST, REPO, cli_env, compose_config
from tests.speech_models import hf_model, write_huggingface
from tests.test_config import EXPERIMENTS, TEACHER_FILES

PROCESSES = {1: [], 2: ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]}
#: (processes, accumulate_grad_batches, precision)
CELLS = [(n, acc, prec) for n in (1, 2) for acc in (1, 2) for prec in ("32", "bf16-mixed")]

#: Speech recipes read a (tiny, random-weight) Hugging Face model: its family, the config key
#: of its weights, and what makes the tiny model fit the recipe.
_PRUNED = "pipeline.stages.prune_distill.module.teacher"
_LAYERS = [
    "pipeline.stages.prune_distill.module.distill_layers=[0,1,2]",
    "pipeline.stages.final_distill.module.distill_layers=[0,1,2]",
]
SPEECH = {
    "dphubert_hubert": ("hubert", _PRUNED, _LAYERS),
    "dphubert_wav2vec2": ("wav2vec2", _PRUNED, _LAYERS),
    "dphubert_wavlm": ("wavlm", _PRUNED, _LAYERS),
    "hubert_pseudo_labels": (
        "hubert",
        "pipeline.stages.teacher.module.encoder",
        [
            "pipeline.stages.teacher.module.encoder.embedding_layer=1",
            "pipeline.stages.teacher.callbacks.pseudo_labeler.k=8",
        ],
    ),
}

#: Stages that take no optimizer step by design: KRR-ST's random-real-subset baseline, the
#: clustering of a trained encoder.
NO_STEPS = {"krr_st_compare": {"random_subset"}, "unfused_labels": {"pseudo_label"}}


def cell_id(cell: tuple[int, int, str]) -> str:
    n, acc, precision = cell
    return f"p{n}-acc{acc}-{precision}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What other runs would have made: a teacher encoder file, Hugging Face directories."""
    root = tmp_path_factory.mktemp("matrix-inputs")
    cfg = {"_target_": "distillery.models.encoders.AudioNTT", "n_mels": 64, "channels": 8}
    save_encoder(root / "teacher.pt", build_encoder(cfg), cfg)
    for family in {family for family, _, _ in SPEECH.values()}:
        write_huggingface(hf_model(family), root / f"{family}-hf")
    return root


def recipe_overrides(experiment: str, inputs: Path) -> list[str]:
    """The recipe at smoke size, with the inputs it reads from other runs."""
    out = [f"experiment={experiment}", *FAST, "eval.plots=false", "eval.probe_epochs=2"]
    if experiment in TEACHER_FILES:
        out.append(f"{TEACHER_FILES[experiment]}={inputs / 'teacher.pt'}")
    if experiment in SPEECH:
        family, key, extra = SPEECH[experiment]
        out += [f"{key}.weights={inputs / f'{family}-hf'}", f"{key}.arch=null", *extra]
        out += ["data.batch_size=4", "debug.trainer.limit_train_batches=2"]
    return out


def cell_overrides(cell: tuple[int, int, str]) -> list[str]:
    n, acc, precision = cell
    return [
        *PROCESSES[n],
        f"++trainer.accumulate_grad_batches={acc}",
        f"++trainer.precision={precision}",
    ]


def check_manifest(
    run_dir: Path, order: list[str], world_size: int, no_steps: set[str]
) -> dict[str, list[int]]:
    """Every stage of ``order`` done, with optimizer steps on every rank (none in
    ``no_steps``) and its artifacts on disk; returns the steps per rank of each stage."""
    manifest = json.loads((run_dir / "pipeline.json").read_text())
    assert list(manifest["stages"]) == order
    steps = {}
    for name, stage in manifest["stages"].items():
        assert stage["status"] == "done", f"{name}: {stage['status']} {stage.get('error')}"
        per_rank = stage["optimizer_steps"]
        assert len(per_rank) == world_size, f"{name}: {per_rank}"
        if name in no_steps:
            assert per_rank == [0] * world_size, f"{name}: {per_rank}"
        else:
            assert min(per_rank) > 0, f"{name}: {per_rank}"
        assert stage["artifacts"], f"{name}: no artifacts"
        for kind, path in stage["artifacts"].items():
            assert (run_dir / path).exists(), f"{name}: artifact {kind} {path} missing"
        steps[name] = per_rank
    return steps


def record(row: dict) -> None:
    """One row of the matrix table, when ``DDP_MATRIX_LOG`` names a file."""
    if path := os.environ.get("DDP_MATRIX_LOG"):
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def run_cell(
    experiment: str, cell: tuple[int, int, str], inputs: Path, tmp: Path, cache: Path
) -> None:
    run_dir = tmp / "run"
    row = {"recipe": experiment, "cell": cell_id(cell), "passed": False}
    overrides = [*recipe_overrides(experiment, inputs), *cell_overrides(cell)]
    overrides += [f"run_dir={run_dir}", f"data.cache_dir={cache}"]
    order = list(compose_config(overrides).pipeline.order)
    start = time.perf_counter()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "distillery.cli", *overrides],
            capture_output=True,
            text=True,
            env=cli_env(OMP_NUM_THREADS="1"),
            cwd=REPO,
            timeout=1800,
        )
        row["wall_s"] = round(time.perf_counter() - start, 1)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        row["steps"] = check_manifest(run_dir, order, cell[0], NO_STEPS.get(experiment, set()))
        row["passed"] = True
    except BaseException as err:
        row["error"] = f"{type(err).__name__}: {str(err)[-600:]}"
        if (run_dir / "pipeline.json").exists():  # the steps of the stages that ran
            stages = json.loads((run_dir / "pipeline.json").read_text())["stages"]
            row["steps"] = {k: s.get("optimizer_steps", []) for k, s in stages.items()}
        raise
    finally:
        row.setdefault("wall_s", round(time.perf_counter() - start, 1))
        record(row)


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_recipe_cell(
    experiment: str, cell: tuple[int, int, str], inputs: Path, tmp_path: Path, data_cache: Path
) -> None:
    run_cell(experiment, cell, inputs, tmp_path, data_cache)


def test_table_from_the_rows_of_a_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.ddp_matrix_report import main

    log = tmp_path / "matrix.jsonl"
    monkeypatch.setenv("DDP_MATRIX_LOG", str(log))
    record({"recipe": "coss", "cell": "p2-acc2-32", "passed": False, "wall_s": 9.0, "error": "x"})
    record({"recipe": "coss", "cell": "p2-acc2-32", "passed": True, "wall_s": 12.4, "steps": {}})
    steps = {"ssl": [2], "coss": [1]}
    record({"recipe": "pll", "cell": "p1-acc1-32", "passed": False, "wall_s": 3.0, "steps": steps})
    main([str(log), str(tmp_path / "table.md"), "on", "2 cores"])
    table = (tmp_path / "table.md").read_text()
    not_run = len(EXPERIMENTS) * len(CELLS) - 2  # two cells have rows
    assert "\non 2 cores\n" in table
    assert f"1 of 2 cells run passed ({not_run} not run)" in table
    coss = next(line for line in table.splitlines() if line.startswith("| coss |")).split(" | ")
    # the last row of a cell counts
    assert coss[1 + [cell_id(c) for c in CELLS].index("p2-acc2-32")] == "pass 12"
    assert "| pll | p1-acc1-32 | ssl 2, coss 1 |" in table and "- pll p1-acc1-32: ``" in table
