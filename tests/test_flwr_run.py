"""Stock Flower tooling: `flwr run . local` runs our ServerApp/ClientApp and matches `fedlocale simulate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from common.audit import find_ledgers, load_verify_key, verify_all

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _superlinks(flwr_home: Path) -> list[psutil.Process]:
    """The SuperLinks that `flwr run` started detached for this FLWR_HOME."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any("flower-superlink" in part for part in proc.info["cmdline"] or []) and proc.environ().get(
                "FLWR_HOME"
            ) == str(flwr_home):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_flwr_run_matches_the_cli_simulation(simulated_run: tuple[Path, Path], tmp_path: Path) -> None:
    # the config and the `fedlocale simulate` run of it that test_simulation reads too (its baselines run in the
    # CLI only; the federation they are compared on is the same)
    cfg, cli_out = simulated_run
    flwr_home = tmp_path / "flwr-home"
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "HF_HUB_OFFLINE": "1",
    }
    out = tmp_path / "flwr-out"
    try:
        done = subprocess.run(
            [
                f"{bin_dir}/flwr", "run", ".", "local", "--stream",
                "-c", f"config='{cfg}' out-dir='{out}'",
                "--federation-config", "num-supernodes=2",
            ],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
    finally:
        for proc in _superlinks(flwr_home):
            proc.kill()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stock = json.loads((out / "federation.json").read_text())
    # under stock tooling too, each simulated node keeps its signed ledger in the run's folder
    audit = out / "audit"
    trusted = {p.parent.name: load_verify_key(p) for p in audit.rglob("ledger.pub")}
    assert set(trusted) == {"server", "north", "south"}
    result = verify_all(find_ledgers([audit]), trusted)
    assert result.ok, result.findings

    ours = json.loads((cli_out / "federation.json").read_text())
    assert stock["test"].keys() == ours["test"].keys() == {"north", "south"}
    for region, scores in ours["test"].items():
        assert stock["test"][region]["macro_f1"] == pytest.approx(scores["macro_f1"], abs=1e-6)
        assert stock["test"][region]["loss"] == pytest.approx(scores["loss"], abs=1e-5)
