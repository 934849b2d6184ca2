"""The processes benchmark's own logic: its runs are paired by repeat and compared with the first setting."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench_processes import measure
from tests.conftest import tiny_config


def test_the_baselines_in_one_and_two_processes_are_paired_and_agree(
    tiny_bert: Path, two_regions: Path, tmp_path: Path
) -> None:
    path = tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions, baselines=["centralized", "local_only"])
    result = measure(path, [], [2, 1], repeats=2)
    # alternated: 2, 1 in the first repeat, 1, 2 in the second
    assert [(r["processes"], r["repeat"]) for r in result["runs"]] == [(2, 0), (1, 0), (1, 1), (2, 1)]
    first, other = result["settings"]["2"], result["settings"]["1"]
    assert first["wall_over_first"] == [1.0, 1.0]
    assert len(other["wall_over_first"]) == 2 and all(ratio > 0 for ratio in other["wall_over_first"])
    # train.threads is 1 in the tiny config: the settings sum alike and must agree exactly
    assert other["max_abs_region_f1_diff_from_first"] == 0.0
    assert other["pooled_macro_f1"] == first["pooled_macro_f1"]
    assert set(first["pooled_macro_f1"]) == {"centralized", "local_only"}
