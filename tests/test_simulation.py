"""End to end: the real Flower simulation (Ray) with a tiny BERT built in code, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from client.train import evaluate
from common.config import load_config
from common.data import load_region
from common.metrics import macro_f1_of
from common.model import build_model
from fedlocale.cli import main
from tests.conftest import SIMULATED_TRAIN, tiny_config

pytestmark = pytest.mark.slow

TRAIN = SIMULATED_TRAIN  # the shared simulated run's training, for the runs this file makes itself


@pytest.fixture(scope="module")
def run(simulated_run: tuple[Path, Path]) -> tuple[Path, Path]:
    """The session's `fedlocale simulate` of two regions (conftest.simulated_run; test_flwr_run compares with it)."""
    return simulated_run


def test_summary_contract(run: tuple[Path, Path]) -> None:
    _, out = run
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["regions"]) == {"north", "south"}
    for name, region in summary["regions"].items():
        assert region["num_train"] == {"north": 96, "south": 48}[name]
        assert region["num_test"] == 48
        for mode in ("federated", "local_only", "centralized"):
            assert 0.0 <= region[mode]["accuracy"] <= 1.0
            assert 0.0 <= region[mode]["macro_f1"] <= 1.0
        # no personalization: the region serves the global model, compared with its local-only one on test
        against = region["served_vs_local_only"]
        assert against["served"] == "global" and against["low"] <= against["diff"] <= against["high"]
        assert against["diff"] == pytest.approx(region["federated"]["macro_f1"] - region["local_only"]["macro_f1"])
        assert against["reaches_zero"] == (against["high"] >= 0)
        # each baseline says which of its two validation checkpoints (one per round) it kept
        for mode in ("local_only", "centralized"):
            kept = region[mode]["kept_checkpoint"]
            assert kept["of"] == 2 and kept["number"] in (1, 2) and 0 < kept["step"] <= kept["steps"], kept
        assert "federated" in region and "kept_checkpoint" not in region["federated"]
    centralized = {json.dumps(r["centralized"]["kept_checkpoint"]) for r in summary["regions"].values()}
    assert len(centralized) == 1  # one model for every region
    kept = json.loads(centralized.pop())["number"]
    report = (out / "report.md").read_text()
    assert f"the centralized model kept its checkpoint {kept} of 2" in report
    for mode in ("federated", "local_only", "centralized"):
        assert set(summary["overall"][mode]) == {"accuracy", "macro_f1", "pooled_macro_f1"}
        counts = [np.array(region[mode]["confusion"]) for region in summary["regions"].values()]
        for region, matrix in zip(summary["regions"].values(), counts, strict=True):
            # the simulation's pass of the saved global adapter agrees with what the nodes scored
            assert matrix.sum() == region["num_test"]
            assert macro_f1_of(matrix) == pytest.approx(region[mode]["macro_f1"])
        assert summary["overall"][mode]["pooled_macro_f1"] == pytest.approx(macro_f1_of(np.sum(counts, axis=0)))
    comm = summary["communication"]
    assert 0 < comm["adapter_bytes"] < comm["full_model_bytes"]
    # two regions up and down each round, plus the evaluation rounds down
    assert comm["bytes_up_total"] >= 2 * 2 * comm["adapter_bytes"]
    assert all(r["participants"] == ["north", "south"] for r in comm["per_round"])
    timing = summary["timing"]
    assert all(timing[k] > 0 for k in ("federated_s", "centralized_s", "local_only_s", "baselines_s"))
    assert "| Both baselines, as the phase passed" in report
    assert summary["run"]["rounds_done"] == 2
    # the simulated nodes and the server each kept a signed ledger; together they verify
    audit = summary["audit"]
    assert audit["verified"] is True and audit["findings"] == [] and audit["missing_ledgers"] == []
    assert set(audit["ledgers"]) == {"server", "north", "south"}
    assert (out / audit["report"]).is_file()


def test_metrics_lines_cover_every_round_region_and_split(run: tuple[Path, Path]) -> None:
    _, out = run
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    seen = {(x["round"], x["region"], x["split"]) for x in lines}
    for rnd in (1, 2):
        for region in ("north", "south"):
            assert (rnd, region, "train") in seen
            assert (rnd, region, "val") in seen
    assert {(x["region"]) for x in lines if x["split"] == "test"} == {"north", "south"}


def test_report_and_adapter_written(run: tuple[Path, Path]) -> None:
    _, out = run
    report = (out / "report.md").read_text()
    assert "north" in report and "south" in report
    assert "## Served model vs local-only" in report
    assert (out / "val_by_round.png").stat().st_size > 1000
    assert (out / "checkpoints" / "round-002" / "adapter_model.safetensors").exists()


def test_federated_model_beats_untrained(run: tuple[Path, Path], tiny_bert: Path) -> None:
    cfg_path, out = run
    cfg = load_config(cfg_path)
    untrained = build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    trained = PeftModel.from_pretrained(base, str(out / "adapter"))
    summary = json.loads((out / "summary.json").read_text())
    for region in cfg.regions:
        test = load_region(region.name, region.data, cfg.labels).test
        before = evaluate(untrained.model, untrained.tokenizer, test, 2, max_length=32)
        after = evaluate(trained, untrained.tokenizer, test, 2, max_length=32)
        # the saved adapter is the one the summary scored
        assert after.macro_f1 == pytest.approx(summary["regions"][region.name]["federated"]["macro_f1"], abs=1e-6)
        assert after.accuracy > before.accuracy


def test_bad_config_exits_2_before_training(
    tmp_path: Path, tiny_bert: Path, two_regions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tmp_path / "bad.yaml", tiny_bert, two_regions, rounds=0)
    assert main(["simulate", str(cfg), "--set", "train.lr=-1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "rounds: must be >= 1" in err and "train.lr: must be in (0, 1)" in err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_stops_every_process_the_run_started(tiny_bert: Path, two_regions: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    import psutil

    cfg = tiny_config(tmp_path / "long.yaml", tiny_bert, two_regions, train=TRAIN, rounds=20)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlocale", "simulate", str(cfg), "--out", str(tmp_path / "out")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
            time.sleep(1)  # wait until round 1 is done, so Ray and its actors are surely running
        started = psutil.Process(proc.pid).children(recursive=True)
        assert started, "the run started no processes"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    _, alive = psutil.wait_procs(started, timeout=10)
    assert alive == []


STOP_RAY_SCRIPT = """
import subprocess, sys, time
from multiprocessing import resource_tracker
import psutil
from simulations.runner import stop_ray

class NoRay:
    @staticmethod
    def is_initialized():
        return False

resource_tracker.ensure_running()
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
children = psutil.Process().children(recursive=True)
tracker = [p for p in children if "multiprocessing.resource_tracker" in " ".join(p.cmdline())]
stop_ray(NoRay())
time.sleep(0.5)
# a killed child nobody reaped yet is a zombie, which psutil still calls running
alive = [p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tracker]
print(len(tracker), all(alive), sleeper.poll() is not None)
"""


def test_stopping_ray_kills_what_outlived_it_but_spares_pythons_resource_tracker() -> None:
    # in its own process: stop_ray kills this process's other children, which in a test worker are not ours to kill
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", STOP_RAY_SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["1", "True", "True"], done.stderr
