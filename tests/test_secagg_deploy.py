"""Secure aggregation in a real deployment: SuperLink and three SuperNodes on 127.0.0.1 with TLS and node
authentication; one node is killed after it has shared its keys, while it works on the masked-input stage, and
the round completes from the other two (its masks removed from their shares). ~3 min."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from common.audit import EGRESS, read_entries
from common.runfiles import LEDGER_FILE
from deploy.launch import Cluster
from deploy.plan import create_credentials
from fedlocale import deploy_cmd
from tests.test_deploy import _deployment, three_regions  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.deployment]
BIN = Path(sys.executable).parent


def _clientapps_started(cluster: Cluster, name: str) -> list[float]:
    """When each ClientApp process the node's SuperNode runs now was started (seconds since the epoch)."""
    try:
        children = psutil.Process(cluster.procs[name].pid).children(recursive=True)
        return [c.create_time() for c in children if "flwr-clientapp" in " ".join(c.cmdline())]
    except psutil.Error:
        return []


def _shared_keys(ledger: Path, server_round: int) -> bool:
    if not ledger.exists():
        return False
    entries, _ = read_entries(ledger)
    return any(e["body"].get("message") == "secagg_share" and e["body"].get("round") == server_round for e in entries)


def test_a_secure_deployment_survives_a_node_killed_after_sharing_its_keys(
    tmp_path: Path,
    three_regions: Path,  # noqa: F811
    tiny_bert: Path,
) -> None:
    aggregation = {"min_clients": 2, "node_timeout": 20, "round_timeout": 120, "secure": {"enabled": True}}
    _, lay = _deployment(tmp_path, tiny_bert, three_regions, rounds=2, aggregation=aggregation)
    create_credentials(lay, now=datetime.now(UTC))
    north = next(n for n in lay.nodes if n.region == "north")
    killed: list[str] = []
    shared: dict[str, float] = {}

    def kill_north_in_the_mask_stage() -> None:
        # north's ledger holds its share-stage reply of round 1, and a ClientApp started after that line was
        # written runs: the masked-input stage. The share stage's own ClientApp writes the line before it replies
        # and exits; killing that one (slow to exit under load) would make north missing before it shared.
        ledger = north.audit_dir / LEDGER_FILE
        if killed:
            return
        if "at" not in shared:
            if not _shared_keys(ledger, 1):
                return
            shared["at"] = ledger.stat().st_mtime  # the share line is the newest: north sends nothing else yet
        if any(started > shared["at"] for started in _clientapps_started(cluster, "node-north")):
            cluster.stop("node-north", grace=0.0)
            killed.append("north")

    with Cluster(lay, bin_dir=BIN) as cluster:
        cluster.start_all()
        outcome = cluster.run(timeout=900, watch=kill_north_in_the_mask_stage)
        assert outcome.returncode == 0, cluster.read_log("flwr-run")[-3000:]
    assert killed == ["north"]

    rounds = json.loads((lay.out / "federation.json").read_text())["rounds"]
    assert [r["participants"] for r in rounds] == [["east", "south"]] * 2
    assert rounds[0]["missing"] == ["north"] and len(rounds[0]["secure"]["dropped"]) == 1
    assert rounds[0]["train"] == {} and rounds[0]["train_overall"]["num_examples"] == 2 * 48
    # north shared its keys and never uploaded: its ledger says so; the others sent masked, bit-packed uploads
    north_log = [e["body"] for e in read_entries(north.audit_dir / LEDGER_FILE)[0] if e["body"]["kind"] == EGRESS]
    assert ("secagg_share", 1) in {(b["message"], b["round"]) for b in north_log}
    assert ("train", 1) not in {(b["message"], b["round"]) for b in north_log}
    for node in lay.nodes:
        if node.region == "north":
            continue
        bodies = [e["body"] for e in read_entries(node.audit_dir / LEDGER_FILE)[0]]
        uploads = [b for b in bodies if b.get("message") == "train"]
        assert [b["round"] for b in uploads] == [1, 2]
        assert all(b["protections"]["secure_aggregation"] and b["status"] == "sent" for b in uploads)
    # what `deploy up` does after the run: every ledger verified, each secure round recomputed from its sum
    assert deploy_cmd._finish(lay.out, lay.deploy.run, outcome, {n.region: n.audit_dir for n in lay.nodes}) == 0
    audit = json.loads((lay.out / "summary.json").read_text())["audit"]
    assert audit["verified"] and not audit["findings"] and audit["rounds_recomputed"] == 2, audit
