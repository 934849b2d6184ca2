"""The deployment file (``configs/deploy/*.yaml``): where the SuperLink listens and which node serves which region.

Parsed once into frozen objects like the run config, every problem reported with its ``file:line``.
Relative paths are taken from the deployment file's folder.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import RunConfig, load_config, load_yaml, located_error, region_name_problem
from common.errors import ConfigError, check
from common.yamlfile import read_mapping
from deploy.pki import host_problem

DEFAULT_NODE_PORT = 9101  # first SuperNode ClientAppIo port on one host; each node on a host needs its own


@dataclass(frozen=True)
class SuperLinkSettings:
    """Where the SuperLink listens and the names its certificate must carry."""

    address: str = "127.0.0.1"  # the host name or IP the nodes and `flwr` dial
    port: int = 9092
    bind: str = "127.0.0.1"  # the interface it listens on (0.0.0.0 for other hosts to reach it)
    hosts: tuple[str, ...] = ()  # extra subject alternative names; `address` is always one

    def __post_init__(self) -> None:
        problems = []
        if not self.address.strip():
            problems.append(("address", "must not be empty"))
        elif (problem := host_problem(self.address)) is not None:
            problems.append(("address", problem))
        # the certificate is issued for these names: a bad one fails `deploy init` later, so say it now
        problems += [(f"hosts[{i}]", p) for i, host in enumerate(self.hosts) if (p := host_problem(host)) is not None]
        if not 1 <= self.port <= 65535:
            problems.append(("port", f"must be in [1, 65535], got {self.port}"))
        try:
            ipaddress.ip_address(self.bind)
        except ValueError:
            problems.append(("bind", f"must be an IP address, got {self.bind!r}"))
        check(problems)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the SuperLink certificate is issued for, `address` first."""
        return tuple(dict.fromkeys((self.address, *self.hosts)))

    @property
    def endpoint(self) -> str:
        """``host:port`` as the nodes and ``flwr`` dial it."""
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class NodeEntry:
    """One country node: the region it serves and where its data, keys, cache, policy and ledger live on its host."""

    region: str
    data: Path | None = None  # default: the run config's folder for this region
    port: int | None = None  # the SuperNode's local ClientAppIo port; default 9101, 9102, … in order
    keys: Path | None = None  # folder holding node.key / node.key.pub; default WORKDIR/nodes/REGION
    threads: int | None = None  # torch threads of this node's ClientApp
    cache_dir: Path | None = None  # tokenised-data cache on the node's disk; default none
    policy: Path | None = None  # the region's residency policy file; default: the run config region's `policy`
    audit_dir: Path | None = None  # the node's signed egress ledger and its key; default WORKDIR/nodes/REGION/audit
    augment: Path | None = None  # YAML of the node's train-split augmentation (client.augment); default: none
    # YAML of personalize settings (mode, epochs, ...): the node personalizes the final global model for itself
    personalize: Path | None = None
    personal_dir: Path | None = None  # where that model and its report stay; default WORKDIR/nodes/REGION/personalized
    # where the node keeps the global adapters it receives, for its own privacy audit (`fedlocale audit node`);
    # default: it keeps none
    keep_globals: Path | None = None
    # how many rounds' global adapters it keeps besides the delivered one; default 3 (client.node_audit)
    keep_globals_count: int | None = None

    def __post_init__(self) -> None:
        problems = []
        name_problem = region_name_problem(self.region)
        if name_problem:
            problems.append(("region", name_problem))
        if self.port is not None and not 1 <= self.port <= 65535:
            problems.append(("port", f"must be in [1, 65535], got {self.port}"))
        if self.threads is not None and self.threads < 1:
            problems.append(("threads", f"must be >= 1, got {self.threads}"))
        if self.keep_globals_count is not None and self.keep_globals_count < 1:
            problems.append(("keep_globals_count", f"must be >= 1, got {self.keep_globals_count}"))
        if self.keep_globals_count is not None and self.keep_globals is None:
            problems.append(("keep_globals_count", "is set but keep_globals is not (the folder to keep them in)"))
        if self.personal_dir is not None and self.personalize is None:
            problems.append(("personal_dir", "is set but personalize is not (the node would never write there)"))
        check(problems)


@dataclass(frozen=True)
class DeployConfig:
    """A whole deployment: the run it serves, the SuperLink, and one node per region."""

    run: Path  # the run config (YAML) the ServerApp reads
    workdir: Path  # pki/, flwr-home/, logs/, nodes/, out/ on this machine
    superlink: SuperLinkSettings = field(default_factory=SuperLinkSettings)
    nodes: tuple[NodeEntry, ...] = ()  # empty: one node per region of the run config
    connection: str = "fedlocale"  # the SuperLink connection's name in FLWR_HOME/config.toml

    def __post_init__(self) -> None:
        problems = [("nodes", p) for p in _shared_regions([n.region for n in self.nodes])]
        if not self.connection.replace("-", "").replace("_", "").isalnum():
            problems.append(("connection", f"must be letters, digits, - or _, got {self.connection!r}"))
        check(problems)


def _shared_regions(regions: list[str]) -> list[str]:
    """A problem for each region that more than one node entry claims."""
    return [f"region {name!r} has more than one node" for name in sorted({r for r in regions if regions.count(r) > 1})]


_PATH_FIELDS = {
    "data",
    "keys",
    "cache_dir",
    "policy",
    "audit_dir",
    "augment",
    "personalize",
    "personal_dir",
    "keep_globals",
}


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    for key in ("run", "workdir"):
        if isinstance(raw.get(key), str):
            raw[key] = str(base / raw[key])
    for node in raw.get("nodes") or []:
        if isinstance(node, dict):
            for key in _PATH_FIELDS & node.keys():
                if isinstance(node[key], str):
                    node[key] = str(base / node[key])


def read_deploy(path: Path) -> DeployConfig:
    """Read and validate a deployment file alone (its run config is not opened)."""
    return load_yaml(path, DeployConfig, lambda raw: _resolve_paths(raw, path.parent))


def load_deploy(path: Path) -> tuple[DeployConfig, RunConfig]:
    """Read a deployment file and the run config it names; check every node against the run's regions.

    Every problem is reported at once: a bad entry in the deployment file does not hide a node whose region the
    run does not have, nor a problem of the run config (the node entries are read from the raw file for that).
    """
    problems: list[str] = []
    deploy: DeployConfig | None = None
    try:
        deploy = read_deploy(path)
    except ConfigError as err:
        problems += err.problems
    raw, lines = read_mapping(path)  # readable: read_deploy got past reading it, or raised that error above
    entries: list[Any] = raw["nodes"] if isinstance(raw.get("nodes"), list) else []
    named = [
        (i, e["region"]) for i, e in enumerate(entries) if isinstance(e, dict) and isinstance(e.get("region"), str)
    ]
    found: list[str] = []
    if deploy is None:  # the whole node list failed to build, so DeployConfig's own check of it never ran
        found += [f"nodes: {p}" for p in _shared_regions([r for _, r in named])]
    run_path = deploy.run if deploy is not None else None
    if deploy is None and isinstance(raw.get("run"), str):
        run_path = path.parent / raw["run"]  # as _resolve_paths takes it
    run: RunConfig | None = None
    if run_path is not None:
        try:
            run = load_config(run_path)
        except ConfigError as err:
            problems += err.problems
    if run is not None:
        known = run.region_names
        found += [
            f"nodes[{i}].region: {region!r} is not a region of {run_path} ({', '.join(known)})"
            for i, region in named
            if region not in known
        ]
    if found:
        problems += located_error(found, lines, str(path)).problems
    if problems or deploy is None or run is None:
        raise ConfigError(problems or [f"{path}: invalid"], str(path))
    return deploy, run
