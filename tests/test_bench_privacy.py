"""The privacy benchmark's own logic: which option combinations it refuses before anything runs, and how the
scenario's table reads the audit's numbers (a rate the non-members cannot resolve says why)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_privacy import main, rate_text, scenario_overrides, scenario_rows, scenario_table

CONFIG = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "privacy-leak.yaml"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epsilons", "8"], "--epsilons only with --simulate CONFIG"),
        (["runs/x", "--set", "seed=1", "--delta", "1e-6"], "--delta, --set only with --simulate CONFIG"),
        (["runs/x", "--simulate", str(CONFIG)], "not both"),
        (["--simulate", "no/such.yaml"], "no/such.yaml: no such file"),
        (["--simulate", str(CONFIG), "--epsilons", "8", "0"], "--epsilons must be > 0"),
        (["--simulate", str(CONFIG), "--epsilons", "nan"], "--epsilons must be > 0"),
        (["--simulate", str(CONFIG), "--epsilons", "8", "inf", "8"], "--epsilons names 8.0 more than once"),
        (["--simulate", str(CONFIG), "--delta", "1"], "--delta must be in (0, 1)"),
    ],
)
def test_refused_before_anything_runs(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_existing_runs_dir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--simulate", str(CONFIG), "--runs-dir", str(tmp_path)])
    assert stopped.value.code == 2
    assert f"--runs-dir {tmp_path} exists" in capsys.readouterr().err


def test_a_dp_run_that_personalizes_covers_its_served_model() -> None:
    assert scenario_overrides(["seed=1"], float("inf"), "dual") == ["seed=1"]
    assert scenario_overrides(["seed=1"], 8.0, "dual") == ["seed=1", "personalize.dp=true"]
    assert scenario_overrides([], 1.0, "none") == []


def _result(auc: float, tpr1: float | None, tpr01: float | None) -> dict[str, object]:
    return {"auc": auc, "auc_ci95": [auc - 0.05, auc + 0.05], "tpr_at_fpr": {"0.01": tpr1, "0.001": tpr01}}


def _run(epsilon: float | None, auc: float) -> dict[str, object]:
    canary = {"canaries": 5, "mean_exposure": 4.5, "max_exposure": 6.658, "ranked_first": 2}
    return {
        "epsilon": epsilon,
        "privacy": {
            "regions": {
                "a": {
                    "members": 200,
                    "nonmembers": 200,
                    "served": "personalized",
                    "models": {
                        "update": {"loss": _result(auc, 0.02, None)},
                        "global": {"loss": _result(auc, 0.05, None), "reference": _result(auc, 0.1, None)},
                    },
                    "canaries": {"global": canary},
                }
            }
        },
    }


def test_rows_in_table_order_with_canaries_of_their_model() -> None:
    rows = scenario_rows([_run(1.0, 0.5), _run(None, 0.8)])
    # region, then epsilon from inf down, then the audit's model order, then attack
    assert [(r["epsilon"], r["model"], r["attack"]) for r in rows] == [
        (None, "global", "loss"),
        (None, "global", "reference"),
        (None, "update", "loss"),
        (1.0, "global", "loss"),
        (1.0, "global", "reference"),
        (1.0, "update", "loss"),
    ]
    assert rows[0]["auc"] == 0.8 and rows[3]["auc"] == 0.5
    assert rows[0]["canary_mean_exposure"] == 4.5 and rows[2]["canaries"] is None
    lines = scenario_table(rows)
    assert "0.800 [0.75, 0.85]" in lines[1] and "n/a (200<1000)" in lines[1] and "4.50/6.66 (2/5)" in lines[1]
    assert lines[3].rstrip().endswith("-")  # the update was not ranked on canaries


def test_rate_text_says_why_a_rate_is_missing() -> None:
    assert rate_text(0.0125, 2000, 0.001) == "0.013"
    assert rate_text(None, 200, 0.001) == "n/a (200<1000)"
    assert rate_text(None, 99, 0.01) == "n/a (99<100)"
    # enough non-members but no rate (an empty side): no reason to give
    assert rate_text(None, 1000, 0.001) == "n/a"
