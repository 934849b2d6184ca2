"""The exact commands of a deployment, as argv lists: SuperLink, node registration, SuperNodes, ``flwr run``.

Everything here is a pure function of the deployment config, so ``fedlocale deploy plan`` prints what
``fedlocale deploy up`` runs, and an operator on another host can copy the lines for that host.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from common import keys
from common.config import RunConfig
from common.runfiles import AUDIT_DIR, NODES_DIR
from deploy.config import DEFAULT_NODE_PORT, DeployConfig, NodeEntry
from deploy.env import FLOWER_ENV
from deploy.pki import FOLDER_MODE, CaFiles, NodeKeys, ServerFiles, create_all

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app (pyproject.toml with [tool.flwr.app])
# a node's default personal-dir, WORKDIR/nodes/REGION/personalized (a simulation uses RUN_DIR/personal instead)
NODE_PERSONAL_DIR = "personalized"


@dataclass(frozen=True)
class Node:
    """One country node with every path and port resolved."""

    region: str
    data: Path
    port: int
    keys: NodeKeys
    threads: int | None
    cache_dir: Path | None
    policy: Path | None  # the region's residency policy on the node's host; None: no policy
    audit_dir: Path  # the node's signed egress ledger and its Ed25519 key (made by the node on first use)
    augment: Path | None = None  # YAML of the node's own train-split augmentation; None: none
    personalize: Path | None = None  # YAML of the node's own personalization settings; None: none
    personal_dir: Path | None = None  # where the node keeps its personalized model (set with personalize)
    keep_globals: Path | None = None  # where the node keeps received global adapters for its own audit; None: not
    keep_globals_count: int | None = None  # how many rounds of them; None: the node's default


@dataclass(frozen=True)
class Layout:
    """A deployment resolved to files, ports and nodes."""

    deploy: DeployConfig
    ca: CaFiles
    server: ServerFiles
    flwr_home: Path
    logs: Path
    out: Path
    nodes: tuple[Node, ...]

    @property
    def connection(self) -> str:
        """The SuperLink connection name used by ``flwr`` commands."""
        return self.deploy.connection


def layout(deploy: DeployConfig, run: RunConfig) -> Layout:
    """Resolve the deployment: default nodes (one per region), ports, key folders, output folders."""
    work = deploy.workdir.resolve()
    settings = deploy.nodes or ()
    by_region = {n.region: n for n in settings}
    data = {r.name: r.data for r in run.regions}
    policies = {r.name: r.policy for r in run.regions}
    order = [n.region for n in settings] if settings else list(run.region_names)
    nodes = []
    for i, region in enumerate(order):
        s = by_region.get(region)
        policy = s.policy if s and s.policy else policies[region]
        nodes.append(
            Node(
                region=region,
                data=(s.data if s and s.data else data[region]).resolve(),
                port=s.port if s and s.port else DEFAULT_NODE_PORT + i,
                keys=NodeKeys.in_folder((s.keys if s and s.keys else work / NODES_DIR / region).resolve()),
                threads=s.threads if s else None,
                cache_dir=s.cache_dir.resolve() if s and s.cache_dir else None,
                policy=policy.resolve() if policy else None,
                audit_dir=(s.audit_dir if s and s.audit_dir else work / NODES_DIR / region / AUDIT_DIR).resolve(),
                augment=s.augment.resolve() if s and s.augment else None,
                personalize=s.personalize.resolve() if s and s.personalize else None,
                personal_dir=_personal_dir(s, work / NODES_DIR / region / NODE_PERSONAL_DIR),
                keep_globals=s.keep_globals.resolve() if s and s.keep_globals else None,
                keep_globals_count=s.keep_globals_count if s else None,
            )
        )
    return Layout(
        deploy=deploy,
        ca=CaFiles.in_folder(work / "pki"),
        server=ServerFiles.in_folder(work / "pki"),
        flwr_home=work / "flwr-home",
        logs=work / "logs",
        out=work / "out",
        nodes=tuple(nodes),
    )


def create_credentials(
    lay: Layout, *, now: datetime, force: bool = False, pki: bool = True, regions: Sequence[str] | None = None
) -> list[Path]:
    """Create the CA and SuperLink certificate (``pki``) and the key pairs of ``regions`` (default: every node).

    Returns the files written. All or nothing (``deploy.pki.create_all``): hosts, existing files and folders
    (the nodes' audit folders too) are checked before anything is written; refuses (``deploy.pki.PkiError``)
    to overwrite anything unless ``force``.
    """
    chosen = lay.nodes if regions is None else [n for n in lay.nodes if n.region in regions]
    return create_all(
        now=now,
        pki=(lay.ca.cert.parent, lay.deploy.superlink.names) if pki else None,
        node_folders=[node.keys.private.parent for node in chosen],
        also_made=[node.audit_dir for node in chosen],
        force=force,
    )


def create_audit_dirs(lay: Layout, regions: Sequence[str] | None = None) -> list[Path]:
    """Make the audit folders (0700) of ``regions`` (default: every node) that do not exist yet; return them.

    Only the folder: the node makes its ledger key there on first use, so the key never exists anywhere else.
    """
    made = []
    for node in lay.nodes if regions is None else [n for n in lay.nodes if n.region in regions]:
        if not node.audit_dir.is_dir():
            node.audit_dir.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
            made.append(node.audit_dir)
    return made


def environment(lay: Layout) -> dict[str, str]:
    """Variables every Flower process of this deployment needs (no CUDA installs, no telemetry, own FLWR_HOME)."""
    return {**FLOWER_ENV, "FLWR_HOME": str(lay.flwr_home)}


def connection_toml(lay: Layout) -> str:
    """The ``FLWR_HOME/config.toml`` entry that lets ``flwr`` reach the SuperLink over TLS."""
    return (
        f'[superlink]\ndefault = "{lay.connection}"\n\n'
        f"[superlink.{lay.connection}]\n"
        f'address = "{lay.deploy.superlink.endpoint}"\n'
        f'root-certificates = "{lay.ca.cert.resolve()}"\n'
    )


def superlink_argv(lay: Layout) -> list[str]:
    """``flower-superlink`` with TLS and node authentication."""
    link = lay.deploy.superlink
    return [
        "flower-superlink",
        "--ssl-ca-certfile", str(lay.ca.cert.resolve()),
        "--ssl-certfile", str(lay.server.cert.resolve()),
        "--ssl-keyfile", str(lay.server.key.resolve()),
        "--enable-supernode-auth",
        "--host", link.bind,
        "--port", str(link.port),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip


def register_argv(lay: Layout, node: Node) -> list[str]:
    """``flwr supernode register``: only nodes whose public key the SuperLink knows may join."""
    return ["flwr", "supernode", "register", str(node.keys.public), lay.connection, "--name", node.region]


def _personal_dir(settings: NodeEntry | None, default: Path) -> Path | None:
    if settings is None or settings.personalize is None:
        return None
    return (settings.personal_dir or default).resolve()


def node_config(node: Node) -> str:
    """The ``--node-config`` string: which region this node serves, where its data, policy and ledger live."""
    # double quotes inside, so the shell-quoted command stays readable: --node-config 'region="x" …'
    parts = [f'{keys.NODE_REGION}="{node.region}"', f'{keys.NODE_DATA_DIR}="{node.data}"']
    if node.threads is not None:
        parts.append(f"{keys.NODE_THREADS}={node.threads}")
    if node.cache_dir is not None:
        parts.append(f'{keys.NODE_CACHE_DIR}="{node.cache_dir}"')
    if node.policy is not None:
        parts.append(f'{keys.NODE_POLICY}="{node.policy}"')
    parts.append(f'{keys.NODE_AUDIT_DIR}="{node.audit_dir}"')
    if node.augment is not None:
        parts.append(f'{keys.NODE_AUGMENT}="{node.augment}"')
    if node.personalize is not None and node.personal_dir is not None:
        parts.append(f'{keys.NODE_PERSONALIZE}="{node.personalize}" {keys.NODE_PERSONAL_DIR}="{node.personal_dir}"')
    if node.keep_globals is not None:
        parts.append(f'{keys.NODE_KEEP_GLOBALS}="{node.keep_globals}"')
    if node.keep_globals is not None and node.keep_globals_count is not None:
        parts.append(f"{keys.NODE_KEEP_GLOBALS_COUNT}={node.keep_globals_count}")
    return " ".join(parts)


def supernode_argv(lay: Layout, node: Node, ca_cert: Path | None = None) -> list[str]:
    """``flower-supernode`` for one region: TLS (trusting ``ca_cert``, default the deployment's CA) and its key."""
    return [
        "flower-supernode",
        "--superlink", lay.deploy.superlink.endpoint,
        "--root-certificates", str((ca_cert or lay.ca.cert).resolve()),
        "--auth-supernode-private-key", str(node.keys.private),
        "--port", str(node.port),
        "--node-config", node_config(node),
    ]  # fmt: skip


def run_argv(lay: Layout, out: Path | None = None, resume: bool = False) -> list[str]:
    """``flwr run`` of this project's app on the deployment, with the run config and output folder."""
    settings = f'{keys.RUN_CONFIG_PATH}="{lay.deploy.run.resolve()}" {keys.RUN_OUT_DIR}="{(out or lay.out).resolve()}"'
    if resume:
        settings += f" {keys.RUN_RESUME}=true"
    return ["flwr", "run", str(APP_DIR), lay.connection, "--stream", "-c", settings]


def render(lay: Layout, deploy_file: Path, fingerprint: str | None = None) -> str:
    """The whole deployment as shell commands, grouped by the host each runs on.

    ``fingerprint`` is the SuperLink certificate's (``sha256:…``, once it exists), for the regions' policies.
    """
    pin = (
        f"#    SuperLink certificate, for server_fingerprint in each region's policy: {fingerprint}"
        if fingerprint
        else "#    then pin the SuperLink in each region's policy: server_fingerprint (plan prints it once it exists)"
    )
    env = environment(lay)
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    join = shlex.join
    lines = [
        "# 0. once: credentials. All on one machine:",
        f"fedlocale deploy init {shlex.quote(str(deploy_file))}",
        "#    or across hosts: --pki-only on the operator's machine (keeps pki/ca.key), --node REGION on each",
        "#    country host (its private key never leaves it); copy pki/ca.crt to every host, node.key.pub back",
        pin,
        "",
        "# every command below runs with:",
        f"export {exports}",
        "",
        f"# 1. server host: the SuperLink (TLS + node authentication) on {lay.deploy.superlink.bind}:"
        f"{lay.deploy.superlink.port}",
        join(superlink_argv(lay)),
        "",
        f"# 2. operator machine: connection entry in {lay.flwr_home}/config.toml, then register every node",
        *(f"#    {line}" if line else "#" for line in connection_toml(lay).splitlines()),
        *(join(register_argv(lay, node)) for node in lay.nodes),
        "",
        "# 3. each country host: its SuperNode (needs only ca.crt, its own key pair, its data and its policy).",
        f"#    `fedlocale node {shlex.quote(str(deploy_file))} --region REGION` runs the same line after checking the",
        "#    SuperLink's certificate against the policy's server_fingerprint; the ledger goes to audit-dir",
    ]
    for node in lay.nodes:
        lines += [f"#    {node.region}", join(supernode_argv(lay, node))]
    lines += ["", "# 4. operator machine: start the run (add resume=true to -c to continue a stopped one)"]
    lines.append(join(run_argv(lay)))
    return "\n".join(lines) + "\n"
