"""Run a deployment's real Flower processes on this machine: start them, watch them, stop every one by PID.

Used by ``fedlocale deploy up`` and by the end-to-end tests. Each process gets its own session (process
group), so stopping it also stops the ``flwr-serverapp`` / ``flwr-clientapp`` processes it spawned.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from common.errors import EXIT_BAD_INPUT, FedlocaleError
from common.policy import PolicyError, check_server, load_policy
from common.runfiles import write_atomic, write_json
from deploy.pki import PkiError, peer_fingerprint
from deploy.plan import (
    Layout,
    Node,
    connection_toml,
    environment,
    register_argv,
    run_argv,
    superlink_argv,
    supernode_argv,
)

_LINK_UP = "Uvicorn running on"  # the SuperLink's HTTP(S) server accepts connections
_NODE_UP = "SuperNode ID:"  # Flower logs this once the SuperLink has accepted the node
_RUN_ID = re.compile(r"Successfully started run (\d+)")


class LaunchError(FedlocaleError):
    """A deployment process did not start or failed; the message names its log file."""


class ServerIdentityError(LaunchError):
    """A node's policy pins a SuperLink certificate and the SuperLink presents another (or cannot be checked)."""

    exit_code = EXIT_BAD_INPUT


def check_server_identity(lay: Layout, node: Node, ca_cert: Path | None = None, timeout: float = 10.0) -> str | None:
    """Before ``node``'s SuperNode starts: the certificate the SuperLink presents must be the one its policy pins.

    Connects over TLS trusting ``ca_cert`` (default the deployment CA, as the SuperNode does) and compares
    ``sha256:<hex>`` of the certificate with the policy's ``server_fingerprint``. Returns the fingerprint seen,
    or None when the node has no policy or its policy pins none (nothing to check). Raises
    ``ServerIdentityError`` naming both fingerprints on a mismatch, or why the certificate could not be read;
    a policy file that does not load raises ``ConfigError`` with its file and line.
    """
    if node.policy is None:
        return None
    policy = load_policy(node.policy)
    if policy.region != node.region:
        # the guard would refuse every reply; better not to start a node that cannot take part
        raise ServerIdentityError(
            f"node {node.region} not started: its policy {node.policy} is for region {policy.region!r}"
        )
    if policy.server_fingerprint is None:
        return None
    link = lay.deploy.superlink
    try:
        seen = peer_fingerprint(link.address, link.port, ca_cert or lay.ca.cert, timeout)
    except PkiError as err:
        raise ServerIdentityError(
            f"node {node.region} not started: cannot check the SuperLink's certificate against "
            f"server_fingerprint of {node.policy}: {err}"
        ) from err
    try:
        check_server(policy, seen)
    except PolicyError as err:
        raise ServerIdentityError(f"node {node.region} not started: {err} (pinned in {node.policy})") from err
    return seen


@dataclass(frozen=True)
class RunOutcome:
    """How a ``flwr run`` ended."""

    returncode: int
    run_id: int | None
    log: Path
    seconds: float


class Cluster:
    """The Flower processes of one deployment on this machine; a context manager that stops them all."""

    def __init__(
        self, lay: Layout, bin_dir: Path | None = None, prefix: Callable[[str], list[str]] | None = None
    ) -> None:
        """``prefix(name)`` is put before a process's command, e.g. ``ip netns exec HOST`` to place it on a host."""
        self.lay = lay
        self.bin_dir = bin_dir
        self.prefix = prefix or (lambda name: [])
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, **environment(lay)}
        if bin_dir is not None:
            self.env["PATH"] = f"{bin_dir}{os.pathsep}{self.env.get('PATH', '')}"
        lay.logs.mkdir(parents=True, exist_ok=True)
        lay.flwr_home.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop_all()

    def log_path(self, name: str) -> Path:
        """The log file of the process called ``name``."""
        return self.lay.logs / f"{name}.log"

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session, output to ``logs/NAME.log``."""
        if name in self.procs and self.procs[name].poll() is None:
            raise LaunchError(f"{name} is already running (pid {self.procs[name].pid})")
        log = self.log_path(name).open("ab")
        try:
            proc = subprocess.Popen(
                [*self.prefix(name), *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                cwd=self.lay.logs,
            )
        finally:
            log.close()  # the child holds its own copy
        self.procs[name] = proc
        self._write_pids()
        return proc

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start the SuperLink, wait until its port accepts connections, write the ``flwr`` connection entry."""
        proc = self.start("superlink", superlink_argv(self.lay))
        _wait(
            lambda: _LINK_UP in self.read_log("superlink"),
            proc,
            timeout,
            f"SuperLink did not start; see {self.log_path('superlink')}",
            lambda: _flower_error(self.read_log("superlink")),
        )
        write_atomic(self.lay.flwr_home / "config.toml", connection_toml(self.lay))

    def register(self, node: Node) -> int:
        """Register the node's public key with the SuperLink; return the node id Flower gave it."""
        done = self._flwr([*register_argv(self.lay, node), "--format", "json"])
        try:
            return int(json.loads(done.stdout[done.stdout.index("{") :])["node-id"])
        except (ValueError, KeyError) as err:
            raise LaunchError(f"registering {node.region} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}") from err

    def start_node(self, node: Node, ca_cert: Path | None = None, name: str | None = None) -> str:
        """Start the SuperNode of ``node`` (trusting ``ca_cert`` instead of the deployment CA if given).

        If the node's policy pins the SuperLink's certificate, the SuperLink is checked first and a different
        one refuses the start (``ServerIdentityError``, nothing started). Returns the process name (default
        ``node-REGION``) for ``wait_node`` and ``stop``.
        """
        name = name or f"node-{node.region}"
        check_server_identity(self.lay, node, ca_cert)
        self.start(name, supernode_argv(self.lay, node, ca_cert))
        return name

    def wait_node(self, name: str, timeout: float = 120.0) -> None:
        """Wait until the SuperLink accepted the node; LaunchError with Flower's own words if it exits first."""
        _wait(
            lambda: _NODE_UP in self.read_log(name),
            self.procs[name],
            timeout,
            f"SuperNode {name} did not connect; see {self.log_path(name)}",
            lambda: _flower_error(self.read_log(name)),
        )

    def start_all(self, timeout: float = 120.0) -> list[str]:
        """SuperLink, then register and start every node, then wait until all are connected; the nodes' names."""
        self.start_superlink()
        names = []
        for node in self.lay.nodes:
            self.register(node)
            names.append(self.start_node(node))
        for name in names:
            self.wait_node(name, timeout)
        return names

    def run(
        self,
        out: Path | None = None,
        resume: bool = False,
        timeout: float = 3600.0,
        name: str = "flwr-run",
        watch: Callable[[], None] | None = None,
    ) -> RunOutcome:
        """``flwr run`` to completion (it streams the ServerApp's log into ``logs/NAME.log``).

        ``watch`` is called about once a second while the run goes on (progress display, fault injection).
        """
        started = time.monotonic()
        proc = self.start(name, run_argv(self.lay, out, resume))
        deadline = started + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                self.stop(name)
                raise LaunchError(f"flwr run did not finish within {timeout:.0f} s; see {self.log_path(name)}")
            if watch is not None:
                watch()
            time.sleep(1.0)
        match = _RUN_ID.search(self.read_log(name))
        return RunOutcome(
            returncode=proc.returncode,
            run_id=int(match.group(1)) if match else None,
            log=self.log_path(name),
            seconds=time.monotonic() - started,
        )

    def read_log(self, name: str) -> str:
        """The text a process has logged so far."""
        path = self.log_path(name)
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Stop a process and everything in its session: ``sig`` first, SIGKILL after ``grace`` seconds."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)  # SIGKILL cannot be refused; this only reaps
        _signal_group(proc.pid, signal.SIGKILL)  # children that outlived their parent in the same session

    def stop_all(self) -> None:
        """Stop every process this cluster started, newest first (nodes before the SuperLink)."""
        for name in reversed(list(self.procs)):
            self.stop(name)

    def _flwr(self, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix("flwr"), *argv], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def _write_pids(self) -> None:
        pids = {name: p.pid for name, p in self.procs.items() if p.poll() is None}
        write_json(self.lay.logs / "pids.json", pids)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _flower_error(log: str) -> str:
    """Flower's own explanation from a log ("[code: 2004] Failed to activate SuperNode", TLS failures)."""
    lines = [ln.strip() for ln in log.splitlines()]
    keep = [ln for ln in lines if "code:" in ln or "CERTIFICATE" in ln.upper() or "Exit Code" in ln]
    return "; ".join(dict.fromkeys(keep)) or (lines[-1] if lines else "no output")


def _wait(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    timeout: float,
    message: str,
    why: Callable[[], str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            reason = why() if why is not None else ""
            raise LaunchError(f"{message} (exit code {proc.returncode}){': ' + reason if reason else ''}")
        if time.monotonic() > deadline:
            raise LaunchError(f"{message} (still not ready after {timeout:.0f} s)")
        time.sleep(0.25)
