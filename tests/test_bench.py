"""The benchmark suite's smoke variant runs end to end and writes well-formed results."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from distillery.bench.__main__ import NAMES, main
from distillery.bench.timing import Comparison, interleaved, median


def test_interleaved_alternates_order_and_uses_reported_seconds() -> None:
    calls: list[str] = []

    def variant(name: str, seconds: float | None) -> Callable[[], float | None]:
        def run() -> float | None:
            calls.append(name)
            return seconds

        return run

    seconds = interleaved({"a": variant("a", 2.0), "b": variant("b", None)}, repeats=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert seconds["a"] == [2.0, 2.0, 2.0]
    assert len(seconds["b"]) == 3 and all(s >= 0 for s in seconds["b"])
    assert median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        interleaved({"a": variant("a", 1.0)}, repeats=0)


def test_comparison_ratio_and_goal() -> None:
    faster = Comparison("b", "m", "s", "cand", "base", 1.0, 2.0, higher_is_better=False, goal=0.9)
    assert faster.ratio == 0.5 and faster.goal_met is True
    slower = Comparison(
        "b", "m", "1/s", "cand", "base", 80.0, 100.0, higher_is_better=True, goal=0.9
    )
    assert slower.to_dict()["goal_met"] is False


#: data_scale has its own (slow) test below.
FAST_NAMES = [name for name in NAMES if name != "data_scale"]


@pytest.mark.slow  # about a minute; `make test` stays within its time budget
def test_quick_bench_writes_results(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "bench"
    table = main(
        ["--quick", "--out", str(out), "--cache-dir", str(data_cache), "--only", *FAST_NAMES]
    )

    result = json.loads((out / "results.json").read_text())  # strict JSON: no NaN
    machine = result["machine"]
    for key in ("cpu_model", "cpu_count", "torch", "lightning", "faiss", "torch_threads"):
        assert machine[key], key
    assert set(result["benchmarks"]) == set(FAST_NAMES)
    rows = result["table"]
    assert {row["benchmark"] for row in rows} == {
        "clustering",
        "training overhead",
        "input pipeline",
        "pseudo-labeling",
        "end to end",
        "pruned_inference",
        "speedups",
    }
    for row in rows:
        assert row["baseline_value"] > 0 and row["candidate_value"] >= 0, row
        assert math.isfinite(row["ratio"]), row
        assert row["ratio"] == pytest.approx(row["candidate_value"] / row["baseline_value"])
    training = result["benchmarks"]["training"]["raw"]
    assert training["ratio"] > 0 and isinstance(training["goal_met"], bool)
    pseudo = result["benchmarks"]["pseudo_labels"]["raw"]
    assert set(pseudo["ratios"]) == {"cluster_time", "total_time", "inertia"}
    pruned = result["benchmarks"]["pruned_inference"]["raw"]
    for name in ("transformer", "hubert_tiny", "wav2vec2_tiny", "wavlm_tiny"):
        assert 0 < pruned[name]["pruned_params"] < pruned[name]["teacher_params"], name
    end_to_end = result["benchmarks"]["end_to_end"]["raw"]
    assert end_to_end["median_peak_rss_mib"]["pipeline"] > 0

    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# distillery benchmarks")
    assert markdown == table and "| training overhead |" in markdown


@pytest.mark.slow  # ~1 min: clip folders, one subprocess epoch per size
def test_quick_data_scale_merges_into_earlier_results(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "bench"
    main(["--quick", "--out", str(out), "--cache-dir", str(data_cache), "--only", "speedups"])
    speedups = json.loads((out / "results.json").read_text())["benchmarks"]["speedups"]
    table = main(
        ["--quick", "--out", str(out), "--cache-dir", str(data_cache), "--only", "data_scale"]
    )

    result = json.loads((out / "results.json").read_text())
    assert list(result["benchmarks"]) == ["speedups", "data_scale"]  # NAMES order
    assert result["benchmarks"]["speedups"]["rows"] == speedups["rows"]  # kept as measured
    assert "| speedups |" in table and "| data at scale |" in table
    assert "Rows of speedups come from an earlier run: `python -m distillery.bench --quick" in table
    raw = result["benchmarks"]["data_scale"]["raw"]
    for count in raw["counts"]:
        assert raw["epoch"][str(count)]["peak_rss_mib"] > 0
        assert raw["index"][str(count)]["cached_s_per_10k"] > 0
    parts = raw["embedding_seconds_per_clip"]
    assert min(parts["decode"], parts["featurize"], parts["forward"], parts["pass"]) > 0
    measures = {row["measure"] for row in result["table"] if row["benchmark"] == "data at scale"}
    assert measures == {
        "index build time per 10k files",
        "peak RSS of one rank, one training epoch (lazy)",
        "train throughput",
        "embedding throughput (pseudo-labeling pass)",
    }
