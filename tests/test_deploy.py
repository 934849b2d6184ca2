"""Deployment with real Flower processes on 127.0.0.1: TLS, node authentication, parity with the simulation."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
import yaml

from client.dp_secret import simulated_secret
from common.audit import EGRESS, SENT, read_entries
from common.config import load_config
from common.runfiles import DP_ACCOUNT_FILE, DP_SECRET_FILE, LEDGER_FILE, PERSONALIZED_REPORT, PUBLIC_KEY_FILE
from deploy.config import load_deploy, read_deploy
from deploy.launch import Cluster, LaunchError, ServerIdentityError, check_server_identity
from deploy.pki import create_ca, create_node_keys, create_server_cert, pinned_fingerprint
from deploy.plan import Layout, create_credentials, environment, layout, node_config, render
from fedlocale import deploy_cmd
from fedlocale.cli import main
from tests.conftest import make_tiny_model, tiny_config, write_region
from tests.test_pki import tls_server

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


def _deployment(
    tmp_path: Path,
    model: Path,
    regions: Path,
    link: int | None = None,
    node_extra: Mapping[str, Mapping[str, object]] | None = None,
    **run_extra: object,
) -> tuple[Path, Layout]:
    """deploy.yaml (SuperLink on ``link``, default a free port) with ``node_extra`` added to the nodes' entries."""
    run = tiny_config(tmp_path / "run.yaml", model, regions, train=TRAIN, baselines=[], **run_extra)
    free, *nodes = _free_ports(4)
    spec = {
        "run": "run.yaml",
        "workdir": "work",
        "superlink": {"address": "127.0.0.1", "port": link or free, "hosts": ["localhost"]},
        "nodes": [
            {"region": r, "port": p, "threads": 1, **(node_extra or {}).get(r, {})}
            for r, p in zip(["east", "north", "south"], nodes, strict=True)
        ],
    }
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run.exists()
    return path, layout(*load_deploy(path))


def _policy(path: Path, region: str, fingerprint: str | None = None, **extra: object) -> Path:
    """A residency policy that lets the tiny model's adapter and metrics leave; pins ``fingerprint`` if given;
    ``extra`` adds settings (``require_dp``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {"region": region, "min_train_examples": 1, "server_fingerprint": fingerprint, **extra}
    path.write_text(yaml.safe_dump(settings))
    return path


DP = {"epsilon": 8.0, "delta": 1e-5}  # north's policy in the TLS deployment: record-level DP-SGD


@pytest.mark.slow
@pytest.mark.deployment
def test_deployment_with_tls_and_node_auth_matches_the_simulation(tmp_path: Path, tiny_bert: Path) -> None:
    """Real SuperLink and SuperNodes with TLS and node authentication end where the simulation ends, to the
    adapter's bits, with every node's own settings: north's policy requires DP-SGD, south has no val split, east
    personalizes and, with north, keeps the global adapters it receives for its own privacy audit.

    (The DP node and the region without val had a deployment each before; they are regions of this one now, with
    every assertion of those tests: _check_dp, _check_without_val, and no traceback in any process's log.)
    """
    # the three regions of `three_regions`, but south has train and test only: its node carves the validation
    # split the simulation carves
    data = tmp_path / "regions"
    for i, name in enumerate(["east", "north", "south"]):
        write_region(data / name, 48, 24, seed=10 + i, pos_fraction=0.3 + 0.2 * i)
    (data / "south" / "val.jsonl").unlink()
    # every node has a residency policy (from the run config) that pins the SuperLink's certificate;
    # north's also requires (epsilon 8, delta 1e-5): its node trains with DP-SGD
    regions = ["east", "north", "south"]
    policies = tmp_path / "policies"
    for region in regions:
        _policy(policies / f"{region}.yaml", region, **({"require_dp": DP} if region == "north" else {}))
    # east's operator also personalizes the final model on the node (its own settings file)
    (tmp_path / "personalize.yaml").write_text("mode: probe\n")
    deploy_file, lay = _deployment(
        tmp_path,
        tiny_bert,
        data,
        # and keeps the global adapters it receives for its own privacy audit, one round of them (of the two);
        # north keeps them too, in the same folder (its own subfolder), as many as the default allows
        node_extra={
            "east": {"personalize": "personalize.yaml", "keep_globals": "kept", "keep_globals_count": 1},
            "north": {"keep_globals": "kept"},
        },
        policies=str(policies),
        audit={"keep_updates": True},
    )
    create_credentials(lay, now=datetime.now(UTC))
    pin = pinned_fingerprint(lay.server.cert)
    for region in regions:
        _policy(policies / f"{region}.yaml", region, pin, **({"require_dp": DP} if region == "north" else {}))
    # north's DP secret (the one source of its sampling and noise) is the simulated north's, so the deployed node
    # draws the very noise the simulation draws and the parity below covers DP-SGD too; a real node makes its own
    # on first use (test_dp_secret)
    north_node = next(n for n in lay.nodes if n.region == "north")
    north_node.audit_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # as `deploy init` makes it
    north_secret = north_node.audit_dir / DP_SECRET_FILE
    north_secret.write_bytes(simulated_secret(load_config(lay.deploy.run).seed, "north"))
    north_secret.chmod(0o600)
    spare = _free_ports(3)
    intruder = replace(lay.nodes[0], port=spare[0], keys=create_node_keys(tmp_path / "intruder"))
    untrusting = replace(lay.nodes[1], port=spare[1], policy=None)
    other_ca = create_ca(tmp_path / "other-ca", now=datetime.now(UTC))
    wrong_pin = "sha256:" + "0" * 64
    misled = replace(lay.nodes[2], port=spare[2], policy=_policy(tmp_path / "misled.yaml", "south", wrong_pin))

    with Cluster(lay, bin_dir=BIN) as cluster:
        cluster.start_all()  # each start checked the SuperLink against the pin first
        assert check_server_identity(lay, lay.nodes[0]) == pin
        # a policy pinning another certificate: refused before any SuperNode process exists
        with pytest.raises(
            ServerIdentityError, match=f"presents certificate {pin}, the policy allows only {wrong_pin}"
        ):
            cluster.start_node(misled, name="misled")
        assert "misled" not in cluster.procs and not cluster.log_path("misled").exists()
        # a key the SuperLink never registered is refused by Flower itself
        cluster.start_node(intruder, name="intruder")
        with pytest.raises(LaunchError, match=r"code: 2004\] Failed to activate SuperNode"):
            cluster.wait_node("intruder")
        # a node that does not trust the SuperLink's CA cannot even connect (with a policy: not even start)
        with pytest.raises(ServerIdentityError, match="not trusted"):
            cluster.start_node(replace(untrusting, policy=lay.nodes[1].policy), ca_cert=other_ca.cert)
        cluster.start_node(untrusting, ca_cert=other_ca.cert, name="untrusting")
        with pytest.raises(LaunchError, match="CERTIFICATE_VERIFY_FAILED"):
            cluster.wait_node("untrusting")

        outcome = cluster.run(timeout=900)
        assert outcome.returncode == 0, cluster.read_log("flwr-run")[-3000:]
        pids = [p.pid for p in cluster.procs.values()]
        # the deployment's own processes logged no traceback (the intruder and the untrusting node failed on
        # purpose above, with Flower's words checked)
        logs = {name: cluster.read_log(name) for name in ["superlink", *(f"node-{r}" for r in regions), "flwr-run"]}
    for name, text in logs.items():
        assert "Traceback" not in text, f"{name}: {text[-3000:]}"
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
    _check_audit(lay, outcome)
    _check_personalized(lay)
    _check_node_audit(lay, tmp_path)
    _check_dp(lay)
    _check_without_val(lay, data / "south")


def _check_dp(lay: Layout) -> None:
    """North's policy requires (epsilon 8, delta 1e-5): its node trained with DP-SGD, kept its accountant beside
    its ledger, and every record carries the privacy spent."""
    from client.dp import Accountant
    from runfolder.summary import dp_by_region

    deployed = json.loads((lay.out / "federation.json").read_text())
    spent = [r["train"]["north"]["dp_epsilon"] for r in deployed["rounds"]]
    assert 0 < spent[0] < spent[1] <= 8.0, spent
    assert all("dp_epsilon" not in r["train"][region] for r in deployed["rounds"] for region in ("east", "south"))
    north = next(n for n in lay.nodes if n.region == "north")
    assert north.audit_dir is not None and (north.audit_dir / DP_ACCOUNT_FILE).exists()
    (account,) = Accountant.load(north.audit_dir).accounts.values()
    assert [c.round for c in account.charges] == [1, 2] and account.epsilon_spent == pytest.approx(spent[1])
    entries, damaged = read_entries(north.audit_dir / LEDGER_FILE)
    assert damaged is None
    sent = [e["body"] for e in entries if e["body"].get("status") == SENT]
    assert sent and all(e["protections"]["dp"]["delta"] == 1e-5 for e in sent)
    assert max(e["protections"]["dp"]["epsilon_spent"] for e in sent) == pytest.approx(spent[1])
    # what summary.json's regions.R.dp is built from (deploy up writes the summary; Cluster.run does not)
    dp = dp_by_region(deployed["rounds"])
    assert set(dp) == {"north"} and dp["north"]["epsilon_spent"] == pytest.approx(spent[1])


def _check_without_val(lay: Layout, folder: Path) -> None:
    """South has train and test only: what its node validated on and weighed its update by is what the same
    pipeline carves in this process."""
    from client.pipeline import node_data

    cfg = load_config(lay.deploy.run)
    south = node_data("south", folder, cfg.labels, seed=cfg.seed, settings=cfg.data).data
    assert (len(south.train), len(south.val)) == (44, 4)
    deployed = json.loads((lay.out / "federation.json").read_text())
    assert {r["train"]["south"]["num_examples"] for r in deployed["rounds"]} == {len(south.train)}, "south's train"
    assert {r["val"]["south"]["num_examples"] for r in deployed["rounds"]} == {len(south.val)}, "south's carved val"
    assert deployed["test"]["south"]["num_examples"] == 24


def _check_personalized(lay: Layout) -> None:
    """East personalized the final global model on its node and kept it there; the others did nothing."""
    east, *others = lay.nodes
    assert east.personal_dir == lay.deploy.workdir.resolve() / "nodes" / "east" / "personalized"
    report = json.loads((east.personal_dir / "east" / PERSONALIZED_REPORT).read_text())
    deployed = json.loads((lay.out / "federation.json").read_text())
    # the model personalized is the one the run tests and keeps: its best round on validation
    assert (report["mode"], report["round"], report["bytes_sent"]) == ("probe", deployed["best_round"], 0)
    # the test reply is the global model's, unchanged by the personalization that followed it
    assert report["test_macro_f1"]["global"] == pytest.approx(deployed["test"]["east"]["macro_f1"])
    assert (east.personal_dir / "east" / "personalized" / "adapter_model.safetensors").is_file()
    assert _max_diff(east.personal_dir / "east" / "global", lay.out / "adapter") <= 1e-6
    assert all(node.personal_dir is None for node in others)


def _check_node_audit(lay: Layout, tmp_path: Path) -> None:
    """East kept, bounded, the global adapters its real SuperNode received; its operator's `fedlocale audit node`
    (the CLI, in a shell elsewhere, with the SuperNode's own --node-config string) audits them against its data."""
    import subprocess

    from safetensors.torch import load_file

    from client.node_audit import KEPT_SUFFIX, REPORT_JSON, REPORT_MD, kept_globals
    from common.model import adapter_state, build_model

    east, north, south = lay.nodes
    keep = tmp_path.resolve() / "kept"
    assert (east.keep_globals, east.keep_globals_count, north.keep_globals, north.keep_globals_count) == (
        keep,
        1,
        keep,
        None,
    )
    assert south.keep_globals is None and sorted(p.name for p in keep.iterdir()) == ["east", "north"]
    deployed = json.loads((lay.out / "federation.json").read_text())
    best = deployed["best_round"]
    server = load_file(str(lay.out / "adapter" / "adapter_model.safetensors"))

    def same(kept_path: Path, other: dict[str, torch.Tensor]) -> bool:
        mine = load_file(str(kept_path))
        return mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine)

    # rounds 0 and 1 arrived with the train messages, the best round's with the test evaluation: east keeps the
    # newest one round and the delivered one, north (default 3) all of them
    for region, ordinary in (("east", {1}), ("north", {0, 1})):
        kept = kept_globals(keep, region)
        (delivered,) = [k for k in kept if k.delivered]
        assert delivered.round == best and {k.round for k in kept if not k.delivered} == ordinary - {best}, kept
        assert sorted(p.name for p in (keep / region).iterdir()) == [
            f"round-{r:03d}{KEPT_SUFFIX}" for r in sorted(ordinary | {best})
        ]
        # the delivered one is the adapter the run delivered, with the server's task
        assert same(delivered.path, server) and delivered.task.region_names == ("east", "north", "south")
    # the audit's fallback reference, the initial adapter rebuilt from the task's seed on the node, is the very
    # one the SuperLink's ServerApp built and sent (north kept it): the fallback east's audit uses below is sound
    task = kept_globals(keep, "north")[0].task
    initial = adapter_state(build_model(task.model, task.lora, task.labels, seed=task.seed).model)
    assert same(keep / "north" / f"round-000{KEPT_SUFFIX}", initial)

    out, elsewhere = tmp_path / "east-privacy", tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [str(BIN / "fedlocale"), "audit", "node", "--node-config", node_config(east), "--out", str(out)],
        cwd=elsewhere,
        env={**os.environ, **environment(lay)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and f"report: {out / REPORT_MD}" in done.stdout
    body = json.loads((out / REPORT_JSON).read_text())
    assert (body["region"], body["delivered_round"]) == ("east", best)
    assert east.personal_dir is not None
    chosen = json.loads((east.personal_dir / "east" / PERSONALIZED_REPORT).read_text())["chosen"]
    assert body["served"] == ("personalized" if chosen == "personalized" else "global"), (chosen, body)
    # references: round 1's kept adapter when round 2 was delivered, else (round 0 pruned) the initial adapter
    assert len(body["references"]) == 1
    assert body["references"][0].startswith("round-001" if best == 2 else "round 0: the initial global adapter")
    assert 0 < body["members"] == body["nonmembers"] <= 24  # per label as many of each; at most its 24 test records
    for model in ("global", "served"):
        for attack in ("loss", "reference"):
            result = body["models"][model][attack]
            low, high = result["auc_ci95"]
            assert 0.0 <= low <= high <= 1.0 and 0.0 <= result["auc"] <= 1.0, (model, result)
    # nothing of a record leaves: no member's text in what the audit wrote
    members = [json.loads(line)["text"] for line in (east.data / "train.jsonl").read_text().splitlines()]
    written = (out / REPORT_JSON).read_text() + (out / REPORT_MD).read_text()
    assert not [text for text in members if text in written]
    assert sorted(p.name for p in out.iterdir()) == [REPORT_JSON, REPORT_MD]
    # north (in this process: the CLI's start-up is paid once above) serves the global adapter and calibrates on
    # the round it kept before the delivered one
    assert main(["audit", "node", "--node-config", node_config(north), "--out", str(tmp_path / "north-privacy")]) == 0
    body = json.loads((tmp_path / "north-privacy" / REPORT_JSON).read_text())
    assert (body["region"], body["delivered_round"], body["served"]) == ("north", best, "global")
    assert body["references"] == [f"round-{r:03d} (kept global adapter)" for r in range(best)]
    assert body["models"]["served"] == body["models"]["global"]  # the same model: the same numbers
    assert all(0.0 <= r["auc"] <= 1.0 for r in body["models"]["global"].values())


def _check_audit(lay: Layout, outcome: object) -> None:
    """What `deploy up` does after the run, then an auditor's check with every party's public key."""
    assert deploy_cmd._finish(lay.out, lay.deploy.run, outcome, {n.region: n.audit_dir for n in lay.nodes}) == 0
    audit = json.loads((lay.out / "summary.json").read_text())["audit"]
    assert audit["verified"] and not audit["findings"] and not audit["missing_ledgers"], audit
    assert set(audit["ledgers"]) == {"server", "east", "north", "south"}
    assert audit["rounds_recomputed"] == 2

    server = lay.out / "audit" / "server"
    ledgers = [server / LEDGER_FILE, *(n.audit_dir / LEDGER_FILE for n in lay.nodes)]
    keys = [f"server={server / PUBLIC_KEY_FILE}", *(f"{n.region}={n.audit_dir / PUBLIC_KEY_FILE}" for n in lay.nodes)]
    assert main(["audit", "verify", *map(str, ledgers), *(a for k in keys for a in ("--key", k))]) == 0
    for node in lay.nodes:
        assert (node.audit_dir / "ledger.key").stat().st_mode & 0o777 == 0o600
        entries, problem = read_entries(node.audit_dir / LEDGER_FILE)
        assert problem is None
        sent = {(e["body"]["message"], e["body"]["round"]) for e in entries if e["body"]["kind"] == EGRESS}
        assert {e["body"]["status"] for e in entries} == {SENT}
        assert {("train", 1), ("train", 2)} <= sent and {m for m, _ in sent} == {"train", "evaluate"}, sent


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
        assert f'audit-dir="{node.audit_dir}"' in line and "policy=" not in line  # the run has no policies
        assert "ca.key" not in line and "server.key" not in line
    assert "--enable-supernode-auth" in text and "--ssl-keyfile" in text
    assert "server_fingerprint (plan prints it once it exists)" in text
    assert "policy: sha256:ab" in render(lay, deploy_file, "sha256:" + "ab" * 32)


def test_node_policy_and_audit_dir_default_from_the_run_and_resolve_from_the_deploy_file(
    tmp_path: Path, three_regions: Path, tiny_bert: Path
) -> None:
    from flwr.common.config import parse_config_args

    from client.task import node_settings

    for region in ("east", "north", "south"):
        _policy(tmp_path / "policies" / f"{region}.yaml", region)
    own = _policy(tmp_path / "own" / "north.yaml", "north", "sha256:" + "cd" * 32)
    _, lay = _deployment(
        tmp_path,
        tiny_bert,
        three_regions,
        node_extra={"north": {"policy": "own/north.yaml", "audit_dir": "ledgers/north"}},
        policies="policies",
    )
    east, north, _ = lay.nodes
    base = tmp_path.resolve()
    assert (east.policy, east.audit_dir) == (
        base / "policies" / "east.yaml",
        base / "work" / "nodes" / "east" / "audit",
    )
    assert (north.policy, north.audit_dir) == (own.resolve(), base / "ledgers" / "north")
    assert node_config(north) == (
        f'region="north" data-dir="{north.data}" threads=1 policy="{north.policy}" audit-dir="{north.audit_dir}"'
    )
    # what the ClientApp makes of it
    settings = node_settings(parse_config_args([node_config(north)]))
    assert settings.audit_dir == north.audit_dir and settings.policy is not None
    assert settings.policy.server_fingerprint == "sha256:" + "cd" * 32
    without = replace(north, policy=None)
    assert "policy=" not in node_config(without) and node_config(without).endswith(f'audit-dir="{north.audit_dir}"')
    # the node's own augmentation settings travel the same way; the server never sees them
    (tmp_path / "augment.yaml").write_text("copies: 1\nops: [delete]\n")
    augmented = replace(north, augment=tmp_path / "augment.yaml")
    assert node_config(augmented).endswith(f'augment="{tmp_path / "augment.yaml"}"')
    node = node_settings(parse_config_args([node_config(augmented)]))
    assert node.augment is not None and (node.augment.copies, node.augment.ops) == (1, ("delete",))
    # and so do its personalization settings and the folder its personalized model stays in
    (tmp_path / "personalize.yaml").write_text("mode: local\nlocal_r: 2\n")
    personal = replace(north, personalize=tmp_path / "personalize.yaml", personal_dir=tmp_path / "mine")
    assert node_config(personal).endswith(
        f'personalize="{tmp_path / "personalize.yaml"}" personal-dir="{tmp_path / "mine"}"'
    )
    node = node_settings(parse_config_args([node_config(personal)]))
    assert node.personalize is not None and (node.personalize.mode, node.personalize.local_r) == ("local", 2)
    assert node.personal_dir == tmp_path / "mine"
    # and the folder where it keeps the global adapters it receives, for its own privacy audit (bounded)
    keeping = replace(north, keep_globals=tmp_path / "kept", keep_globals_count=4)
    assert node_config(keeping).endswith(f'keep-globals="{tmp_path / "kept"}" keep-globals-count=4')
    node = node_settings(parse_config_args([node_config(keeping)]))
    assert (node.keep_globals, node.keep_globals_count) == (tmp_path / "kept", 4)
    assert node_settings(parse_config_args([node_config(north)])).keep_globals is None  # opt-in
    # a policy written for another region stops the node before it starts (its guard would refuse everything)
    wrong = replace(north, policy=tmp_path / "policies" / "east.yaml")
    with pytest.raises(ServerIdentityError, match="is for region 'east'"):
        check_server_identity(lay, wrong)


def test_a_node_refuses_a_superlink_its_policy_does_not_pin(
    tmp_path: Path, three_regions: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # the real SuperLink certificate and an impostor's: both issued by the deployment CA for the same names,
    # so TLS alone accepts either; only the pin in the node's policy tells them apart
    now = datetime.now(UTC)
    ca = create_ca(tmp_path / "work" / "pki", now=now)
    real = create_server_cert(ca, tmp_path / "work" / "pki", ["127.0.0.1", "localhost"], now=now)
    impostor = create_server_cert(ca, tmp_path / "impostor", ["127.0.0.1", "localhost"], now=now)
    pin, other = pinned_fingerprint(real.cert), pinned_fingerprint(impostor.cert)
    _policy(tmp_path / "east.yaml", "east", pin)
    execs: list[list[str]] = []
    monkeypatch.setattr(deploy_cmd, "_exec", lambda lay, argv: execs.append(argv) or 0)
    pinned = {"east": {"policy": "east.yaml"}}

    with tls_server(impostor) as port:
        deploy_file, lay = _deployment(tmp_path, tiny_bert, three_regions, link=port, node_extra=pinned)
        with Cluster(lay, bin_dir=BIN) as cluster:
            with pytest.raises(ServerIdentityError) as err:
                cluster.start_node(lay.nodes[0])
            assert not cluster.procs and not cluster.log_path("node-east").exists()
        assert f"the server presents certificate {other}, the policy allows only {pin}" in str(err.value)
        assert main(["node", str(deploy_file), "--region", "east"]) == 2
        assert f"presents certificate {other}, the policy allows only {pin}" in capsys.readouterr().err
        assert execs == []
        # a node whose policy pins nothing is not checked (TLS with the CA is then all it has)
        assert main(["node", str(deploy_file), "--region", "north"]) == 0 and execs[0][0] == "flower-supernode"

    with tls_server(real) as port:
        deploy_file, lay = _deployment(tmp_path, tiny_bert, three_regions, link=port, node_extra=pinned)
        assert check_server_identity(lay, lay.nodes[0]) == pin
        assert main(["node", str(deploy_file), "--region", "east"]) == 0
        assert f"SuperLink certificate {pin} is the one the policy of east pins" in capsys.readouterr().err
        assert execs[-1][0] == "flower-supernode" and f'policy="{lay.nodes[0].policy}"' in execs[-1][-1]


def test_bad_deployment_file_reports_every_problem_with_its_line(tmp_path: Path, three_regions: Path) -> None:
    model = make_tiny_model(tmp_path / "m")
    tiny_config(tmp_path / "run.yaml", model, three_regions)
    (tmp_path / "deploy.yaml").write_text(
        "run: run.yaml\nworkdir: w\nsuperlink:\n  port: 70000\n"
        "nodes:\n  - {region: west}\n  - {region: east, threads: 0}\n"
    )
    from common.errors import ConfigError

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
    said = capsys.readouterr().out
    assert f"SuperLink certificate: {pinned_fingerprint(lay.server.cert)}" in said
    for node in lay.nodes:  # the audit folder is made, its key is not: the node makes that on first use
        assert node.audit_dir.is_dir() and node.audit_dir.stat().st_mode & 0o777 == 0o700
        assert list(node.audit_dir.iterdir()) == [] and f"made {node.audit_dir}/" in said
    assert main(["deploy", "plan", str(deploy_file)]) == 0
    assert (
        f"server_fingerprint in each region's policy: {pinned_fingerprint(lay.server.cert)}" in capsys.readouterr().out
    )
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


def test_a_personal_dir_without_personalize_settings_is_refused() -> None:
    from common.errors import ConfigError
    from deploy.config import NodeEntry

    with pytest.raises(ConfigError, match="personal_dir: is set but personalize is not"):
        NodeEntry(region="east", personal_dir=Path("/srv/personal"))


def test_keep_globals_resolves_from_the_deploy_file_and_its_count_is_checked(
    tmp_path: Path, three_regions: Path, tiny_bert: Path
) -> None:
    from common.errors import ConfigError
    from deploy.config import NodeEntry

    _, lay = _deployment(tmp_path, tiny_bert, three_regions, node_extra={"north": {"keep_globals": "kept/north"}})
    east, north, _ = lay.nodes
    assert (east.keep_globals, north.keep_globals) == (None, tmp_path.resolve() / "kept" / "north")
    assert node_config(north).endswith(f'keep-globals="{north.keep_globals}"')
    with pytest.raises(ConfigError, match="keep_globals_count: is set but keep_globals is not"):
        NodeEntry(region="east", keep_globals_count=3)
    with pytest.raises(ConfigError, match="keep_globals_count: must be >= 1"):
        NodeEntry(region="east", keep_globals=Path("/srv/kept"), keep_globals_count=0)


def test_a_node_whose_policy_would_refuse_every_reply_is_not_started(
    tmp_path: Path, three_regions: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """`fedlocale node` and `deploy up` run `fedlocale check`'s checks on the node's own data and policy first."""
    policy = tmp_path / "east.yaml"
    policy.write_text(yaml.safe_dump({"region": "east", "min_train_examples": 1000}))
    execs: list[list[str]] = []
    monkeypatch.setattr(deploy_cmd, "_exec", lambda lay, argv: execs.append(argv) or 0)
    deploy_file, lay = _deployment(tmp_path, tiny_bert, three_regions, node_extra={"east": {"policy": "east.yaml"}})
    line = policy.read_text().splitlines().index("min_train_examples: 1000") + 1
    for argv in (["node", str(deploy_file), "--region", "east"], ["deploy", "up", str(deploy_file)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert (
            f"{policy}:{line}: min_train_examples: region east: every train and evaluate reply would be refused" in err
        )
    assert execs == [] and not (tmp_path / "work" / "pki").exists() and not lay.logs.exists()


def test_deploy_up_refuses_two_processes_on_one_port_before_anything_starts(
    tmp_path: Path, three_regions: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # all on this machine: the SuperLink and a node, and two nodes, on one port would fail only once launched
    deploy_file, lay = _deployment(tmp_path, tiny_bert, three_regions, link=9092, node_extra={"north": {"port": 9092}})
    clash = {"east": {"port": 9300}, "south": {"port": 9300}}
    assert main(["deploy", "up", str(deploy_file)]) == 2
    err = capsys.readouterr().err
    assert f"{deploy_file}: deploy up runs every process on this machine" in err
    assert "port 9092: the SuperLink (superlink.port), node north" in err
    assert not (tmp_path / "work" / "pki").exists() and not lay.logs.exists()
    deploy_file, lay = _deployment(tmp_path, tiny_bert, three_regions, node_extra=clash)
    assert main(["deploy", "up", str(deploy_file)]) == 2
    assert "port 9300: node east, node south" in capsys.readouterr().err
    # deploy plan prints it: on separate hosts two nodes may share a port
    assert main(["deploy", "plan", str(deploy_file)]) == 0


def test_the_progress_count_of_rounds_skips_what_is_not_a_row(tmp_path: Path) -> None:
    """`deploy up` polls metrics.jsonl while the server writes it: a half-written line, a bad byte or a line
    that is not an object counts no round and stops nothing (a bad byte raised UnicodeDecodeError before)."""
    rows = [{"round": r, "region": "north", "split": s, "loss": 0.5} for r in (1, 2) for s in ("train", "val")]
    text = "".join(json.dumps(row) + "\n" for row in rows).encode()
    (tmp_path / "metrics.jsonl").write_bytes(text + b'[1, 2]\n{"round": 3, "note": "\xff"}\n{"round": 3, "spl')
    assert deploy_cmd._rounds_done(tmp_path) == 2
