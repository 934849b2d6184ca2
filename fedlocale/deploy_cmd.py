"""``fedlocale deploy …`` and ``fedlocale node``: certificates, the exact commands, and a one-machine launcher."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    """Add the ``deploy`` and ``node`` subcommands to the CLI's subparsers."""
    deploy = sub.add_parser("deploy", help="run across countries: certificates, commands, a local launcher")
    actions = deploy.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    init = actions.add_parser(
        "init",
        help="create the CA, the SuperLink certificate and every node's key pair",
        description="Create pki/ca.crt+ca.key, pki/server.pem+server.key (SANs: superlink.address and "
        "superlink.hosts) and, per region, node.key+node.key.pub (ECDSA P-256, OpenSSH) and its audit folder "
        "(0700; the node makes its ledger key there itself). Private keys are written 0600; nothing is overwritten "
        "without --force. Prints the SuperLink certificate's fingerprint (sha256:…) for the policies' "
        "server_fingerprint.",
    )
    init.add_argument("deploy_file", type=Path, help="deployment YAML (see configs/deploy/)")
    init.add_argument("--force", action="store_true", help="replace existing certificates and keys")
    only = init.add_mutually_exclusive_group()
    only.add_argument("--pki-only", action="store_true", help="only the CA and SuperLink certificate (server host)")
    only.add_argument(
        "--node", action="append", metavar="REGION", help="only this region's key pair (its own host); repeatable"
    )
    plan = actions.add_parser(
        "plan",
        help="print the exact SuperLink / register / SuperNode / flwr run commands",
        description="Print every command of the deployment, grouped by the host it runs on.",
    )
    plan.add_argument("deploy_file", type=Path)
    up = actions.add_parser(
        "up",
        help="run the whole deployment on this machine (real SuperLink and SuperNodes) and stop it",
        description="Create missing credentials, start the SuperLink (TLS, node auth), register and start one "
        "SuperNode per region, `flwr run` to completion, print the results, stop every process by PID.",
    )
    up.add_argument("deploy_file", type=Path)
    up.add_argument("--out", type=Path, default=None, metavar="DIR", help="run folder (default: WORKDIR/out)")
    again = up.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (its own files only, once every check has passed)",
    )
    up.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped")
    link = actions.add_parser("superlink", help="run this deployment's SuperLink in the foreground (server host)")
    link.add_argument("deploy_file", type=Path)

    node = sub.add_parser(
        "node",
        help="run one region's SuperNode in the foreground (country host)",
        description="exec flower-supernode for REGION with TLS, its own key, data folder, policy and audit folder; "
        "first, if the region's policy pins server_fingerprint, check the certificate the SuperLink presents and "
        "exit 2 without starting when it is another one.",
    )
    node.add_argument("deploy_file", type=Path)
    node.add_argument("--region", required=True)


def _load(path: Path) -> Any:
    from deploy.config import load_deploy
    from deploy.plan import layout

    return layout(*load_deploy(path))


def cmd_deploy(args: argparse.Namespace) -> int:
    """``fedlocale deploy ACTION``."""
    lay = _load(args.deploy_file)
    action = args.deploy_command
    if action == "init":
        return _init(lay, args.force, pki=not args.node, regions=[] if args.pki_only else args.node)
    if action == "plan":
        from deploy.plan import render

        print(render(lay, args.deploy_file, _server_fingerprint(lay)), end="")
        return 0
    if action == "superlink":
        from deploy.plan import superlink_argv

        return _exec(lay, superlink_argv(lay))
    return _up(lay, args)


def cmd_node(args: argparse.Namespace) -> int:
    """``fedlocale node``: check the SuperLink against the region's policy, then exec the region's SuperNode."""
    from deploy.launch import check_server_identity
    from deploy.plan import supernode_argv

    lay = _load(args.deploy_file)
    nodes = {n.region: n for n in lay.nodes}
    if args.region not in nodes:
        known = ", ".join(nodes)
        print(f"fedlocale: {args.deploy_file}: no node for region {args.region!r} ({known})", file=sys.stderr)
        return 2
    node = nodes[args.region]
    _preflight(lay, [node])
    seen = check_server_identity(lay, node)  # ServerIdentityError: the CLI prints it, exit 2
    if seen is not None:
        print(f"SuperLink certificate {seen} is the one the policy of {node.region} pins", file=sys.stderr)
    return _exec(lay, supernode_argv(lay, node))


def _server_fingerprint(lay: Any) -> str | None:
    """The SuperLink certificate as policies pin it (``sha256:…``), if it exists on this machine."""
    from deploy.pki import pinned_fingerprint

    return pinned_fingerprint(lay.server.cert) if lay.server.cert.is_file() else None


def _init(lay: Any, force: bool, pki: bool = True, regions: list[str] | None = None) -> int:
    from deploy.plan import create_audit_dirs, create_credentials

    unknown = sorted(set(regions or ()) - {n.region for n in lay.nodes})
    if unknown:
        print(f"fedlocale: no node for region(s) {', '.join(unknown)} in this deployment", file=sys.stderr)
        return 2
    written = create_credentials(lay, now=datetime.now(UTC), force=force, pki=pki, regions=regions)
    for path in written:
        print(f"wrote {path}")
    for folder in create_audit_dirs(lay, regions):
        print(f"made {folder}/ (0700; the node makes its ledger key there on first use)")
    fingerprint = _server_fingerprint(lay)
    if pki and fingerprint:
        print(f"SuperLink certificate: {fingerprint}")
        print("  pin it in each region's policy (on the node's host): server_fingerprint: " + f'"{fingerprint}"')
    return 0


def _exec(lay: Any, argv: list[str]) -> int:
    from deploy.plan import environment

    env = {**os.environ, **environment(lay)}
    found = shutil.which(argv[0], path=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    if found is None:
        print(f"fedlocale: {argv[0]} not found (is Flower installed in this environment?)", file=sys.stderr)
        return 1
    os.execve(found, [found, *argv[1:]], env)
    return 1  # not reached


def _up(lay: Any, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from common.runfiles import check_run_dir, clear_run_dir
    from deploy.launch import Cluster

    out = (args.out or lay.out).resolve()
    # checks first (the run folder, the run config), then the first write
    check_run_dir(out, overwrite=args.overwrite, resume=args.resume)
    run_cfg_rounds = _rounds(lay)
    _same_ports(lay, args.deploy_file)
    _preflight(lay, lay.nodes)
    if not lay.ca.cert.exists() and _init(lay, force=False):
        return 2
    if args.overwrite:
        clear_run_dir(out)
    bar = tqdm(total=run_cfg_rounds, desc="rounds", unit="round", file=sys.stderr, disable=None)

    def watch() -> None:
        done = _rounds_done(out)
        if done > bar.n:
            bar.update(done - bar.n)

    with Cluster(lay, bin_dir=Path(sys.executable).parent) as cluster:
        bar.write(f"logs in {lay.logs}")
        cluster.start_superlink()
        names = {}
        try:
            for node in lay.nodes:
                cluster.register(node)
                names[node.region] = cluster.start_node(node)
            for region, name in names.items():
                cluster.wait_node(name)
                bar.write(f"node {region} connected")
            outcome = cluster.run(out, resume=args.resume, timeout=args.timeout, watch=watch)
        finally:
            bar.close()
    return _finish(out, lay.deploy.run, outcome, {node.region: node.audit_dir for node in lay.nodes})


def _finish(out: Path, run_config: Path, outcome: Any, node_dirs: dict[str, Path]) -> int:
    from common.runfiles import FEDERATION_FILE, SERVER_ERROR_FILE
    from deploy.launch import LaunchError
    from server.federation import FederationError
    from simulations.runner import audit_run

    if (out / SERVER_ERROR_FILE).exists():
        last = (out / SERVER_ERROR_FILE).read_text().strip().splitlines()[-1]
        raise FederationError(f"the ServerApp failed: {last} (full trace: {out / SERVER_ERROR_FILE})")
    if outcome.returncode != 0 or not (out / FEDERATION_FILE).exists():
        raise LaunchError(f"flwr run exited with code {outcome.returncode}; see {outcome.log}")
    result = json.loads((out / FEDERATION_FILE).read_text())
    said: list[str] = []
    # every ledger of this machine: the server's in out/audit/server, each node's in its own audit-dir
    audit = audit_run(out, list(node_dirs), said.append, node_dirs=node_dirs)
    _write_summary(out, run_config, result, outcome.seconds, audit)
    print(f"\n{'region':<20}{'macro-F1':>10}{'accuracy':>10}   (test, best round {result['best_round']})")
    for region, scores in result["test"].items():
        print(f"{region:<20}{scores['macro_f1']:>10.3f}{scores['accuracy']:>10.3f}")
    print(f"\nrun {outcome.run_id} finished in {outcome.seconds:.0f} s; wrote {out}/summary.json, report.md, adapter/")
    for line in said:
        print(line)
    for finding in audit["findings"]:
        print(f"  {finding}", file=sys.stderr)
    if audit["missing_ledgers"]:
        print(f"  no ledger from: {', '.join(audit['missing_ledgers'])}", file=sys.stderr)
    return 0


def _write_summary(
    out: Path, run_config: Path, federation: dict[str, Any], seconds: float, audit: dict[str, Any] | None = None
) -> None:
    """summary.json and report.md of a deployment, from what the server saw (it never sees region data)."""
    from common.config import load_config
    from common.runfiles import write_summary
    from runfolder.report import write_report
    from runfolder.summary import build_summary, read_metrics

    summary = build_summary(load_config(run_config), None, federation, {}, seconds, str(run_config), audit)
    write_summary(out, summary)
    write_report(out, summary, read_metrics(out))


def _same_ports(lay: Any, deploy_file: Path) -> None:
    """``deploy up`` starts every process on this machine: two of them given one port would fail only once
    launched (on separate hosts, as ``deploy plan`` prints them, nodes may share a port)."""
    from common.errors import InputError

    users: dict[int, list[str]] = {lay.deploy.superlink.port: ["the SuperLink (superlink.port)"]}
    for node in lay.nodes:
        users.setdefault(node.port, []).append(f"node {node.region}")
    clashes = [f"port {port}: {', '.join(names)}" for port, names in sorted(users.items()) if len(names) > 1]
    if clashes:
        raise InputError(
            f"{deploy_file}: deploy up runs every process on this machine, so each needs its own port; "
            f"{'; '.join(clashes)} (set nodes[].port)"
        )


def _preflight(lay: Any, nodes: Sequence[Any]) -> None:
    """Before any node starts: ``fedlocale check``'s checks for these nodes' own data and policies, with the
    deployment's run config (model, LoRA, labels). A node's host may lack the run config (the server sends its
    settings): then only the policy is checked, when the node loads it."""
    from client.preflight import preflight
    from common.config import PersonalizeSettings, Region, load_config, load_yaml
    from common.policy import load_policy

    if not lay.deploy.run.is_file():
        print(
            f"{lay.deploy.run} is not on this host: model and LoRA settings not checked before start", file=sys.stderr
        )
        return
    cfg = load_config(lay.deploy.run)
    regions = [Region(n.region, n.data, n.policy) for n in nodes]
    policies = {n.region: load_policy(n.policy) for n in nodes if n.policy is not None}
    # each node's own personalization: under personalize.dp its steps are part of the node's DP plan
    own = {n.region: load_yaml(n.personalize, PersonalizeSettings) for n in nodes if n.personalize is not None}
    for warning in preflight(cfg, policies, lay.deploy.run, regions=regions, personalize=own).warnings:
        print(f"warning: {warning}", file=sys.stderr)


def _rounds(lay: Any) -> int:
    from common.config import load_config

    return int(load_config(lay.deploy.run).rounds)


def _rounds_done(out: Path) -> int:
    from common.runfiles import METRICS_FILE

    path = out / METRICS_FILE
    if not path.exists():
        return 0
    from common.data import json_lines

    rounds = set()
    # a line that is not a row (the one being written right now) counts no round; the report checks the file
    for _, row in json_lines(path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()):
        if isinstance(row, dict) and row.get("split") == "val":
            rounds.add(str(row.get("round")))
    return len(rounds)
