"""benchmarks.bench_gap: the paired, region-stratified bootstrap of global − local-only."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_gap import RegionPredictions, overall_gap
from common.metrics import macro_f1


def _region(name: str, n: int, global_right: float, local_right: float, seed: int) -> RegionPredictions:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    flip_g = rng.random(n) > global_right
    flip_l = rng.random(n) > local_right
    return RegionPredictions("run", name, truth, np.where(flip_g, 1 - truth, truth), np.where(flip_l, 1 - truth, truth))


def test_the_gap_is_the_test_weighted_mean_of_the_regions_differences() -> None:
    regions = [_region("a", 200, 0.8, 0.7, 1), _region("b", 50, 0.6, 0.9, 2), _region("c", 120, 0.75, 0.75, 3)]
    gap = overall_gap(regions, 2, resamples=300, seed=0)
    diffs = [macro_f1(r.truth, r.global_pred, 2) - macro_f1(r.truth, r.local_pred, 2) for r in regions]
    assert gap["diff"] == pytest.approx(np.average(diffs, weights=[200, 50, 120]), abs=1e-12)
    assert gap["low"] <= gap["diff"] <= gap["high"] and gap["resamples"] == 300
    # the same seed draws the same resamples
    assert overall_gap(regions, 2, resamples=300, seed=0) == gap


def test_equal_models_have_no_gap_and_a_clear_difference_excludes_zero() -> None:
    same = _region("a", 200, 0.8, 0.8, 1)
    same = RegionPredictions("run", "a", same.truth, same.global_pred, same.global_pred.copy())
    assert overall_gap([same], 2, resamples=200, seed=0) == {"diff": 0.0, "low": 0.0, "high": 0.0, "resamples": 200}
    better = overall_gap([_region("a", 400, 0.95, 0.6, 4)], 2, resamples=500, seed=0)
    worse = overall_gap([_region("a", 400, 0.6, 0.95, 4)], 2, resamples=500, seed=0)
    assert better["low"] > 0 and worse["high"] < 0


def test_bad_arguments_are_refused_before_anything_trains(tmp_path, tiny_bert, two_regions, capsys) -> None:  # type: ignore[no-untyped-def]
    from benchmarks.bench_gap import main
    from common.runfiles import ADAPTER_DIR, CONFIG_FILE, SUMMARY_FILE
    from tests.conftest import tiny_config

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--resamples", "0", "--json", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2 and "--resamples must be at least 1, got 0" in capsys.readouterr().err

    good, bad = tmp_path / "good", tmp_path / "bad"
    for run in (good, bad):
        (run / ADAPTER_DIR).mkdir(parents=True)
        (run / SUMMARY_FILE).write_text("{}")
        tiny_config(run / CONFIG_FILE, tiny_bert, two_regions)
    text = (bad / CONFIG_FILE).read_text()
    (bad / CONFIG_FILE).write_text(text.replace("rounds: 2", "rounds: many"))
    (good / SUMMARY_FILE).unlink()
    assert main([str(good), str(bad), "--json", str(tmp_path / "r.json")]) == 2
    assert f"no {SUMMARY_FILE}" in capsys.readouterr().err
    (good / SUMMARY_FILE).write_text("{}")
    # the second run's config is broken: refused with its file and line before the first run trains
    assert main([str(good), str(bad), "--json", str(tmp_path / "r.json")]) == 2
    captured = capsys.readouterr()
    assert f"{bad / CONFIG_FILE}:" in captured.err and "rounds" in captured.err
    assert captured.out == ""  # nothing predicted or trained: the first run would have printed its progress
    assert not (tmp_path / "r.json").exists()
