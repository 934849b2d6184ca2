"""Certificates and keys: real keys, real files, real TLS handshakes over loopback sockets."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
import ssl
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from deploy.pki import (
    BACKDATE,
    CaFiles,
    NodeKeys,
    PkiError,
    ServerFiles,
    certificate_fingerprint,
    create_ca,
    create_node_keys,
    create_server_cert,
    load_node_public_key,
    peer_fingerprint,
    pinned_fingerprint,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
HOSTS = ["127.0.0.1", "localhost"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _esc(path: Path | str) -> str:
    return re.escape(str(path))


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def ca(tmp_path: Path) -> CaFiles:
    return create_ca(tmp_path / "ca", now=NOW)


@pytest.fixture
def server(ca: CaFiles, tmp_path: Path) -> ServerFiles:
    return create_server_cert(ca, tmp_path / "server", HOSTS, now=NOW)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    # The widest umask: any private file that is not 0600 now was created with a wider mode.
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# --- file handling ------------------------------------------------------------------------------------------


def test_private_keys_are_owner_only_and_public_files_world_readable(tmp_path: Path, umask_zero: None) -> None:
    ca = create_ca(tmp_path / "pki" / "ca", now=NOW)
    server = create_server_cert(ca, tmp_path / "pki" / "server", HOSTS, now=NOW)
    node = create_node_keys(tmp_path / "pki" / "node")
    assert [_mode(p) for p in (ca.key, server.key, node.private)] == [0o600] * 3
    assert [_mode(p) for p in (ca.cert, server.cert, node.public)] == [0o644] * 3
    assert [_mode(p.parent) for p in (ca.key, server.key, node.private)] == [0o700] * 3


def test_public_files_are_0644_even_under_a_strict_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        ca = create_ca(tmp_path, now=NOW)
    finally:
        os.umask(old)
    assert (_mode(ca.cert), _mode(ca.key)) == (0o644, 0o600)


def test_files_land_where_the_result_says(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca", now=NOW)
    server = create_server_cert(ca, tmp_path / "srv", HOSTS, now=NOW)
    node = create_node_keys(tmp_path / "node")
    assert ca == CaFiles(tmp_path / "ca" / "ca.crt", tmp_path / "ca" / "ca.key")
    assert server == ServerFiles(tmp_path / "srv" / "server.pem", tmp_path / "srv" / "server.key")
    assert node == NodeKeys(tmp_path / "node" / "node.key", tmp_path / "node" / "node.key.pub")
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["ca", "ca.crt", "ca.key", "srv", "server.pem", "server.key", "node", "node.key", "node.key.pub"]
    )


Creator = Callable[[Path, bool], tuple[Path, Path]]


def _make_ca(folder: Path, force: bool) -> tuple[Path, Path]:
    files = create_ca(folder, now=NOW, force=force)
    return files.cert, files.key


def _make_server(folder: Path, force: bool) -> tuple[Path, Path]:
    ca = CaFiles.in_folder(folder.parent / "the-ca")
    if not ca.cert.exists():
        create_ca(ca.cert.parent, now=NOW)
    files = create_server_cert(ca, folder, HOSTS, now=NOW, force=force)
    return files.cert, files.key


def _make_node(folder: Path, force: bool) -> tuple[Path, Path]:
    files = create_node_keys(folder, force=force)
    return files.public, files.private


@pytest.mark.parametrize("existing", [0, 1], ids=["public-file-exists", "private-file-exists"])
@pytest.mark.parametrize("create", [_make_ca, _make_server, _make_node], ids=["ca", "server", "node"])
def test_refusal_writes_nothing_and_names_the_file(tmp_path: Path, create: Creator, existing: int) -> None:
    folder = tmp_path / "out"
    outputs = create(folder, False)
    blocker = outputs[existing]
    other = outputs[1 - existing]
    other.unlink()
    blocker.write_bytes(b"keep me")

    with pytest.raises(PkiError, match=rf"^{_esc(blocker)} exists; pass --force to replace it$"):
        create(folder, False)
    assert blocker.read_bytes() == b"keep me"
    assert not other.exists()
    assert sorted(folder.iterdir()) == [blocker]  # no temporary files left behind either


@pytest.mark.parametrize("create", [_make_ca, _make_server, _make_node], ids=["ca", "server", "node"])
def test_force_replaces_both_files_with_the_right_modes(tmp_path: Path, create: Creator) -> None:
    folder = tmp_path / "out"
    first = create(folder, False)
    before = [p.read_bytes() for p in first]
    os.chmod(first[1], 0o644)  # a loosened old key must not pass its mode on
    second = create(folder, True)
    assert second == first
    assert all(p.read_bytes() != old for p, old in zip(second, before, strict=True))
    assert (_mode(second[0]), _mode(second[1])) == (0o644, 0o600)
    assert sorted(folder.iterdir()) == sorted(second)


def test_a_dangling_symlink_counts_as_existing(tmp_path: Path) -> None:
    tmp_path.joinpath("ca.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PkiError, match=r"ca\.key exists"):
        create_ca(tmp_path, now=NOW)
    assert not (tmp_path / "elsewhere").exists()
    assert not (tmp_path / "ca.crt").exists()


def test_a_file_where_the_folder_should_be_is_reported(tmp_path: Path) -> None:
    (tmp_path / "ca").write_text("not a folder")
    with pytest.raises(PkiError, match=rf"^cannot create folder {_esc(tmp_path / 'ca')}: "):
        create_ca(tmp_path / "ca", now=NOW)


def test_an_existing_folder_keeps_its_mode(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    create_node_keys(folder)
    assert _mode(folder) == 0o755


# --- the CA -------------------------------------------------------------------------------------------------


def test_ca_is_a_self_signed_p256_ca_valid_from_now(ca: CaFiles) -> None:
    cert = _cert(ca.cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert cert.subject.rfc4514_string() == "CN=fedlocale CA" == cert.issuer.rfc4514_string()
    cert.verify_directly_issued_by(cert)
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)
    assert cert.not_valid_before_utc == NOW - BACKDATE
    assert cert.not_valid_after_utc == NOW + timedelta(days=3650)
    assert ca.key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")


def test_validity_is_in_utc_whole_seconds(tmp_path: Path) -> None:
    plus_two = timezone(timedelta(hours=2))
    ca = create_ca(tmp_path, now=datetime(2026, 1, 1, 2, 0, 0, 999_999, tzinfo=plus_two), days=10, common_name="x")
    cert = _cert(ca.cert)
    assert cert.not_valid_before_utc == NOW - BACKDATE
    assert cert.not_valid_after_utc == NOW + timedelta(days=10)
    assert cert.subject.rfc4514_string() == "CN=x"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"now": datetime(2026, 1, 1)}, "timezone-aware"),  # naive on purpose
        ({"now": NOW, "days": 0}, "days must be at least 1"),
        ({"now": NOW, "common_name": ""}, "invalid common name"),
    ],
)
def test_bad_ca_arguments_are_rejected_before_writing(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(PkiError, match=message):
        create_ca(tmp_path / "ca", **kwargs)
    assert not (tmp_path / "ca").exists()


# --- the server certificate -----------------------------------------------------------------------------------


def test_server_cert_is_signed_by_the_ca_and_carries_the_sans(ca: CaFiles, server: ServerFiles) -> None:
    ca_cert, cert = _cert(ca.cert), _cert(server.cert)
    cert.verify_directly_issued_by(ca_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_before_utc == NOW - BACKDATE
    assert cert.not_valid_after_utc == NOW + timedelta(days=825)


@pytest.mark.parametrize(
    "name", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], ids=["dns", "ip"]
)
def test_server_cert_passes_path_validation_for_each_san(
    ca: CaFiles, server: ServerFiles, name: x509.DNSName | x509.IPAddress
) -> None:
    verifier = PolicyBuilder().store(Store([_cert(ca.cert)])).time(NOW).build_server_verifier(name)
    chain = verifier.verify(_cert(server.cert), [])
    assert chain[-1] == _cert(ca.cert)


def test_path_validation_rejects_other_names_and_other_cas(ca: CaFiles, server: ServerFiles, tmp_path: Path) -> None:
    store = Store([_cert(ca.cert)])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).time(NOW).build_server_verifier(x509.DNSName("example.org")).verify(
            _cert(server.cert), []
        )
    other = create_ca(tmp_path / "other", now=NOW)
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([_cert(other.cert)])).time(NOW).build_server_verifier(
            x509.DNSName("localhost")
        ).verify(_cert(server.cert), [])


def test_ipv6_and_duplicate_hosts(ca: CaFiles, tmp_path: Path) -> None:
    server = create_server_cert(ca, tmp_path / "s", ["::1", "Link.Example.org", "::1", "10.0.0.7"], now=NOW)
    san = _cert(server.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = [ipaddress.ip_address("::1"), ipaddress.ip_address("10.0.0.7")]
    assert san.get_values_for_type(x509.IPAddress) == ips
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org"]


@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        ([], "no hosts given"),
        ("localhost", "must be a list of names, not the string 'localhost'"),
        (["localhost", "bad host"], "'bad host' is neither an IP address nor a DNS name"),
        (["münchen.example"], "xn--"),
        ([""], "'' is neither"),
        (["-lead.example"], "neither"),
    ],
)
def test_bad_hosts_are_rejected_before_writing(ca: CaFiles, tmp_path: Path, hosts: list[str], message: str) -> None:
    with pytest.raises(PkiError, match=message):
        create_server_cert(ca, tmp_path / "s", hosts, now=NOW)
    assert not (tmp_path / "s").exists()


def test_server_cert_never_outlives_its_ca(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca", now=NOW, days=30)
    server = create_server_cert(ca, tmp_path / "s", HOSTS, now=NOW + timedelta(days=1))
    assert _cert(server.cert).not_valid_after_utc == NOW + timedelta(days=30)


def test_an_expired_ca_is_refused(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca", now=NOW, days=30)
    with pytest.raises(PkiError, match=r"ca\.crt is not valid at 2026-03-01"):
        create_server_cert(ca, tmp_path / "s", HOSTS, now=datetime(2026, 3, 1, tzinfo=UTC))
    assert not (tmp_path / "s").exists()


def test_a_mismatched_or_missing_ca_is_named(ca: CaFiles, tmp_path: Path) -> None:
    other = create_ca(tmp_path / "other", now=NOW)
    with pytest.raises(PkiError, match=rf"^{_esc(other.key)} is not the key of {_esc(ca.cert)}$"):
        create_server_cert(CaFiles(ca.cert, other.key), tmp_path / "s", HOSTS, now=NOW)
    with pytest.raises(PkiError, match=rf"^{_esc(tmp_path / 'nope.crt')} does not exist$"):
        create_server_cert(CaFiles(tmp_path / "nope.crt", ca.key), tmp_path / "s", HOSTS, now=NOW)
    with pytest.raises(PkiError, match=rf"^{_esc(ca.cert)} is not an unencrypted PEM private key"):
        create_server_cert(CaFiles(ca.cert, ca.cert), tmp_path / "s", HOSTS, now=NOW)
    assert not (tmp_path / "s").exists()


def test_a_server_cert_cannot_act_as_a_ca(server: ServerFiles, tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=rf"^{_esc(server.cert)} is not a CA certificate$"):
        create_server_cert(CaFiles(server.cert, server.key), tmp_path / "s", HOSTS, now=NOW)


# --- real TLS -----------------------------------------------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path) -> tuple[CaFiles, ServerFiles]:
    # Handshakes check validity against the real clock, so these certificates start now, not at NOW.
    now = datetime.now(UTC)
    ca = create_ca(tmp_path / "ca", now=now)
    return ca, create_server_cert(ca, tmp_path / "server", HOSTS, now=now)


def _handshake(server: ServerFiles, cafile: Path, server_hostname: str) -> str | None:
    """Serve one TLS connection on 127.0.0.1 in a thread, connect as a verifying client; return the version."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server.cert, server.key)
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default; hold the files to it now
    server_errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(10)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(5))
            except OSError as err:  # the client's rejection reaches the server as an alert
                server_errors.append(err)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                tls.sendall(b"hello")
                assert tls.recv(5) == b"hello"
                version = tls.version()
        finally:
            thread.join(10)
    assert not server_errors
    return version


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_tls_handshake_succeeds_against_the_ca(live: tuple[CaFiles, ServerFiles], hostname: str) -> None:
    ca, server = live
    assert _handshake(server, ca.cert, hostname) in {"TLSv1.2", "TLSv1.3"}


def test_tls_handshake_fails_against_another_ca(live: tuple[CaFiles, ServerFiles], tmp_path: Path) -> None:
    other = create_ca(tmp_path / "other", now=datetime.now(UTC))
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate"):
        _handshake(live[1], other.cert, "localhost")


@pytest.mark.parametrize("hostname", ["example.org", "127.0.0.2"])
def test_tls_handshake_fails_for_a_name_not_in_the_sans(live: tuple[CaFiles, ServerFiles], hostname: str) -> None:
    ca, server = live
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(server, ca.cert, hostname)


@pytest.mark.parametrize(("target", "trusted"), [("localhost", True), ("127.0.0.1", True), ("localhost", False)])
def test_grpc_channel_becomes_ready_only_with_the_right_ca(
    live: tuple[CaFiles, ServerFiles], tmp_path: Path, target: str, trusted: bool
) -> None:
    # Flower's SuperLink serves gRPC with exactly these credentials (flwr.supercore.grpc).
    import grpc

    ca, server = live
    roots = ca.cert if trusted else create_ca(tmp_path / "other", now=datetime.now(UTC)).cert
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=1))
    credentials = grpc.ssl_server_credentials(
        ((server.key.read_bytes(), server.cert.read_bytes()),),
        root_certificates=ca.cert.read_bytes(),
        require_client_auth=False,
    )
    port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    grpc_server.start()
    channel = grpc.secure_channel(f"{target}:{port}", grpc.ssl_channel_credentials(roots.read_bytes()))
    try:
        ready = grpc.channel_ready_future(channel)
        if trusted:
            ready.result(timeout=20)
        else:
            with pytest.raises(grpc.FutureTimeoutError):
                ready.result(timeout=2)
    finally:
        channel.close()
        grpc_server.stop(None)


# --- node keys ----------------------------------------------------------------------------------------------


def test_node_keys_are_openssh_p256_and_match(tmp_path: Path) -> None:
    node = create_node_keys(tmp_path)
    private = serialization.load_ssh_private_key(node.private.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1)
    assert node.private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    text = node.public.read_text()
    assert text.startswith("ecdsa-sha2-nistp256 AAAA") and text.endswith("\n") and text.count("\n") == 1
    ssh = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert text.strip().encode() == private.public_key().public_bytes(*ssh)
    assert load_node_public_key(node.public).public_bytes(*ssh) == private.public_key().public_bytes(*ssh)


def test_each_node_gets_its_own_key(tmp_path: Path) -> None:
    keys = [create_node_keys(tmp_path / name).public.read_text() for name in ("de", "fr")]
    assert keys[0] != keys[1]


def test_flower_register_accepts_the_public_key(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    node = create_node_keys(tmp_path)
    assert try_load_public_key(node.public)


def test_load_node_public_key_names_the_bad_file(tmp_path: Path) -> None:
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    ed_file = tmp_path / "ed.pub"
    ed_file.write_bytes(ed.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(PkiError, match=rf"^{_esc(ed_file)} is not an ECDSA key"):
        load_node_public_key(ed_file)
    junk = tmp_path / "junk.pub"
    junk.write_text("hello\n")
    with pytest.raises(PkiError, match=rf"^{_esc(junk)} is not an OpenSSH public key"):
        load_node_public_key(junk)
    with pytest.raises(PkiError, match=rf"^{_esc(tmp_path / 'missing.pub')} does not exist$"):
        load_node_public_key(tmp_path / "missing.pub")


# --- fingerprints -------------------------------------------------------------------------------------------


def test_fingerprint_is_sha256_of_the_der(ca: CaFiles, server: ServerFiles) -> None:
    der = _cert(server.cert).public_bytes(serialization.Encoding.DER)
    fingerprint = certificate_fingerprint(server.cert)
    assert fingerprint == hashlib.sha256(der).hexdigest() == certificate_fingerprint(str(server.cert))
    assert len(fingerprint) == 64 and fingerprint == fingerprint.lower()
    assert certificate_fingerprint(ca.cert) != fingerprint


def test_fingerprint_of_a_non_certificate_names_the_file(server: ServerFiles) -> None:
    with pytest.raises(PkiError, match=rf"^{_esc(server.key)} is not a PEM certificate"):
        certificate_fingerprint(server.key)


# --- the SuperLink as it presents itself ----------------------------------------------------------------------


@contextmanager
def tls_server(server: ServerFiles, host: str = "127.0.0.1") -> Iterator[int]:
    """A real TLS server presenting ``server``'s certificate on ``host``, answering handshakes until the block
    ends; yields its port. Connections the client rejects are simply dropped, as a SuperLink would."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server.cert, server.key)
    stop = threading.Event()
    with socket.create_server((host, 0)) as listener:
        listener.settimeout(0.2)

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                conn.settimeout(10)
                try:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)  # until the client closes
                except OSError:
                    conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield listener.getsockname()[1]
        finally:
            stop.set()
            thread.join(10)


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_peer_fingerprint_is_the_certificate_the_server_presents(
    live: tuple[CaFiles, ServerFiles], hostname: str
) -> None:
    ca, server = live
    with tls_server(server) as port:
        seen = peer_fingerprint(hostname, port, ca.cert, timeout=10)
    der = _cert(server.cert).public_bytes(serialization.Encoding.DER)
    assert seen == "sha256:" + hashlib.sha256(der).hexdigest() == pinned_fingerprint(server.cert)


def test_peer_fingerprint_tells_apart_two_certificates_of_the_same_ca(
    live: tuple[CaFiles, ServerFiles], tmp_path: Path
) -> None:
    # the CA vouches for both; only the pin tells the real SuperLink from another holder of a CA-signed cert
    ca, server = live
    impostor = create_server_cert(ca, tmp_path / "impostor", HOSTS, now=datetime.now(UTC))
    with tls_server(impostor) as port:
        seen = peer_fingerprint("localhost", port, ca.cert)
    assert seen == pinned_fingerprint(impostor.cert) != pinned_fingerprint(server.cert)


def test_peer_fingerprint_verifies_the_chain_and_the_name(live: tuple[CaFiles, ServerFiles], tmp_path: Path) -> None:
    ca, server = live
    other = create_ca(tmp_path / "other", now=datetime.now(UTC))
    not_trusted = rf"^localhost:\d+: certificate not trusted with {_esc(other.cert)}: unable to get local issuer"
    with tls_server(server) as port, pytest.raises(PkiError, match=not_trusted):
        peer_fingerprint("localhost", port, other.cert)
    # the right CA, but the certificate is not issued for the name dialled
    with tls_server(server, host="127.0.0.2") as port, pytest.raises(PkiError, match=r"^127.0.0.2:\d+: .*mismatch"):
        peer_fingerprint("127.0.0.2", port, ca.cert)


def test_peer_fingerprint_names_what_cannot_be_reached(live: tuple[CaFiles, ServerFiles], tmp_path: Path) -> None:
    ca, _ = live
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    with pytest.raises(PkiError, match=rf"^127.0.0.1:{port}: cannot connect"):
        peer_fingerprint("127.0.0.1", port, ca.cert, timeout=5)
    with pytest.raises(PkiError, match=rf"^{_esc(tmp_path / 'missing.crt')} does not exist$"):
        peer_fingerprint("127.0.0.1", port, tmp_path / "missing.crt")
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never speaks TLS
    with silent, pytest.raises(PkiError, match=rf"^127.0.0.1:{silent.getsockname()[1]}: TLS handshake failed: .*timed"):
        peer_fingerprint("127.0.0.1", silent.getsockname()[1], ca.cert, timeout=1)
