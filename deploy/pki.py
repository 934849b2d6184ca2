"""Certificates and keys for a deployment: one CA, the SuperLink's TLS certificate, one auth key per SuperNode.

How the files map onto Flower's flags:

- ``create_ca``: ``ca.crt`` goes to every SuperNode (``--root-certificates ca.crt``) and to the SuperLink
  (``--ssl-ca-certfile ca.crt``); ``ca.key`` stays with whoever issues certificates.
- ``create_server_cert``: ``server.pem`` and ``server.key`` go to the SuperLink (``--ssl-certfile``,
  ``--ssl-keyfile``).
- ``create_node_keys``: ``node.key.pub`` is registered with ``flwr supernode register``; ``node.key`` stays on
  the SuperNode (``--auth-supernode-private-key``).
- ``pinned_fingerprint`` / ``peer_fingerprint``: the SuperLink certificate as a region's policy pins it
  (``server_fingerprint: "sha256:…"``), from its file and as the running SuperLink presents it over TLS.

Every key is ECDSA P-256. Private keys are written unencrypted (the Flower processes read them without a
passphrase), so they are created owner-only from the first byte, and nothing is ever overwritten silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
import secrets
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import InputError

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
FOLDER_MODE = 0o700
# Certificates start this long before ``now``: a SuperNode whose clock lags the issuing machine by a few
# minutes would otherwise reject a certificate made moments ago as "not yet valid".
BACKDATE = timedelta(minutes=5)
# Clients match the subjectAltName entries; the common name is only a label for people reading the file.
SERVER_COMMON_NAME = "fedlocale SuperLink"
# How a policy names a certificate (common.policy.RegionPolicy.server_fingerprint): this prefix, then hex.
PIN_PREFIX = "sha256:"

# Curves ``flwr supernode register`` accepts, minus the two too weak to choose today.
_NODE_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_DNS_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")


class PkiError(InputError):
    """A certificate or key could not be created or read; the message names the file or value at fault."""


@dataclass(frozen=True)
class CaFiles:
    """The certificate authority: ``cert`` is distributed to every party, ``key`` signs server certificates."""

    cert: Path
    key: Path

    @classmethod
    def in_folder(cls, folder: str | os.PathLike[str]) -> CaFiles:
        """The files ``create_ca`` writes into ``folder`` (``ca.crt``, ``ca.key``), whether or not they exist."""
        return cls(Path(folder) / "ca.crt", Path(folder) / "ca.key")


@dataclass(frozen=True)
class ServerFiles:
    """The SuperLink's TLS certificate (``--ssl-certfile``) and its private key (``--ssl-keyfile``)."""

    cert: Path
    key: Path

    @classmethod
    def in_folder(cls, folder: str | os.PathLike[str]) -> ServerFiles:
        """The files ``create_server_cert`` writes into ``folder`` (``server.pem``, ``server.key``)."""
        return cls(Path(folder) / "server.pem", Path(folder) / "server.key")


@dataclass(frozen=True)
class NodeKeys:
    """A SuperNode's authentication key pair in OpenSSH formats."""

    private: Path
    public: Path

    @classmethod
    def in_folder(cls, folder: str | os.PathLike[str]) -> NodeKeys:
        """The files ``create_node_keys`` writes into ``folder`` (``node.key``, ``node.key.pub``)."""
        return cls(Path(folder) / "node.key", Path(folder) / "node.key.pub")


@dataclass(frozen=True)
class _Output:
    path: Path
    data: bytes
    mode: int


def create_ca(
    folder: str | os.PathLike[str],
    *,
    now: datetime,
    common_name: str = "fedlocale CA",
    days: int = 3650,
    force: bool = False,
) -> CaFiles:
    """Create a self-signed CA (``ca.crt``, ``ca.key``) in ``folder``, valid for ``days`` from ``now``.

    The CA may sign end-entity certificates only (path length 0). Raises ``PkiError`` if either file exists
    and ``force`` is false; in that case nothing is written.
    """
    files = CaFiles.in_folder(folder)
    _refuse_existing([files.cert, files.key], force=force)
    outputs, _, _ = _ca_outputs(files, now, common_name, days)
    _write_all(outputs, force=force)
    return files


def _ca_outputs(
    files: CaFiles, now: datetime, common_name: str = "fedlocale CA", days: int = 3650
) -> tuple[list[_Output], x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    start, end = _validity(now, days)
    cert = (
        _builder(name, name, key.public_key(), start, end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return [_private_output(files.key, key), _cert_output(files.cert, cert)], cert, key


def create_server_cert(
    ca: CaFiles,
    folder: str | os.PathLike[str],
    hosts: Sequence[str],
    *,
    now: datetime,
    days: int = 825,
    force: bool = False,
) -> ServerFiles:
    """Create the SuperLink's certificate (``server.pem``) and key (``server.key``) in ``folder``, signed by ``ca``.

    ``hosts`` are the names clients dial: entries that parse as IP addresses become IP SANs, the rest DNS SANs.
    The certificate never outlives the CA. Raises ``PkiError`` for an empty or malformed ``hosts``, an unusable
    CA, or an existing output file without ``force`` (then nothing is written).
    """
    files = ServerFiles.in_folder(folder)
    _refuse_existing([files.cert, files.key], force=force)
    alt_names = _subject_alt_names(hosts)
    ca_cert, ca_key = _load_ca(ca)
    _write_all(_server_outputs(ca_cert, ca_key, ca.cert, files, alt_names, now, days), force=force)
    return files


def _server_outputs(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_path: Path,
    files: ServerFiles,
    alt_names: list[x509.GeneralName],
    now: datetime,
    days: int = 825,
) -> list[_Output]:
    start, end = _validity(now, days)
    if not ca_cert.not_valid_before_utc <= now <= ca_cert.not_valid_after_utc:
        raise PkiError(f"{ca_path} is not valid at {now.isoformat()}; create a new CA")
    # A client stops trusting the chain when the CA expires, so a later end date would only mislead.
    end = min(end, ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(SERVER_COMMON_NAME), ca_cert.subject, key.public_key(), start, end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return [_private_output(files.key, key), _cert_output(files.cert, cert)]


def create_node_keys(folder: str | os.PathLike[str], *, force: bool = False) -> NodeKeys:
    """Create a SuperNode's ECDSA P-256 key pair in ``folder``: ``node.key`` (OpenSSH private, unencrypted)
    and ``node.key.pub`` (one ``ecdsa-sha2-nistp256 …`` line).

    Raises ``PkiError`` if either file exists and ``force`` is false; in that case nothing is written.
    """
    files = NodeKeys.in_folder(folder)
    _refuse_existing([files.private, files.public], force=force)
    _write_all(_node_outputs(files), force=force)
    return files


def _node_outputs(files: NodeKeys) -> list[_Output]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return [_Output(files.private, private, PRIVATE_MODE), _Output(files.public, public + b"\n", PUBLIC_MODE)]


def create_all(
    *,
    now: datetime,
    pki: tuple[Path, Sequence[str]] | None,
    node_folders: Sequence[Path] = (),
    also_made: Sequence[Path] = (),
    force: bool = False,
) -> list[Path]:
    """Create a deployment's credentials in one step: all or nothing. Returns the files written.

    ``pki`` is (folder, hosts) for a new CA and the SuperLink certificate it signs; ``node_folders`` each get a
    node key pair; ``also_made`` are folders the caller creates afterwards, checked here with the rest. Every
    check (existing files without ``force``, hosts, folders that cannot be created) and every key comes first,
    in memory; only then is anything written, and a failure while writing removes every file and folder this
    call created, so a failed ``deploy init`` leaves nothing behind and the corrected command needs no --force.
    """
    outputs: list[_Output] = []
    if pki is not None:
        folder, hosts = pki
        ca_files, server_files = CaFiles.in_folder(folder), ServerFiles.in_folder(folder)
        alt_names = _subject_alt_names(hosts)
        ca_outputs, ca_cert, ca_key = _ca_outputs(ca_files, now)
        outputs += ca_outputs + _server_outputs(ca_cert, ca_key, ca_files.cert, server_files, alt_names, now)
    for folder in node_folders:
        outputs += _node_outputs(NodeKeys.in_folder(folder))
    _refuse_existing([out.path for out in outputs], force=force)
    for folder in {out.path.parent for out in outputs} | set(also_made):
        _check_can_create(folder)
    _write_all(outputs, force=force)
    return [out.path for out in outputs]


def load_node_public_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePublicKey:
    """Read a SuperNode's OpenSSH public key, checking it is one ``flwr supernode register`` accepts.

    Raises ``PkiError`` naming ``path`` if the file is missing, unparsable, or not ECDSA on P-256/384/521.
    """
    path = Path(path)
    try:
        key = serialization.load_ssh_public_key(_read(path))
    except (ValueError, UnsupportedAlgorithm) as err:
        raise PkiError(f"{path} is not an OpenSSH public key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NODE_CURVES):
        raise PkiError(f"{path} is not an ECDSA key on a NIST P curve; create one with create_node_keys")
    return key


def certificate_fingerprint(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of the PEM certificate at ``path`` over its DER encoding, as lowercase hex (64 characters)."""
    return _read_cert(Path(path)).fingerprint(hashes.SHA256()).hex()


def pinned_fingerprint(path: str | os.PathLike[str]) -> str:
    """The certificate at ``path`` in the form a policy pins it: ``sha256:`` and 64 lowercase hex digits."""
    return PIN_PREFIX + certificate_fingerprint(path)


def peer_fingerprint(host: str, port: int, ca_cert: str | os.PathLike[str], timeout: float = 10.0) -> str:
    """Connect to ``host:port`` over TLS, trusting only ``ca_cert``, and return the certificate it presents
    as ``sha256:<hex of the SHA-256 of its DER>`` (the form of a policy's ``server_fingerprint``).

    The chain and the host name are verified as the SuperNode verifies them; ``PkiError`` says why when the
    server cannot be reached, does not speak TLS, or presents a certificate ``ca_cert`` does not vouch for.
    """
    where = f"{host}:{port}"
    ca_path = Path(ca_cert)
    if not ca_path.is_file():
        raise PkiError(f"{ca_path} does not exist")
    try:
        context = ssl.create_default_context(cafile=str(ca_path))
    except (ssl.SSLError, ValueError) as err:
        raise PkiError(f"{ca_path} is not a PEM certificate: {err}") from err
    context.set_alpn_protocols(["h2", "http/1.1"])  # what gRPC and the SuperLink's HTTP API offer
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:  # refused, unreachable, unknown host, timed out
        raise PkiError(f"{where}: cannot connect: {err.strerror or err}") from err
    try:
        with raw, context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as err:
        raise PkiError(f"{where}: certificate not trusted with {ca_path}: {err.verify_message} ({err})") from err
    except OSError as err:  # ssl.SSLError, or the server closed or stayed silent
        raise PkiError(f"{where}: TLS handshake failed: {err.strerror or err}") from err
    if not der:
        raise PkiError(f"{where}: presented no certificate")
    return PIN_PREFIX + hashlib.sha256(der).hexdigest()


# --- certificates -----------------------------------------------------------------------------------------


def _validity(now: datetime, days: int) -> tuple[datetime, datetime]:
    if now.tzinfo is None or now.utcoffset() is None:
        raise PkiError(f"now must be timezone-aware, got {now.isoformat()}")
    if days < 1:
        raise PkiError(f"days must be at least 1, got {days}")
    # X.509 times have whole seconds; truncate here so the stored dates equal what callers compute.
    now = now.astimezone(UTC).replace(microsecond=0)
    return now - BACKDATE, now + timedelta(days=days)


def _name(common_name: str) -> x509.Name:
    try:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    except ValueError as err:
        raise PkiError(f"invalid common name {common_name!r}: {err}") from err


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, start: datetime, end: datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        # Strict verifiers (OpenSSL's X509_STRICT, Python 3.13's default) insist on key identifiers.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # Copy the CA's own identifier when it has one, so chains build even for a CA made by another tool.
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        public_key = ca_cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise PkiError("the CA certificate does not hold an ECDSA key") from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    # A bare string is a Sequence[str] too; it would silently become one SAN per character.
    if isinstance(hosts, str):
        raise PkiError(f"hosts must be a list of names, not the string {hosts!r}")
    unique = list(dict.fromkeys(hosts))
    if not unique:
        raise PkiError("no hosts given: the server certificate needs at least one DNS name or IP address")
    return [_alt_name(host) for host in unique]


def host_problem(host: str) -> str | None:
    """Why ``host`` cannot be a name in the SuperLink certificate, or None for an IP address or a DNS name."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if len(host) > 253 or not _DNS_NAME.fullmatch(host):
        return f"host {host!r} is neither an IP address nor a DNS name (use the xn-- form for non-ASCII)"
    return None


def _alt_name(host: str) -> x509.GeneralName:
    problem = host_problem(host)
    if problem is not None:
        raise PkiError(problem)
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host.lower())


def _load_ca(ca: CaFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = _read_cert(ca.cert)
    key = _read_private_key(ca.key)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PkiError(f"{ca.cert} is not a CA certificate")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise PkiError(f"{ca.key} is not the key of {ca.cert}")
    return cert, key


def _spki(public_key: object) -> bytes:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return b""
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as err:
        raise PkiError(f"{path} is not a PEM certificate: {err}") from err


def _read_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        # TypeError is how cryptography reports a passphrase-protected key.
        raise PkiError(f"{path} is not an unencrypted PEM private key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path} is not an ECDSA private key")
    return key


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path} does not exist") from None
    except OSError as err:
        raise PkiError(f"cannot read {path}: {err.strerror}") from err


# --- files ----------------------------------------------------------------------------------------------


def _private_output(path: Path, key: ec.EllipticCurvePrivateKey) -> _Output:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return _Output(path, pem, PRIVATE_MODE)


def _cert_output(path: Path, cert: x509.Certificate) -> _Output:
    return _Output(path, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)


def _refuse_existing(paths: Sequence[Path], *, force: bool) -> None:
    if force:
        return
    for path in paths:
        # lexists-style: a dangling symlink is in the way too, and writing through it is never wanted.
        if path.exists() or path.is_symlink():
            raise PkiError(f"{path} exists; pass --force to replace it")


def _write_all(outputs: Sequence[_Output], *, force: bool) -> None:
    # Checked again right before writing: generating and signing keys takes time another process could use.
    _refuse_existing([out.path for out in outputs], force=force)
    made: list[Path] = []  # folders this call created, outermost first
    written: list[Path] = []
    try:
        for out in outputs:
            made += _make_folder(out.path.parent)
            _write_one(out, force=force)
            written.append(out.path)
    except BaseException:
        # Without force every file written here is new, so removing them restores the state we found.
        if not force:
            for path in written:
                path.unlink(missing_ok=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):  # not empty: something else is in it now, keep it
                folder.rmdir()
        raise


def _check_can_create(folder: Path) -> None:
    """Refuse (PkiError) a folder that cannot be made or written: checked before anything is written."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PkiError(f"cannot create folder {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PkiError(f"cannot create files in {folder}: {existing} is not writable")


def _make_folder(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; return the ones made (outermost first), for a rollback."""
    missing = []
    parent = folder
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    try:
        # 0700 because every folder made here receives a private key; existing folders are left as they are.
        folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    except OSError as err:
        raise PkiError(f"cannot create folder {folder}: {err.strerror}") from err
    return list(reversed(missing))


def _write_one(out: _Output, *, force: bool) -> None:
    if not force:
        _create(out.path, out)
        return
    # Replacing goes through a fresh file and a rename, so readers see the old or the new file, never half.
    tmp = out.path.with_name(f".{out.path.name}.{secrets.token_hex(6)}.tmp")
    _create(tmp, out)
    try:
        os.replace(tmp, out.path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise PkiError(f"cannot replace {out.path}: {err.strerror}") from err


def _create(path: Path, out: _Output) -> None:
    try:
        # O_EXCL: fail rather than follow a symlink or reuse a file someone else made readable.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, out.mode)
    except FileExistsError:
        raise PkiError(f"{out.path} exists; pass --force to replace it") from None
    except OSError as err:
        raise PkiError(f"cannot write {out.path}: {err.strerror}") from err
    try:
        with os.fdopen(fd, "wb") as fh:
            # The umask may have cleared bits of a public file's mode; a private one cannot gain any.
            os.fchmod(fh.fileno(), out.mode)
            fh.write(out.data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        path.unlink(missing_ok=True)
        raise PkiError(f"cannot write {out.path}: {err.strerror}") from err
    except BaseException:
        path.unlink(missing_ok=True)
        raise
