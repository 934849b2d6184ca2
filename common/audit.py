"""Signed, hash-chained ledgers of what crossed a boundary, and their offline verification.

Every node and the server keep one ledger: a JSON-lines file whose entries each carry the previous entry's hash
and an Ed25519 signature over their own hash. Time is passed in (``now``), so tests fix it. ``verify_ledger``
checks one ledger against a public key the auditor trusts; ``cross_check`` checks that every update the server
aggregated was sent by exactly one node with the same payload hash.

Entry layout (one JSON object per line)::

    {"seq": 0, "time": "2026-11-29T21:00:00+00:00", "signer": "cn-books", "prev": "000…0",
     "body": {"kind": "egress", …}, "hash": "<sha256 hex>", "sig": "<base64 Ed25519 signature of the hash bytes>"}

``hash`` is the SHA-256 of the canonical JSON of ``seq``, ``time``, ``signer``, ``prev`` and ``body``.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.data import json_lines
from common.errors import ConfigError, FedlocaleError, InputError
from common.runfiles import KEY_FILE, LEDGER_FILE, PUBLIC_KEY_FILE

GENESIS = "0" * 64
_ENTRY_FIELDS = frozenset({"seq", "time", "signer", "prev", "body", "hash", "sig"})  # what every entry carries
SERVER = "server"  # the server's signer name; nodes sign with their region's name

# body kinds
EGRESS = "egress"  # node: a reply that left (status sent) or was stopped by the guard (status refused)
DISPATCH = "dispatch"  # server: the global adapter sent out for a round
INBOUND = "inbound"  # server: one reply received
AGGREGATE = "aggregate"  # server: who was averaged, with which weights, into which global adapter
SENT = "sent"
REFUSED = "refused"
FAILED = "failed"


class LedgerError(FedlocaleError):
    """A ledger cannot be read or written (the message names the file and line)."""


class AuditKeyError(InputError):
    """A signing or verification key cannot be made or read."""


# ------------------------------------------------------------------------------------------------- hashing


def canonical_json(value: Any) -> bytes:
    """The one byte form of a JSON value that hashes and signatures use (sorted keys, no spaces, UTF-8)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def payload_hash(arrays: Mapping[str, np.ndarray], metrics: Mapping[str, int | float] | None = None) -> str:
    """SHA-256 of a message payload: every tensor (name, dtype, shape, C-order bytes, by name) and the metrics.

    The node hashes what it sends and the server what it receives; the bytes are those of the tensors, not of
    a transport encoding, so both sides (and an auditor holding a kept update) compute the same value.
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        header = canonical_json([name, arr.dtype.str, list(arr.shape)])
        digest.update(len(header).to_bytes(8, "big") + header)
        data = arr.tobytes()
        digest.update(len(data).to_bytes(8, "big") + data)
    # NaN has no canonical JSON; a reply carrying one is refused, but its hash must still be computable
    digest.update(json.dumps(dict(metrics or {}), sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def content_payload(content: Any) -> tuple[dict[str, np.ndarray], dict[str, int | float]]:
    """The tensors and metrics of a Flower RecordDict (all its Array and Metric records), for ``payload_hash``."""
    return merged_payload(*content_records(content))


def content_records(
    content: Any,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, int | float]]]:
    """Every ArrayRecord of a Flower RecordDict with its tensors as numpy, and every MetricRecord, by record key.

    ``Array.numpy`` deserialises the array's bytes afresh at every call: a reader that needs the tensors more than
    once (the server checks, averages, hashes and keeps each reply) converts them here once and keeps the result.
    """
    arrays = {key: {name: array.numpy() for name, array in rec.items()} for key, rec in content.array_records.items()}
    metrics = {key: dict(rec.items()) for key, rec in content.metric_records.items()}
    return arrays, metrics


def merged_payload(
    arrays: Mapping[str, Mapping[str, np.ndarray]], metrics: Mapping[str, Mapping[str, int | float]]
) -> tuple[dict[str, np.ndarray], dict[str, int | float]]:
    """Records (as ``content_records`` gives them) merged into the one tensor and one metric mapping that
    ``payload_hash`` takes, in record order (a name in a later record wins, as in the node's own hash)."""
    merged_arrays = {name: arr for rec in arrays.values() for name, arr in rec.items()}
    merged_metrics = {name: value for rec in metrics.values() for name, value in rec.items()}
    return merged_arrays, merged_metrics


def entry_hash(entry: Mapping[str, Any]) -> str:
    """The hash an entry must carry: over its sequence number, time, signer, previous hash and body."""
    core = {k: entry.get(k) for k in ("seq", "time", "signer", "prev", "body")}
    return hashlib.sha256(canonical_json(core)).hexdigest()


# ---------------------------------------------------------------------------------------------------- keys


def create_signing_key(folder: Path) -> Ed25519PrivateKey:
    """Make ``folder/ledger.key`` (PKCS#8 PEM, mode 0600, never overwritten) and ``folder/ledger.pub``."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(folder / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as err:
        raise AuditKeyError(f"{folder / KEY_FILE}: exists; a ledger key is never replaced") from err
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (folder / PUBLIC_KEY_FILE).write_bytes(public)
    return key


def signing_key(folder: Path) -> Ed25519PrivateKey:
    """The folder's ledger key, made on first use: a node's key is created on the node and never leaves it."""
    if not (folder / KEY_FILE).exists():
        try:
            return create_signing_key(folder)
        except AuditKeyError:
            pass  # another process of the same node made it first
    return load_signing_key(folder / KEY_FILE)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise AuditKeyError(f"{path}: not a readable PEM private key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(f"{path}: not an Ed25519 key")
    return key


def load_verify_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise AuditKeyError(f"{path}: not a readable PEM public key ({err})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(f"{path}: not an Ed25519 public key")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key (SHA-256 of its raw bytes, first 16 hex digits)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# -------------------------------------------------------------------------------------------------- writing


@contextmanager
def _locked(path: Path) -> Iterator[Any]:
    # Deployment starts a process per message, so two of one node's messages may append at once; the lock keeps
    # the chain a chain.
    path.parent.mkdir(parents=True, exist_ok=True)
    # surrogateescape: a byte that is not UTF-8 is named by its line (``_last_entry``) instead of ending the read
    with open(path, "a+", encoding="utf-8", errors="surrogateescape") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _last_entry(handle: Any, path: Path) -> dict[str, Any] | None:
    handle.seek(0)
    last = None
    for number, line in enumerate(handle, start=1):
        if line.strip():
            last = (number, line)
    if last is None:
        return None
    # only the last line is parsed (each append pays for one line, not the whole ledger); a bad byte in it is a
    # problem named by its column, as json_lines names every line-based reader's
    number, line = last
    entry = next(json_lines([line]))[1]
    if isinstance(entry, str):
        raise LedgerError(f"{path}:{number}: {entry}; refusing to extend a damaged ledger")
    return entry


@dataclass
class Ledger:
    """An append-only ledger file signed by one party (``signer``: a region name or ``server``)."""

    path: Path
    key: Ed25519PrivateKey = field(repr=False)
    signer: str

    @classmethod
    def in_folder(cls, folder: Path, signer: str) -> Ledger:
        """The ledger in ``folder`` (``ledger.jsonl``), signed with the folder's key, made on first use."""
        return cls(folder / LEDGER_FILE, signing_key(folder), signer)

    def append(self, body: Mapping[str, Any], now: datetime) -> dict[str, Any]:
        """Add one signed entry after the last one; ``now`` must be timezone-aware."""
        if now.tzinfo is None:
            raise ValueError("ledger time must be timezone-aware")
        with _locked(self.path) as handle:
            last = _last_entry(handle, self.path)
            entry: dict[str, Any] = {
                "seq": 0 if last is None else int(last["seq"]) + 1,
                "time": now.isoformat(),
                "signer": self.signer,
                "prev": GENESIS if last is None else str(last["hash"]),
                "body": dict(body),
            }
            entry["hash"] = entry_hash(entry)
            entry["sig"] = base64.b64encode(self.key.sign(bytes.fromhex(entry["hash"]))).decode()
            handle.seek(0, os.SEEK_END)
            handle.write(json.dumps(entry, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return entry


# ------------------------------------------------------------------------------------------------ verifying


@dataclass(frozen=True)
class LedgerCheck:
    """The outcome of checking one ledger: its entries (when readable) and the first problem, if any."""

    path: Path
    signer: str | None
    entries: tuple[dict[str, Any], ...]
    problem: str | None  # "path:line: reason" of the first broken entry, None when the ledger holds

    @property
    def ok(self) -> bool:
        """Whether every entry is intact, in order, and signed by the expected key."""
        return self.problem is None


def read_entries(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The entries of a ledger file and the first line that is not an entry (``path:line: reason``)."""
    entries: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()  # bad bytes: by line below
    except OSError as err:
        return entries, f"{path}: cannot read ({err})"
    for number, entry in json_lines(lines):
        if isinstance(entry, str):
            return entries, f"{path}:{number}: {entry}"
        if not set(entry) >= _ENTRY_FIELDS:
            return entries, f"{path}:{number}: not a ledger entry"
        entry["_line"] = number
        entries.append(entry)
    return entries, None


def verify_ledger(path: Path, keys: Mapping[str, Ed25519PublicKey]) -> LedgerCheck:
    """Check a ledger's chain and signatures against ``keys`` (signer name → trusted public key)."""
    entries, problem = read_entries(path)
    signer = str(entries[0]["signer"]) if entries else None
    if problem is None and not entries:
        problem = f"{path}: empty ledger"
    if problem is None and signer not in keys:
        problem = f"{path}:{entries[0]['_line']}: no trusted public key for signer {signer!r}"
    prev = GENESIS
    for expected_seq, entry in enumerate(entries):
        if problem is not None:
            break
        where = f"{path}:{entry['_line']}"
        problem = _entry_problem(entry, expected_seq, prev, signer, keys)
        problem = f"{where}: {problem}" if problem else None
        prev = str(entry["hash"])
    return LedgerCheck(path, signer, tuple(entries), problem)


def _entry_problem(
    entry: Mapping[str, Any], seq: int, prev: str, signer: str | None, keys: Mapping[str, Ed25519PublicKey]
) -> str | None:
    if entry["signer"] != signer:
        return f"signer {entry['signer']!r} in a ledger of {signer!r}"
    if entry["seq"] != seq:
        return f"sequence number {entry['seq']}, expected {seq} (an entry is missing or out of order)"
    if entry["prev"] != prev:
        return "does not follow the previous entry (previous hash differs: an entry was removed, moved or changed)"
    if entry_hash(entry) != entry["hash"]:
        return "content does not match its hash (the entry was changed)"
    try:
        keys[str(signer)].verify(base64.b64decode(str(entry["sig"]), validate=True), bytes.fromhex(entry["hash"]))
    except (InvalidSignature, ValueError):
        return f"signature does not verify with the key given for {signer!r}"
    return None


def cross_check(server: LedgerCheck, nodes: Sequence[LedgerCheck]) -> list[str]:
    """Problems where the server's aggregations and the nodes' egress records disagree.

    Every participant of every ``aggregate`` entry must appear as exactly one ``sent`` train egress entry, of
    the same round and run, in exactly one node ledger — the ledger of the region it is attributed to — with
    the same payload hash.
    """
    sent: dict[str, list[tuple[LedgerCheck, dict[str, Any]]]] = {}
    for node in nodes:
        for entry in node.entries:
            body = entry["body"]
            if body.get("kind") == EGRESS and body.get("status") == SENT:
                sent.setdefault(str(body.get("sha256")), []).append((node, entry))
    problems = []
    for entry in server.entries:
        body = entry["body"]
        if body.get("kind") != AGGREGATE:
            continue
        for part in body.get("participants", []):
            problem = _participant_problem(part, body, sent.get(str(part.get("sha256")), []))
            if problem:
                problems.append(f"{server.path}:{entry['_line']}: round {body.get('round')}: {problem}")
    return problems


def _participant_problem(
    part: Mapping[str, Any], aggregate: Mapping[str, Any], matches: Sequence[tuple[LedgerCheck, dict[str, Any]]]
) -> str | None:
    region = part.get("region")
    if not matches:
        return f"update {str(part.get('sha256'))[:16]}… of {region} is in no node's ledger"
    if len(matches) > 1:
        where = ", ".join(f"{n.path}:{e['_line']}" for n, e in matches)
        return f"update {str(part.get('sha256'))[:16]}… of {region} appears {len(matches)} times ({where})"
    node, entry = matches[0]
    body = entry["body"]
    if node.signer != region:
        return f"update attributed to {region} was sent by {node.signer} ({node.path}:{entry['_line']})"
    if body.get("round") != aggregate.get("round") or body.get("run") != aggregate.get("run"):
        return (
            f"update of {region} was sent in run {body.get('run')} round {body.get('round')} "
            f"({node.path}:{entry['_line']})"
        )
    if body.get("message") != "train":
        return f"update of {region} was a {body.get('message')} reply ({node.path}:{entry['_line']})"
    return None


def signers(checks: Iterable[LedgerCheck]) -> list[str]:
    """The signer names of the ledgers, in order (None for unreadable ones left out)."""
    return [c.signer for c in checks if c.signer is not None]


# ----------------------------------------------------------------------------------------------- everything


@dataclass(frozen=True)
class Verification:
    """The outcome of checking a set of ledgers together, and which checks ran.

    An auditor must be able to tell "checked and held" from "not checked": ``checked`` states what each check
    that ran established (meaningful when ``ok``), ``not_checked`` names each check that did not run and why.
    """

    checks: tuple[LedgerCheck, ...]
    findings: tuple[str, ...]  # every problem, first broken entry of each ledger first
    rounds_recomputed: int | None  # rounds whose kept updates were found and recomputed; None: not run
    checked: tuple[str, ...] = ()
    not_checked: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether everything that was checked held."""
        return not self.findings


def collect_ledgers(paths: Iterable[Path]) -> tuple[list[Path], list[str]]:
    """The ledger files named directly or found (``ledger.jsonl``) under named folders, each file once, and a note
    for each one named more than once (by resolved path: ``a/ledger.jsonl`` and ``./a/ledger.jsonl`` are one).

    A path that does not exist, or a folder holding no ledger, is unusable input (``InputError``, exit 2), not a
    broken ledger: a mistyped path must never read as tampering.
    """
    found: list[Path] = []
    seen: dict[Path, Path] = {}
    notes: list[str] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(path.rglob(LEDGER_FILE))
            if not inside:
                raise InputError(f"{path}: no {LEDGER_FILE} in this folder")
        elif path.exists():
            inside = [path]
        else:
            raise InputError(f"{path}: no such ledger file or folder")
        for ledger in inside:
            first = seen.setdefault(ledger.resolve(), ledger)
            if first is not ledger:
                notes.append(f"{ledger}: the same file as {first}; checked once")
                continue
            found.append(ledger)
    return found, notes


def find_ledgers(paths: Iterable[Path]) -> list[Path]:
    """Ledger files named directly, or every ``ledger.jsonl`` under a named folder (sorted), each file once."""
    return collect_ledgers(paths)[0]


def read_keys_file(path: Path) -> dict[str, Path]:
    """A YAML mapping of signer name → public key file (relative paths from the keys file's folder)."""
    from common.yamlfile import read_yaml_file

    try:
        raw, _ = read_yaml_file(path)
    except ConfigError as err:
        raise AuditKeyError(f"cannot read a keys file: {'; '.join(err.problems)}") from err
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise AuditKeyError(f"{path}: must map signer names to public key files, e.g. 'server: server.pub'")
    return {name: path.parent / value for name, value in raw.items()}


def verify_all(
    ledgers: Sequence[Path],
    trusted: Mapping[str, Ed25519PublicKey],
    recompute: Callable[[LedgerCheck], tuple[int, list[str]]] | None = None,
) -> Verification:
    """Check every ledger, then — when one is the server's — that its aggregations match the nodes' records,
    and with ``recompute`` that the kept updates aggregate to the recorded global adapters.

    Each check that cannot run (no server ledger, a broken one, no kept updates) is named in ``not_checked``.
    """
    checks = tuple(verify_ledger(path, trusted) for path in ledgers)
    findings = [c.problem for c in checks if c.problem is not None]
    servers = [c for c in checks if c.signer == SERVER]
    names = [c.signer for c in checks if c.signer is not None]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        findings.append(
            f"{names.count(dup)} ledgers are signed by {dup!r}: "
            + ", ".join(str(c.path) for c in checks if c.signer == dup)
        )
    checked = [f"each of the {len(checks)} ledger(s) is intact, in order, and signed by the key given for its signer"]
    not_checked: list[str] = []
    rounds = None
    cross = "that the server aggregated only updates the nodes recorded sending"
    again = "recomputing each round's global adapter from the kept updates"
    if len(servers) != 1 or not servers[0].ok:
        why = (
            "no server ledger given (one signed by 'server')"
            if not servers
            else f"{len(servers)} server ledgers given"
            if len(servers) > 1
            else "the server ledger is broken"
        )
        not_checked += [f"{cross}: {why}", f"{again}: {why}"]
        return Verification(checks, tuple(findings), rounds, tuple(checked), tuple(not_checked))
    server = servers[0]
    nodes = [c for c in checks if c.signer != SERVER and c.ok]
    findings.extend(cross_check(server, nodes))
    aggregated = [e["body"] for e in server.entries if e["body"].get("kind") == AGGREGATE]
    updates = sum(len(body.get("participants", [])) for body in aggregated)
    checked.append(
        f"{cross} ({updates} update(s) in {len(aggregated)} aggregation(s), against {len(nodes)} node ledger(s))"
    )
    secure = [body.get("round") for body in aggregated if isinstance(body.get("secure"), dict)]
    if secure:
        checked.append(
            f"round(s) {', '.join(map(str, secure))} of {len(aggregated)} were securely aggregated: the server "
            "recorded only their unmasked sum, and each participant's masked upload is the one its node recorded"
        )
    recorded = sum(1 for body in aggregated if body.get("global_sha256") is not None)
    if recompute is None:
        not_checked.append(f"{again}: no kept updates given (--updates DIR)")
    else:
        rounds, problems = recompute(server)
        findings.extend(problems)
        checked.append(f"the kept updates recompute the recorded global adapter of {rounds} of {recorded} round(s)")
    return Verification(checks, tuple(findings), rounds, tuple(checked), tuple(not_checked))
