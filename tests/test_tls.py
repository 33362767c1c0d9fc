"""TLS material: certificates parse, carry their SANs, chain to the CA, and work in a real
handshake on loopback (and fail against a CA the client does not trust)."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from comms.errors import ConfigError
from comms.tls import (
    CertificateAuthority,
    client_ssl_context,
    issue_cert,
    load_pair,
    make_ca,
    make_self_signed,
    read_pem,
    save_pair,
    server_ssl_context,
    subject_alt_names,
)

TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return make_ca()


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    return make_ca("Some other CA")


@pytest.fixture(scope="module")
def server_pair(ca) -> tuple[bytes, bytes]:
    return issue_cert(ca, ["127.0.0.1", "localhost", "aggregator.example"])


def _sans(cert: x509.Certificate) -> tuple[set, set]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), set(san.get_values_for_type(x509.IPAddress))


def test_issued_cert_parses_has_sans_and_chains_to_ca(ca, server_pair):
    cert = x509.load_pem_x509_certificate(server_pair[0])
    dns, ips = _sans(cert)
    assert dns == {"localhost", "aggregator.example"}
    assert ips == {ipaddress.ip_address("127.0.0.1")}
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert cert.issuer == ca_cert.subject
    cert.verify_directly_issued_by(ca_cert)  # raises if the signature does not verify
    # A CA with the same name but another key did not sign it.
    imposter = x509.load_pem_x509_certificate(make_ca().cert_pem)
    assert imposter.subject == ca_cert.subject
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(imposter)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in usage
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_ca_is_a_ca_and_self_signed(ca):
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(cert)


def test_self_signed_cert_has_sans_and_verifies_itself():
    cert_pem, key_pem = make_self_signed("island-7", hosts=["10.0.0.7", "island-7.lan"], days=3)
    cert = x509.load_pem_x509_certificate(cert_pem)
    dns, ips = _sans(cert)
    assert dns == {"island-7.lan"}
    assert ips == {ipaddress.ip_address("10.0.0.7")}
    cert.verify_directly_issued_by(cert)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 3 * 86400 <= lifetime.total_seconds() <= 3 * 86400 + 3600
    assert b"PRIVATE KEY" in key_pem


def test_bad_hosts_and_days_are_config_errors(ca):
    with pytest.raises(ConfigError, match="non-empty"):
        issue_cert(ca, [])
    with pytest.raises(ConfigError, match="non-empty"):
        make_self_signed("x", hosts="localhost")  # a bare str, not a list
    with pytest.raises(ConfigError, match="neither an IP"):
        subject_alt_names(["bad host"])
    with pytest.raises(ConfigError, match="days"):
        make_self_signed("x", days=0)


def test_files_round_trip_with_private_key_0600(tmp_path, ca, server_pair):
    cert_path, key_path = tmp_path / "tls" / "node.crt", tmp_path / "tls" / "node.key"
    save_pair(cert_path, key_path, *server_pair)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert load_pair(cert_path, key_path) == server_pair
    # Overwriting a key that was world-readable leaves it 0600.
    key_path.chmod(0o644)
    save_pair(cert_path, key_path, *server_pair)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600

    ca.save(tmp_path / "ca.crt", tmp_path / "ca.key")
    assert CertificateAuthority.load(tmp_path / "ca.crt", tmp_path / "ca.key") == ca
    with pytest.raises(ConfigError, match="not a CA"):
        CertificateAuthority.load(cert_path, key_path)


def test_file_errors_name_the_file(tmp_path, server_pair):
    with pytest.raises(ConfigError, match=r"missing\.pem"):
        read_pem(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not pem at all")
    with pytest.raises(ConfigError, match=r"junk\.pem"):
        read_pem(junk)
    _, other_key = make_self_signed("other")
    save_pair(tmp_path / "a.crt", tmp_path / "a.key", server_pair[0], other_key)
    with pytest.raises(ConfigError, match="does not match"):
        load_pair(tmp_path / "a.crt", tmp_path / "a.key")


def test_private_key_readable_by_others_is_refused(tmp_path, server_pair, monkeypatch):
    cert_path, key_path = tmp_path / "node.crt", tmp_path / "node.key"
    save_pair(cert_path, key_path, *server_pair)
    key_path.chmod(0o644)
    with pytest.raises(ConfigError, match=rf"{key_path} has mode 0644.*chmod 600 {key_path}"):
        load_pair(cert_path, key_path)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_pem(key_path, private=True)
    assert read_pem(cert_path) == server_pair[0]  # a certificate is public: 0644 is fine
    monkeypatch.setenv("ARCHIPELAGO_ALLOW_OPEN_KEYS", "1")
    assert load_pair(cert_path, key_path) == server_pair


# ---------------------------------------------------------------- real handshakes on loopback


class OneShotServer:
    """A TLS server on 127.0.0.1 port 0 that accepts one connection and answers b"ok"."""

    def __init__(self, context: ssl.SSLContext):
        self.context = context
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(TIMEOUT_S)
        self.port = self.sock.getsockname()[1]
        self.error: BaseException | None = None
        self.peer_cert: dict | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            conn.settimeout(TIMEOUT_S)
            with self.context.wrap_socket(conn, server_side=True) as tls:
                self.peer_cert = tls.getpeercert()
                tls.sendall(b"ok")
                tls.recv(1)  # wait for the client to close
        except (OSError, ssl.SSLError) as e:
            self.error = e
        finally:
            self.sock.close()

    def join(self) -> None:
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive()


def _talk(port: int, context: ssl.SSLContext, server_hostname: str) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        return tls.recv(2)


@pytest.mark.parametrize("server_hostname", ["127.0.0.1", "localhost"])
def test_handshake_with_ca_issued_cert(ca, server_pair, server_hostname):
    server = OneShotServer(server_ssl_context(*server_pair))
    assert _talk(server.port, client_ssl_context(ca.cert_pem), server_hostname) == b"ok"
    server.join()
    assert server.error is None


def test_handshake_fails_when_client_trusts_another_ca(server_pair, other_ca):
    server = OneShotServer(server_ssl_context(*server_pair))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _talk(server.port, client_ssl_context(other_ca.cert_pem), "localhost")
    server.join()
    assert isinstance(server.error, (ssl.SSLError, OSError))


def test_handshake_fails_for_a_host_not_in_the_sans(ca, server_pair):
    server = OneShotServer(server_ssl_context(*server_pair))
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _talk(server.port, client_ssl_context(ca.cert_pem), "elsewhere.example")
    server.join()


def test_handshake_with_self_signed_cert():
    cert_pem, key_pem = make_self_signed("solo")
    server = OneShotServer(server_ssl_context(cert_pem, key_pem))
    assert _talk(server.port, client_ssl_context(cert_pem), "127.0.0.1") == b"ok"
    server.join()
    assert server.error is None


def test_mutual_tls_accepts_a_client_of_the_ca(ca, server_pair):
    server = OneShotServer(server_ssl_context(*server_pair, client_ca_pem=ca.cert_pem))
    client_cert, client_key = issue_cert(ca, ["island-3"], common_name="island-3")
    client = client_ssl_context(ca.cert_pem, client_cert, client_key)
    assert _talk(server.port, client, "localhost") == b"ok"
    server.join()
    assert server.error is None
    subject = dict(item for rdn in server.peer_cert["subject"] for item in rdn)
    assert subject["commonName"] == "island-3"


@pytest.mark.parametrize("client_cert_from", ["other_ca", "none"])
def test_mutual_tls_refuses_unknown_or_missing_client_cert(
    ca, other_ca, server_pair, client_cert_from
):
    server = OneShotServer(server_ssl_context(*server_pair, client_ca_pem=ca.cert_pem))
    if client_cert_from == "other_ca":
        client = client_ssl_context(ca.cert_pem, *issue_cert(other_ca, ["island-x"]))
    else:
        client = client_ssl_context(ca.cert_pem)
    # With TLS 1.3 the client may finish its side of the handshake before the server refuses
    # its certificate; the refusal then surfaces on the first read.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        data = _talk(server.port, client, "localhost")
        if data != b"ok":
            raise ConnectionError(f"server closed the connection ({data!r})")
    server.join()
    assert isinstance(server.error, ssl.SSLError)
