"""The run folder's summary.json as a typed object: written atomically, read back equal, refused when broken."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.config import load_config
from common.errors import EXIT_BAD_INPUT, InputError
from common.runfiles import REPORT_FILE, SUMMARY_FILE, Summary, SummaryError, read_summary, write_summary
from runfolder.summary import build_summary, with_personalized
from tests.conftest import tiny_config, write_region


def _federation() -> dict[str, Any]:
    """What server.federation writes to federation.json for two regions and two rounds (the parts read here)."""
    rounds = [
        {
            "round": r,
            "bytes_up": 100 * r,
            "bytes_down": 50 * r,
            "participants": ["north", "south"],
            "missing": [],
            "rejected": [],
            "train": {"north": {"num_examples": 30}, "south": {"num_examples": 20}},
        }
        for r in (1, 2)
    ]
    return {
        "rounds": rounds,
        "test": {
            "north": {"num_examples": 10, "accuracy": 0.8, "macro_f1": 0.75, "loss": 0.4},
            "south": {"num_examples": 30, "accuracy": 0.6, "macro_f1": 0.5, "loss": 0.7},
        },
        "best_round": 2,
        "stopped_early": False,
        "adapter_bytes": 1000,
        "full_model_bytes": 100000,
        "seconds": 3.5,
    }


@pytest.fixture
def deployed(tmp_path: Path) -> Summary:
    """A deployment's summary: built from the server's record alone (no region data)."""
    regions = tmp_path / "regions"
    for i, name in enumerate(["north", "south"]):
        write_region(regions / name, 12, 6, seed=i)
    cfg = load_config(tiny_config(tmp_path / "run.yaml", tmp_path / "base", regions))
    return build_summary(cfg, None, _federation(), {}, 9.0, "run.yaml", audit={"verified": True, "findings": []})


def test_a_deployment_summary_has_the_known_shape_and_scores(deployed: Summary) -> None:
    written = deployed.to_json()
    assert list(written) == ["run", "regions", "overall", "communication", "timing", "audit"]
    assert written["regions"]["north"] == {
        "num_test": 10,
        "num_train": 30,
        "federated": {"accuracy": 0.8, "macro_f1": 0.75},
    }
    # weighted by test size: (0.75 * 10 + 0.5 * 30) / 40
    assert written["overall"]["federated"]["macro_f1"] == pytest.approx(0.5625)
    assert written["communication"]["bytes_up_total"] == 300 and written["run"]["rounds_done"] == 2
    assert written["timing"] == {"federated_s": 9.0, "federation_loop_s": 3.5}
    # which server optimizer made the global model, with the hyperparameters it stepped with
    assert written["run"]["optimizer"] == {"name": "fedavg", "server_lr": 1.0}
    assert written["run"]["aggregation"] == "weighted" and written["run"]["server_lr"] == 1.0


def test_the_summary_names_an_adaptive_optimizer_with_its_defaults_filled_in(tmp_path: Path) -> None:
    regions = tmp_path / "regions"
    for i, name in enumerate(["north", "south"]):
        write_region(regions / name, 12, 6, seed=i)
    path = tiny_config(
        tmp_path / "run.yaml", tmp_path / "base", regions, aggregation={"optimizer": "fedyogi", "tau": 0.01}
    )
    summary = build_summary(load_config(path), None, _federation(), {}, 9.0, "run.yaml").to_json()
    assert summary["run"]["optimizer"] == {
        "name": "fedyogi",
        "server_lr": 0.01,
        "beta_1": 0.9,
        "beta_2": 0.99,
        "tau": 0.01,
    }
    assert summary["run"]["server_lr"] == 0.01


def test_write_then_read_gives_the_same_summary_and_leaves_no_temp_file(deployed: Summary, tmp_path: Path) -> None:
    run = tmp_path / "run"
    path = write_summary(run, deployed)
    assert path == run / SUMMARY_FILE and [p.name for p in run.iterdir()] == [SUMMARY_FILE]
    assert read_summary(run) == deployed
    assert json.loads(path.read_text()) == deployed.to_json()  # the file is exactly what to_json gives
    without_audit = Summary(regions=deployed.regions, run=deployed.run)
    write_summary(run, without_audit)  # replaces the file: no audit section at all, not "audit": null
    assert "audit" not in json.loads(path.read_text()) and read_summary(run) == without_audit


def test_personalized_results_go_into_a_new_summary(deployed: Summary) -> None:
    entries = {
        name: {"accuracy": acc, "macro_f1": f1, "seconds": 2.0, "chosen": "personalized"}
        for name, acc, f1 in (("north", 0.9, 0.85), ("south", 0.7, 0.65))
    }
    after = with_personalized(deployed, entries)
    assert "personalized" not in deployed.regions["north"] and "personalized" not in deployed.overall
    assert after.regions["north"]["personalized"] == entries["north"]
    assert after.overall["personalized"]["macro_f1"] == pytest.approx((0.85 * 10 + 0.65 * 30) / 40)
    assert after.timing["personalize_s"] == 4.0 and after.audit == deployed.audit


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "summary.json: no such file (is "),
        ("{not json", "summary.json: not valid JSON"),
        ("[1, 2]", "summary.json: not a JSON object"),
        ('{"run": {}}', "summary.json: no 'regions' object"),
        ('{"regions": {}, "timing": [1]}', "summary.json: 'timing' is a list, not an object"),
        ('{"regions": {}, "region": {}}', "summary.json: unknown section(s) region"),
    ],
)
def test_a_missing_or_broken_summary_is_an_input_error_naming_the_file(
    tmp_path: Path, content: str | None, message: str
) -> None:
    if content is not None:
        (tmp_path / SUMMARY_FILE).write_text(content)
    with pytest.raises(SummaryError) as caught:
        read_summary(tmp_path)
    assert isinstance(caught.value, InputError) and caught.value.exit_code == EXIT_BAD_INPUT
    assert str(caught.value).startswith(f"{tmp_path / SUMMARY_FILE}: ") and message in str(caught.value)


def test_report_of_a_broken_summary_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedlocale.cli import main

    (tmp_path / SUMMARY_FILE).write_text('{"regions": []}')
    assert main(["report", str(tmp_path)]) == EXIT_BAD_INPUT
    assert f"fedlocale: {tmp_path / SUMMARY_FILE}: no 'regions' object" in capsys.readouterr().err
    assert not (tmp_path / REPORT_FILE).exists()
