"""Faults in a real deployment: a node killed mid-round, too few nodes, and a server restarted with resume."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from client.personal import FROM_ROUND, personal_folder, read_metadata, round_file
from common.runfiles import PERSONALIZED_REPORT
from deploy.launch import Cluster
from deploy.plan import create_credentials
from tests.test_deploy import _deployment, three_regions  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.deployment]
BIN = Path(sys.executable).parent


def _running_clientapp(cluster: Cluster, name: str) -> bool:
    """True while the node's SuperNode runs a ClientApp process (a message is being worked on)."""
    try:
        children = psutil.Process(cluster.procs[name].pid).children(recursive=True)
        return any("flwr-clientapp" in " ".join(c.cmdline()) for c in children)
    except psutil.Error:
        return False


def _val_rounds(out: Path) -> set[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return set()
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return {r["round"] for r in rows if r["split"] == "val"}


def test_killed_nodes_then_a_resumed_server_lose_nothing(
    tmp_path: Path,
    three_regions: Path,  # noqa: F811
    tiny_bert: Path,
) -> None:
    aggregation = {"min_clients": 2, "node_timeout": 20, "round_timeout": 120}
    # north's operator trains a personal LoRA alongside (personalize mode dual): it must survive the kill
    # from the last round's global adapter (sent beside the best round's when they differ) and its slices
    (tmp_path / "personalize.yaml").write_text("mode: dual\nlocal_r: 2\nstart: last\n")
    _, lay = _deployment(
        tmp_path,
        tiny_bert,
        three_regions,
        rounds=3,
        aggregation=aggregation,
        node_extra={"north": {"personalize": "personalize.yaml"}},
        # a min_delta above any gain keeps round 1 the best, so the last round's adapter travels beside it
        early_stopping={"min_delta": 10.0},
    )
    north = next(n for n in lay.nodes if n.region == "north")
    assert north.personal_dir is not None
    personal = personal_folder(north.personal_dir, "north")
    create_credentials(lay, now=datetime.now(UTC))
    out = lay.out
    killed: list[str] = []

    def kill_mid_round() -> None:
        # round 2: south dies while training, the round goes on with east + north;
        # round 3: north dies too, one region left, below the minimum of 2
        done = _val_rounds(out)
        for after, region in ((1, "south"), (2, "north")):
            name = f"node-{region}"
            if region not in killed and after in done and _running_clientapp(cluster, name):
                cluster.stop(name, grace=0.0)
                killed.append(region)

    with Cluster(lay, bin_dir=BIN) as cluster:
        cluster.start_all()
        first = cluster.run(timeout=900, watch=kill_mid_round)

        assert killed == ["south", "north"], cluster.read_log("flwr-run")[-3000:]
        error = (out / "server-error.txt").read_text()
        assert "round 3" in error and "checkpoints/round-002" in error and "resume" in error, error
        state = json.loads((out / "state.json").read_text())
        assert state["completed_round"] == 2
        round2 = state["rounds"][1]
        assert round2["missing"] == ["south"] and round2["participants"] == ["east", "north"]
        assert any(r.get("region") == "south" for r in round2["rejected"]), round2["rejected"]
        # north kept its own LoRA of rounds 1 and 2 (it died in round 3)
        assert {"round-001.safetensors", "round-002.safetensors"} <= {p.name for p in personal.iterdir()}

        # the operator brings the nodes back and restarts the server from its checkpoint
        for region in ("south", "north"):
            cluster.start_node(next(n for n in lay.nodes if n.region == region))
            cluster.wait_node(f"node-{region}")
        time.sleep(2)
        second = cluster.run(resume=True, timeout=900, name="flwr-run-resumed")
        assert second.returncode == 0, cluster.read_log("flwr-run-resumed")[-3000:]
    assert first.run_id != second.run_id

    result = json.loads((out / "federation.json").read_text())
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3]
    assert result["rounds"][2]["participants"] == ["east", "north", "south"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(Counter((x["round"], x["region"], x["split"]) for x in lines).values()) == 1
    assert {x["region"] for x in lines if x["round"] == 2 and x["split"] == "train"} == {"east", "north"}
    assert not (out / "server-error.txt").exists()

    # restarted, north trained round 3 in the resumed run from its round-2 slices (not afresh) and personalized
    # the final model with them; its train replies were plain global adapters (the server took them in)
    assert read_metadata(round_file(personal, 3))[FROM_ROUND] == "2"
    report = json.loads((north.personal_dir / "north" / PERSONALIZED_REPORT).read_text())
    assert (report["mode"], report["round"], report["bytes_sent"]) == ("dual", result["best_round"], 0)
    assert result["best_round"] == 1 and (report["start_round"], report["personal_round"]) == (3, 3)
    adapter = json.loads((north.personal_dir / "north" / "personalized" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 + 2
