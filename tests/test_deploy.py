"""Deployment with real Flower processes on 127.0.0.1: TLS, node authentication, parity with the simulation."""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from common.pki import create_ca, create_node_keys
from deploy.config import load_deploy, read_deploy
from deploy.launch import Cluster, LaunchError
from deploy.plan import Layout, create_credentials, layout, render
from fedlocale.cli import main
from tests.conftest import make_tiny_model, tiny_config, write_region

BIN = Path(sys.executable).parent
TRAIN = {"lr": 3e-2, "epochs": 2, "batch_size": 8, "threads": 1}
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def three_regions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deploy-regions")
    for i, name in enumerate(["east", "north", "south"]):
        write_region(root / name, 48, 24, seed=10 + i, pos_fraction=0.3 + 0.2 * i)
    return root


def _deployment(tmp_path: Path, model: Path, regions: Path, **run_extra: object) -> tuple[Path, Layout]:
    run = tiny_config(tmp_path / "run.yaml", model, regions, train=TRAIN, baselines=[], **run_extra)
    link, *nodes = _free_ports(4)
    spec = {
        "run": "run.yaml",
        "workdir": "work",
        "superlink": {"address": "127.0.0.1", "port": link, "hosts": ["localhost"]},
        "nodes": [
            {"region": r, "port": p, "threads": 1} for r, p in zip(["east", "north", "south"], nodes, strict=True)
        ],
    }
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run.exists()
    return path, layout(*load_deploy(path))


@pytest.mark.slow
def test_deployment_with_tls_and_node_auth_matches_the_simulation(
    tmp_path: Path, three_regions: Path, tiny_bert: Path
) -> None:
    deploy_file, lay = _deployment(tmp_path, tiny_bert, three_regions)
    create_credentials(lay, now=datetime.now(UTC))
    spare = _free_ports(2)
    intruder = replace(lay.nodes[0], port=spare[0], keys=create_node_keys(tmp_path / "intruder"))
    untrusting = replace(lay.nodes[1], port=spare[1])
    other_ca = create_ca(tmp_path / "other-ca", now=datetime.now(UTC))

    with Cluster(lay, bin_dir=BIN) as cluster:
        cluster.start_all()
        # a key the SuperLink never registered is refused by Flower itself
        cluster.start_node(intruder, name="intruder")
        with pytest.raises(LaunchError, match=r"code: 2004\] Failed to activate SuperNode"):
            cluster.wait_node("intruder")
        # a node that does not trust the SuperLink's CA cannot even connect
        cluster.start_node(untrusting, ca_cert=other_ca.cert, name="untrusting")
        with pytest.raises(LaunchError, match="CERTIFICATE_VERIFY_FAILED"):
            cluster.wait_node("untrusting")

        outcome = cluster.run(timeout=900)
        assert outcome.returncode == 0, cluster.read_log("flwr-run")[-3000:]
        pids = [p.pid for p in cluster.procs.values()]
    for pid in pids:  # every process stopped by PID, its children with it
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()

    assert main(["simulate", str(lay.deploy.run), "--out", str(tmp_path / "sim")]) == 0
    deployed = json.loads((lay.out / "federation.json").read_text())
    simulated = json.loads((tmp_path / "sim" / "federation.json").read_text())
    assert [r["participants"] for r in deployed["rounds"]] == [["east", "north", "south"]] * 2
    for region, scores in simulated["test"].items():
        for metric in ("accuracy", "macro_f1", "loss"):
            assert round(deployed["test"][region][metric], 3) == round(scores[metric], 3)
    assert _max_diff(lay.out / "adapter", tmp_path / "sim" / "adapter") <= 1e-5
    assert "fedlocale deploy init" in render(lay, deploy_file)


def _max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_plan_names_every_node_and_only_its_own_files(tmp_path: Path, three_regions: Path, tiny_bert: Path) -> None:
    deploy_file, lay = _deployment(tmp_path, tiny_bert, three_regions)
    text = render(lay, deploy_file)
    for node in lay.nodes:
        line = next(ln for ln in text.splitlines() if f'region="{node.region}"' in ln)
        assert str(node.keys.private) in line and str(node.data) in line and "--root-certificates" in line
        assert "ca.key" not in line and "server.key" not in line
    assert "--enable-supernode-auth" in text and "--ssl-keyfile" in text


def test_bad_deployment_file_reports_every_problem_with_its_line(tmp_path: Path, three_regions: Path) -> None:
    model = make_tiny_model(tmp_path / "m")
    tiny_config(tmp_path / "run.yaml", model, three_regions)
    (tmp_path / "deploy.yaml").write_text(
        "run: run.yaml\nworkdir: w\nsuperlink:\n  port: 70000\n"
        "nodes:\n  - {region: west}\n  - {region: east, threads: 0}\n"
    )
    from common.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_deploy(tmp_path / "deploy.yaml")
    text = str(err.value)
    assert "deploy.yaml:4: superlink.port: must be in [1, 65535], got 70000" in text
    assert "deploy.yaml:7: nodes[1].threads: must be >= 1, got 0" in text
    (tmp_path / "deploy.yaml").write_text("run: run.yaml\nworkdir: w\nnodes:\n  - {region: west}\n")
    with pytest.raises(ConfigError, match=r"nodes\[0\].region: 'west' is not a region of"):
        load_deploy(tmp_path / "deploy.yaml")


def test_init_refuses_to_overwrite_keys(tmp_path: Path, three_regions: Path, tiny_bert: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    deploy_file, lay = _deployment(tmp_path, tiny_bert, three_regions)
    assert main(["deploy", "init", str(deploy_file)]) == 0
    key = lay.nodes[0].keys.private
    assert key.stat().st_mode & 0o777 == 0o600
    before = key.read_bytes()
    assert main(["deploy", "init", str(deploy_file)]) == 2
    assert "--force" in capsys.readouterr().err
    assert key.read_bytes() == before
    assert main(["deploy", "init", str(deploy_file), "--force"]) == 0
    assert key.read_bytes() != before


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "deploy").glob("*.yaml")))
def test_shipped_deployment_files_are_valid(path: Path) -> None:
    deploy = read_deploy(path)
    assert deploy.run.name == "demo.yaml" and deploy.run.exists()
    assert {n.region for n in deploy.nodes} == {"en-movies", "en-critics", "cn-hotel", "cn-electronics", "cn-books"}
