"""What crosses the network between two hosts: Linux network namespaces joined by a veth pair, the SuperLink
on one (10.77.0.1), two country nodes on the other (10.77.0.2); every frame on the wire is captured.

Needs root with CAP_NET_ADMIN (``ip netns``); elsewhere the test is skipped and says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from deploy.config import load_deploy
from deploy.launch import Cluster
from deploy.plan import create_credentials, layout
from tests.conftest import tiny_config, write_region

pytestmark = [pytest.mark.slow, pytest.mark.deployment, pytest.mark.netns]
BIN = Path(sys.executable).parent
LINK_IP, NODE_IP, PORT = "10.77.0.1", "10.77.0.2", 9092


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str, str]]:
    """Two namespaces ("server host", "country host") joined by a veth pair; removed afterwards."""
    tag = str(os.getpid())
    link_ns, node_ns, link_if, node_if = f"fl-link-{tag}", f"fl-node-{tag}", f"fl{tag}a", f"fl{tag}b"
    if _ip("netns", "add", link_ns).returncode != 0:
        pytest.skip("cannot create network namespaces here (needs root with CAP_NET_ADMIN)")
    try:
        steps = [
            ("netns", "add", node_ns),
            ("link", "add", link_if, "type", "veth", "peer", "name", node_if),
            ("link", "set", link_if, "netns", link_ns),
            ("link", "set", node_if, "netns", node_ns),
            ("-n", link_ns, "addr", "add", f"{LINK_IP}/24", "dev", link_if),
            ("-n", node_ns, "addr", "add", f"{NODE_IP}/24", "dev", node_if),
            *[("-n", ns, "link", "set", dev, "up") for ns, dev in ((link_ns, link_if), (node_ns, node_if))],
            *[("-n", ns, "link", "set", "lo", "up") for ns in (link_ns, node_ns)],
        ]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                raise RuntimeError(f"ip {' '.join(step)}: {done.stderr}")
        yield link_ns, node_ns, node_if
    finally:
        for ns in (link_ns, node_ns):
            _ip("netns", "del", ns)


def _capture(node_ns: str, iface: str, folder: Path, markers: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    out, stop = folder / "capture.json", folder / "capture.stop"
    script = Path(__file__).with_name("netns_capture.py")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", node_ns, sys.executable, str(script), iface, str(out), str(stop), *markers]
    )
    deadline = time.monotonic() + 30
    while not out.with_suffix(".ready").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the capture did not start")
        time.sleep(0.1)
    return proc, stop


def _send_plain(link_ns: str, node_ns: str, text: str) -> None:
    """Positive control: plaintext sent across the link must be seen by the capture."""
    listen = f"import socket;s=socket.socket();s.bind(('{LINK_IP}',5999));s.listen();c,_=s.accept();c.recv(99)"
    send = f"import socket;c=socket.create_connection(('{LINK_IP}',5999));c.sendall({text.encode()!r})"
    server = subprocess.Popen(["ip", "netns", "exec", link_ns, sys.executable, "-c", listen])
    time.sleep(1.0)
    subprocess.run(["ip", "netns", "exec", node_ns, sys.executable, "-c", send], check=True, timeout=30)
    server.wait(timeout=10)


def test_only_tls_to_the_superlink_crosses_between_hosts(
    two_hosts: tuple[str, str, str], tmp_path: Path, tiny_bert: Path
) -> None:
    link_ns, node_ns, node_if = two_hosts
    regions = tmp_path / "regions"
    for i, name in enumerate(["north", "south"]):
        write_region(regions / name, 40, 20, seed=20 + i)
    # one round: every kind of message crosses in it (train down and up, validation, the final test evaluation);
    # a second round would send the same kinds again
    run = tiny_config(
        tmp_path / "run.yaml",
        tiny_bert,
        regions,
        rounds=1,
        baselines=[],
        train={"epochs": 1, "batch_size": 8, "threads": 1},
    )
    spec = {
        "run": str(run),
        "workdir": str(tmp_path / "work"),
        "superlink": {"address": LINK_IP, "bind": LINK_IP, "port": PORT},
        "nodes": [{"region": "north", "threads": 1}, {"region": "south", "threads": 1}],
    }
    (tmp_path / "deploy.yaml").write_text(yaml.safe_dump(spec))
    lay = layout(*load_deploy(tmp_path / "deploy.yaml"))
    create_credentials(lay, now=datetime.now(UTC))
    train_text = json.loads((regions / "north" / "train.jsonl").read_text().splitlines()[0])["text"]
    markers = [train_text, "lora_A", "num-examples", "PLAINTEXT-CONTROL"]

    capture, stop = _capture(node_ns, node_if, tmp_path, markers)
    try:
        host_of = lambda name: ["ip", "netns", "exec", node_ns if name.startswith("node-") else link_ns]  # noqa: E731
        with Cluster(lay, bin_dir=BIN, prefix=host_of) as cluster:
            cluster.start_all()
            outcome = cluster.run(timeout=900)
            assert outcome.returncode == 0, cluster.read_log("flwr-run")[-3000:]
        _send_plain(link_ns, node_ns, "PLAINTEXT-CONTROL")
    finally:
        stop.write_text("")
        capture.wait(timeout=30)
    seen = json.loads((tmp_path / "capture.json").read_text())

    assert json.loads((lay.out / "federation.json").read_text())["rounds"][-1]["participants"] == ["north", "south"]
    flows = {k: v for k, v in seen["flows"].items() if not k.startswith("non-ipv4")}
    run_flows = {k: v for k, v in flows.items() if "port 5999" not in k}
    # the nodes talked to the SuperLink's port and nothing else. That the adapters crossed it is shown by both
    # nodes being the round's participants (the only path between the hosts); the byte count below is a floor
    # only (the app bundle and heartbeats alone exceed it on a 4 kB adapter)
    assert set(run_flows) == {f"tcp {LINK_IP}<->{NODE_IP} port {PORT}"}, flows
    adapter_bytes = json.loads((lay.out / "federation.json").read_text())["adapter_bytes"]
    assert sum(run_flows.values()) > 2 * 2 * adapter_bytes
    # encrypted: the capture sees plaintext (control) but none of the training text or record names
    assert seen["markers_found"] == ["PLAINTEXT-CONTROL"]
