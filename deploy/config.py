"""The deployment file (``configs/deploy/*.yaml``): where the SuperLink listens and which node serves which region.

Parsed once into frozen objects like the run config, every problem reported with its ``file:line``.
Relative paths are taken from the deployment file's folder.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import RunConfig, load_config, load_yaml, region_name_problem
from common.errors import ConfigError

DEFAULT_NODE_PORT = 9101  # first SuperNode ClientAppIo port on one host; each node on a host needs its own


def _check(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise ConfigError([f"{name}: {msg}" for name, msg in problems])


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
        if not 1 <= self.port <= 65535:
            problems.append(("port", f"must be in [1, 65535], got {self.port}"))
        try:
            ipaddress.ip_address(self.bind)
        except ValueError:
            problems.append(("bind", f"must be an IP address, got {self.bind!r}"))
        _check(problems)

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

    def __post_init__(self) -> None:
        problems = []
        name_problem = region_name_problem(self.region)
        if name_problem:
            problems.append(("region", name_problem))
        if self.port is not None and not 1 <= self.port <= 65535:
            problems.append(("port", f"must be in [1, 65535], got {self.port}"))
        if self.threads is not None and self.threads < 1:
            problems.append(("threads", f"must be >= 1, got {self.threads}"))
        if self.personal_dir is not None and self.personalize is None:
            problems.append(("personal_dir", "is set but personalize is not (the node would never write there)"))
        _check(problems)


@dataclass(frozen=True)
class DeployConfig:
    """A whole deployment: the run it serves, the SuperLink, and one node per region."""

    run: Path  # the run config (YAML) the ServerApp reads
    workdir: Path  # pki/, flwr-home/, logs/, nodes/, out/ on this machine
    superlink: SuperLinkSettings = field(default_factory=SuperLinkSettings)
    nodes: tuple[NodeEntry, ...] = ()  # empty: one node per region of the run config
    connection: str = "fedlocale"  # the SuperLink connection's name in FLWR_HOME/config.toml

    def __post_init__(self) -> None:
        problems = []
        regions = [n.region for n in self.nodes]
        for name in sorted({r for r in regions if regions.count(r) > 1}):
            problems.append(("nodes", f"region {name!r} has more than one node"))
        if not self.connection.replace("-", "").replace("_", "").isalnum():
            problems.append(("connection", f"must be letters, digits, - or _, got {self.connection!r}"))
        _check(problems)


_PATH_FIELDS = {"data", "keys", "cache_dir", "policy", "audit_dir", "augment", "personalize", "personal_dir"}


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
    """Read a deployment file and the run config it names; check every node against the run's regions."""
    deploy = read_deploy(path)
    run = load_config(deploy.run)
    known = run.region_names
    problems = [
        f"{path}: nodes[{i}].region: {node.region!r} is not a region of {deploy.run} ({', '.join(known)})"
        for i, node in enumerate(deploy.nodes)
        if node.region not in known
    ]
    if problems:
        raise ConfigError(problems, str(path))
    return deploy, run
