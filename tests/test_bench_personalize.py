"""The personalization benchmark's bookkeeping: targets per seed and on the mean over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.bench_personalize import check_targets, compare_choices, mean_summary


def _summary(f1: dict[str, dict[str, float]], chosen: str = "personalized", epochs: float = 1.0) -> dict[str, Any]:
    regions = {
        name: {
            **{mode: {"macro_f1": value} for mode, value in modes.items()},
        }
        for name, modes in f1.items()
    }
    for row in regions.values():
        row["personalized"].update(chosen=chosen, epochs=epochs, bytes_sent=0, ab={})
    modes = next(iter(f1.values())).keys()
    overall = {m: {"macro_f1": sum(r[m] for r in f1.values()) / len(f1)} for m in modes}
    return {"regions": regions, "overall": overall}


def test_targets_hold_on_the_mean_even_when_one_seed_misses() -> None:
    a = _summary({"x": {"federated": 0.5, "personalized": 0.60, "local_only": 0.62, "centralized": 0.5}})
    b = _summary({"x": {"federated": 0.5, "personalized": 0.70, "local_only": 0.60, "centralized": 0.7}}, "global", 0.0)
    assert check_targets(a)["personalized_ge_local_only_every_region"] is False
    averaged = mean_summary([a, b])
    targets = check_targets(averaged)
    assert targets["macro_f1"]["x"]["personalized"] == pytest.approx(0.65)
    assert targets["macro_f1"]["x"]["local_only"] == pytest.approx(0.61)
    assert targets["personalized_ge_local_only_every_region"] is True
    assert targets["personalized_overall_ge_centralized"] is True  # 0.65 >= 0.60
    assert targets["max_personalize_epochs"] == 1.0  # the worst seed's cost
    assert averaged["regions"]["x"]["personalized"]["chosen"] == "1/2 P"


def test_a_region_below_local_only_on_the_mean_fails_the_target() -> None:
    rows = {
        "x": {"federated": 0.5, "personalized": 0.7, "local_only": 0.6, "centralized": 0.5},
        "y": {"federated": 0.5, "personalized": 0.55, "local_only": 0.6, "centralized": 0.5},
    }
    targets = check_targets(mean_summary([_summary(rows), _summary(rows)]))
    assert targets["personalized_ge_local_only_every_region"] is False
    assert targets["personalized_ge_federated_every_region"] is True


def _with_evidence(summary: dict[str, Any], test_personalized: float, diff: float, high: float) -> dict[str, Any]:
    entry = summary["regions"]["x"]["personalized"]
    entry["personalized_test"] = {"macro_f1": test_personalized}
    entry["val_ab"] = {"diff": diff, "low": diff - 0.1, "high": high, "resamples": 1000, "level": 0.95}
    return summary


def test_choice_rules_are_compared_from_the_recorded_evidence() -> None:
    row = {"x": {"federated": 0.5, "personalized": 0.7, "local_only": 0.6, "centralized": 0.5}}
    slightly_worse = _with_evidence(_summary(row), 0.8, diff=-0.01, high=0.05)  # point goes back, confident not
    clearly_worse = _with_evidence(_summary(row), 0.4, diff=-0.2, high=-0.05)  # both go back to 0.5
    better = _with_evidence(_summary(row), 0.7, diff=0.05, high=0.15)  # both keep 0.7
    compared = compare_choices([slightly_worse, clearly_worse, better])["x"]
    assert compared["point"] == pytest.approx((0.5 + 0.5 + 0.7) / 3)
    assert compared["confident"] == pytest.approx((0.8 + 0.5 + 0.7) / 3)
    assert compared["seeds_differing"] == 1


def test_a_summary_without_validation_evidence_cannot_be_replayed() -> None:
    row = {"x": {"federated": 0.5, "personalized": 0.7, "local_only": 0.6, "centralized": 0.5}}
    old = _summary(row)
    old["regions"]["x"]["personalized"]["val_macro_f1"] = {"global": 0.6, "personalized": 0.5}
    with pytest.raises(ValueError, match=r"region x: .* no val_ab evidence"):
        compare_choices([old])


def test_results_files_combine_into_the_mean_over_all_their_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from benchmarks.bench_personalize import combined, summarize

    def run(values: list[float]) -> list[dict[str, Any]]:
        out = []
        for v in values:
            row = {"x": {"federated": 0.5, "personalized": v, "local_only": 0.6, "centralized": 0.5}}
            out.append({**_with_evidence(_summary(row), v, diff=0.0, high=0.1), "timing": {"total_s": 1.0}})
        return out

    first, second = run([0.5, 0.6]), run([0.9])
    paths = []
    for i, (seeds, summaries) in enumerate((([0, 1], first), ([7], second))):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps({"seeds": seeds, **summarize({"dual": summaries}, seeds)}))
    seeds, joined = combined(paths)
    assert seeds == [0, 1, 7] and len(joined["dual"]) == 3
    mean = summarize(joined, seeds)["dual"]["mean"]
    assert mean == summarize({"dual": first + second}, seeds)["dual"]["mean"]
    assert mean["macro_f1"]["x"]["personalized"] == pytest.approx(2.0 / 3.0)
    assert mean["personalized_ge_local_only_every_region"] is True  # 0.667 >= 0.6, though two seeds of three miss
    capsys.readouterr()
    with pytest.raises(SystemExit, match="a seed is in more than one file"):
        combined([paths[0], paths[0]])


def test_reuse_reads_the_saved_run_of_the_seed_asked_for(tmp_path: Path) -> None:
    import json

    from benchmarks.bench_personalize import saved_summary

    with pytest.raises(SystemExit, match=r"seed-3/summary\.json does not exist \(run the benchmark without --reuse"):
        saved_summary(tmp_path / "seed-3", 3)
    (tmp_path / "seed-3").mkdir()
    (tmp_path / "seed-3" / "summary.json").write_text(json.dumps({"run": {"seed": 4}, "regions": {}}))
    with pytest.raises(SystemExit, match="is a run of seed 4, not 3"):
        saved_summary(tmp_path / "seed-3", 3)
    assert saved_summary(tmp_path / "seed-3", 4)["run"]["seed"] == 4
