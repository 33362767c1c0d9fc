"""TLS material for the gRPC and HTTP links: a federation CA, certificates it issues, PEM files.

A federation runs mutual TLS with one CA: ``make_ca()`` once, then ``issue_cert(ca, hosts)``
for every daemon; each certificate is valid for both server and client authentication, so the
same pair serves gRPC ingress and authenticates outgoing pushes. ``make_self_signed`` is for a
single host that needs encryption but no federation (its certificate is its own trust anchor).

Keys are ECDSA P-256: every TLS stack (OpenSSL, BoringSSL in gRPC) supports them. Private keys
are written unencrypted and readable by their owner only (mode 0600); certificates are public.
TLS authenticates hosts; who may send updates is decided separately by the Ed25519 roster
(``comms.identity``) over the envelopes themselves.

Pure functions plus small file helpers; no shared state.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from comms.errors import ConfigError, LinkError
from comms.identity import read_private_key_file

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates are valid from a little in the past


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    def save(self, cert_path: str | os.PathLike, key_path: str | os.PathLike) -> None:
        save_pair(cert_path, key_path, self.cert_pem, self.key_pem)

    @classmethod
    def load(
        cls, cert_path: str | os.PathLike, key_path: str | os.PathLike
    ) -> CertificateAuthority:
        cert_pem, key_pem = load_pair(cert_path, key_path)
        cert = x509.load_pem_x509_certificate(cert_pem)
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ConfigError(f"{cert_path} is not a CA certificate (basicConstraints CA:FALSE)")
        return cls(cert_pem, key_pem)


# ---------------------------------------------------------------- building certificates


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Archipelago"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def subject_alt_names(hosts: list[str] | tuple[str, ...]) -> x509.SubjectAlternativeName:
    """IP addresses become IP SANs, anything else a DNS SAN; ``ConfigError`` if unusable."""
    if isinstance(hosts, str) or not hosts:
        raise ConfigError(f"hosts must be a non-empty list of names or addresses, got {hosts!r}")
    names: list[x509.GeneralName] = []
    for host in hosts:
        if not isinstance(host, str) or not host:
            raise ConfigError(f"hosts: every entry must be a non-empty str, got {host!r}")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not host.isascii() or any(c.isspace() for c in host):
            raise ConfigError(
                f"hosts: {host!r} is neither an IP address nor an ASCII DNS name "
                "(use the punycode form of internationalized names)"
            )
        names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    if days < 1:
        raise ConfigError(f"days must be at least 1, got {days}")
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))


def _leaf_extensions(
    builder: x509.CertificateBuilder, sans: x509.SubjectAlternativeName, public_key
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(sans, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def make_ca(
    common_name: str = "Archipelago federation CA", days: int = 3650
) -> CertificateAuthority:
    """A new CA (self-signed, may sign leaf certificates only)."""
    key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = _validity(builder, days).sign(key, hashes.SHA256())
    return CertificateAuthority(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_cert(
    ca: CertificateAuthority,
    hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS,
    common_name: str | None = None,
    days: int = 365,
) -> tuple[bytes, bytes]:
    """``(cert_pem, key_pem)`` for ``hosts``, signed by ``ca``, for server and client auth."""
    sans = subject_alt_names(hosts)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name or hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    builder = _leaf_extensions(_validity(builder, days), sans, key.public_key())
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make_self_signed(
    common_name: str, hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS, days: int = 365
) -> tuple[bytes, bytes]:
    """``(cert_pem, key_pem)`` of a self-signed certificate for ``hosts``.

    Clients trust it by using the certificate itself as their CA file.
    """
    sans = subject_alt_names(hosts)
    key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
    )
    builder = _leaf_extensions(_validity(builder, days), sans, key.public_key())
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


# ---------------------------------------------------------------- files


def write_pem(path: str | os.PathLike, data: bytes, *, private: bool) -> None:
    """Write PEM atomically; a private key gets mode 0600 from the moment it exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply when the file already existed
    os.replace(tmp, path)


def read_pem(path: str | os.PathLike, *, private: bool = False) -> bytes:
    """The bytes of a PEM file; ``ConfigError`` naming the file if unreadable or not PEM.
    A ``private`` key file is also refused if group or others may read it
    (``comms.identity.read_private_key_file``)."""
    if private:
        data = read_private_key_file(path)
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{path} is not a PEM file")
    return data


def save_pair(
    cert_path: str | os.PathLike, key_path: str | os.PathLike, cert_pem: bytes, key_pem: bytes
) -> None:
    """Write a certificate (0644) and its private key (0600)."""
    write_pem(key_path, key_pem, private=True)
    write_pem(cert_path, cert_pem, private=False)


def load_pair(cert_path: str | os.PathLike, key_path: str | os.PathLike) -> tuple[bytes, bytes]:
    """Read a certificate and its key and check that they belong together."""
    cert_pem, key_pem = read_pem(cert_path), read_pem(key_path, private=True)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise ConfigError(f"{cert_path} does not hold a PEM certificate: {e}") from e
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key_path} is not an unencrypted PEM private key") from e
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ConfigError(f"the key in {key_path} does not match the certificate in {cert_path}")
    return cert_pem, key_pem


# ---------------------------------------------------------------- ssl contexts (aiohttp, tests)


def _load_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    # ssl only loads a chain from files: stage them in a private temporary directory.
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        save_pair(cert_file, key_file, cert_pem, key_pem)
        context.load_cert_chain(cert_file, key_file)


def server_ssl_context(
    cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None = None
) -> ssl.SSLContext:
    """A TLS server context; with ``client_ca_pem`` clients must present a cert it signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert_pem, key_pem)
    if client_ca_pem is not None:
        context.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_ssl_context(
    ca_pem: bytes, cert_pem: bytes | None = None, key_pem: bytes | None = None
) -> ssl.SSLContext:
    """A TLS client context trusting only ``ca_pem``; presents ``cert_pem`` for mutual TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    if cert_pem is not None and key_pem is not None:
        _load_chain(context, cert_pem, key_pem)
    return context


# ---------------------------------------------------------------- the [tls] config section


class TLSMismatchError(LinkError):
    """The two ends of a gRPC link disagree about TLS: a plaintext client at a TLS server,
    TLS at a plaintext server, or a certificate one side does not accept. The message says
    which, and what to set."""


@dataclass
class TLSConfig:
    """The ``[tls]`` section of an aggregator's or island's config. Empty: plaintext.

    ``cert`` and ``key``: this daemon's certificate and private key (mode 0600); an
    aggregator serves gRPC with them, and any daemon presents them as its client certificate
    when it dials. ``ca``: the federation CA, which verifies the server this daemon dials
    and, with ``mutual``, the client certificates of those who dial it. ``mutual``: require a
    CA-signed client certificate from every client (and present one when dialing).
    ``server_name``: the name to verify in the server's certificate when the address dialled
    is not one of its names (e.g. dialing by an IP address missing from its SANs). ``http``:
    with ``cert``, the daemon's HTTP endpoints (``/status``, ``/metrics``) are served over
    HTTPS with the same certificate (``comms.http.https_context``); ``false`` leaves them plain
    HTTP. Paths are relative to the working directory, as ``key`` and ``roster`` are.
    """

    cert: str = ""
    key: str = ""
    ca: str = ""
    mutual: bool = False
    server_name: str = ""
    http: bool = True  # with cert: the HTTP endpoints are HTTPS too (false: plain HTTP)

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.ca or self.mutual or self.server_name)

    def describe(self) -> str:
        """``tls=on (mutual)``, ``tls=on`` or ``tls=off``: the line every daemon logs."""
        if not self.enabled:
            return "tls=off"
        return "tls=on (mutual)" if self.mutual else "tls=on"

    def validate(self) -> None:
        if self.key and not self.cert:
            raise ConfigError("key: a TLS key without its certificate; set cert too")
        if self.cert and not self.key:
            raise ConfigError("cert: a TLS certificate without its private key; set key too")
        if self.mutual and not self.ca:
            raise ConfigError(
                "mutual: needs ca, the CA that signs the client certificates to accept"
            )
        if self.mutual and not self.cert:
            raise ConfigError(
                "mutual: needs cert and key, this daemon's certificate to present when it dials"
            )
        if self.server_name and not self.ca:
            raise ConfigError("server_name: only used to verify a server; set ca too")
        if self.cert:
            cert_pem, _ = load_pair(self.cert, self.key)  # files, PEM, key mode 0600, match
        if self.ca:
            ca_pem = read_pem(self.ca)
            try:
                ca_cert = x509.load_pem_x509_certificate(ca_pem)
            except ValueError as e:
                raise ConfigError(f"ca: {self.ca} does not hold a PEM certificate: {e}") from e
            if self.mutual:
                cert = x509.load_pem_x509_certificate(cert_pem)
                try:
                    cert.verify_directly_issued_by(ca_cert)
                except (ValueError, TypeError, InvalidSignature) as e:
                    raise ConfigError(
                        f"cert: {self.cert} is not signed by the CA in {self.ca}, so peers "
                        "of a mutual-TLS federation would refuse it"
                    ) from e

    def require(self, *fields: str, who: str) -> None:
        """With TLS on, refuse a config lacking ``fields`` (``who`` says why they are needed)."""
        if not self.enabled:
            return
        for name in fields:
            if not getattr(self, name):
                raise ConfigError(f"tls.{name}: {who} (or leave [tls] empty for plaintext)")

    def server_tls(self):
        """The ``ServerTLS`` to serve with, or None (plaintext)."""
        from comms.transport.options import ServerTLS

        if not self.cert:
            return None
        cert_pem, key_pem = load_pair(self.cert, self.key)
        return ServerTLS(cert_pem, key_pem, read_pem(self.ca) if self.mutual else None)

    def client_tls(self):
        """The ``ClientTLS`` to dial with (presenting ``cert`` when set), or None."""
        from comms.transport.options import ClientTLS

        if not self.ca:
            return None
        cert_pem = key_pem = None
        if self.cert:
            cert_pem, key_pem = load_pair(self.cert, self.key)
        return ClientTLS(read_pem(self.ca), cert_pem, key_pem, self.server_name or None)


# ---------------------------------------------------------------- what is wrong with a link


def diagnose(address: str, tls=None, timeout: float = 2.0) -> str | None:
    """Why a gRPC connection to ``address`` fails at the TLS layer, or None if it does not.

    Called after a refused connection: one TLS handshake (ALPN ``h2``, as gRPC) with the
    client's own material (``tls``, a ``ClientTLS``; None: a plaintext client, for which the
    probe only asks whether the server speaks TLS). A server that accepts a client sends its
    HTTP/2 settings at once; one that refused the client's certificate closes the connection.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if tls is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    else:
        context = client_ssl_context(tls.ca_pem, tls.cert_pem, tls.key_pem)
    context.set_alpn_protocols(["h2"])
    name = (tls.server_name if tls is not None else None) or host
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout)
    except (OSError, ValueError):
        return None  # not reachable at all: a link problem, not a TLS one
    try:
        with context.wrap_socket(raw, server_hostname=name) as conn:
            conn.settimeout(timeout)
            try:
                refused = not conn.recv(1)  # closed at once: our certificate was refused
            except TimeoutError:
                refused = False  # no verdict: not a TLS problem we can name
            except (ssl.SSLError, OSError):  # an alert, or a reset
                refused = True
    except ssl.SSLCertVerificationError as e:
        return (
            f"the TLS certificate of the server at {address} is not accepted: "
            f"{e.verify_message}; [tls] ca must be the CA that signed it, and the server's "
            f"certificate must name the host dialled ({name}; set [tls] server_name to the "
            "name it carries)"
        )
    except ssl.SSLError as e:
        if tls is None:
            return None
        if "WRONG_VERSION_NUMBER" in str(e) or "RECORD_LAYER" in str(e).upper():
            return (
                f"the server at {address} does not speak TLS (plaintext), but this daemon's "
                "config has a [tls] section: turn TLS on at the server, or leave [tls] empty"
            )
        return f"TLS handshake with {address} failed: {e}"
    except OSError:
        return None
    finally:
        raw.close()
    if tls is None:
        return (
            f"the server at {address} speaks TLS and this daemon dials it in plaintext: set "
            "[tls] ca (and cert and key if the server requires client certificates) in this "
            "daemon's config"
        )
    if refused:
        if tls.cert_pem is None:
            return (
                f"the server at {address} requires a client certificate (mutual TLS): set "
                "[tls] cert and key to a pair signed by the federation CA"
            )
        return (
            f"the server at {address} refused this daemon's client certificate: it must be "
            "signed by the CA the server trusts ([tls] ca at the server)"
        )
    return None


# ---------------------------------------------------------------- a federation's material

CA_CERT_FILE, CA_KEY_FILE = "ca.pem", "ca-key.pem"


def material_paths(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """``(certificate, key)`` paths of daemon ``name`` in a directory ``init_federation`` wrote."""
    return Path(out_dir, f"{name}.pem"), Path(out_dir, f"{name}-key.pem")


def init_federation(
    out_dir: str | os.PathLike,
    daemons: dict[str, list[str]],
    *,
    ca_name: str = "Archipelago federation CA",
    days: int = 365,
    force: bool = False,
) -> bool:
    """Write a CA (``ca.pem``, ``ca-key.pem``) and one pair per daemon, its certificate
    valid for the names and addresses in ``daemons[name]`` (server and client auth).

    An existing CA in ``out_dir`` is kept and signs the new pairs (a federation grows; a
    new CA needs a new directory). An existing daemon pair is a ``ConfigError`` unless
    ``force``; nothing is written when anything is refused. Returns whether a CA was made.
    """
    out = Path(out_dir)
    for name, hosts in daemons.items():
        if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
            raise ConfigError(f"daemon name {name!r}: use letters, digits, '-', '_' and '.'")
        if name in ("ca", "ca-key") or name.endswith("-key"):
            raise ConfigError(f"daemon name {name!r} is reserved (it would clash with a file)")
        subject_alt_names(hosts)  # refuse unusable names before writing anything
    if not daemons:
        raise ConfigError("no daemons: name at least one (--daemon NAME=HOST,... or --island)")
    ca_cert, ca_key = out / CA_CERT_FILE, out / CA_KEY_FILE
    existing = [p for name in daemons for p in material_paths(out, name) if p.exists()]
    if existing and not force:
        raise ConfigError(f"{', '.join(map(str, existing))} already exist; --force replaces them")
    if ca_cert.exists() != ca_key.exists():
        present = ca_cert if ca_cert.exists() else ca_key
        raise ConfigError(
            f"{present} exists without its pair: restore it, or start in a new directory"
        )
    new_ca = not ca_cert.exists()
    ca = make_ca(ca_name) if new_ca else CertificateAuthority.load(ca_cert, ca_key)
    pairs = {
        name: issue_cert(ca, hosts, common_name=name, days=days) for name, hosts in daemons.items()
    }
    if new_ca:
        ca.save(ca_cert, ca_key)
    for name, (cert_pem, key_pem) in pairs.items():
        save_pair(*material_paths(out, name), cert_pem, key_pem)
    return new_ca


def tls_section(out_dir: str | os.PathLike, name: str, mutual: bool = True) -> str:
    """The ``[tls]`` section of daemon ``name``'s config for material ``init_federation`` wrote."""
    cert, key = material_paths(out_dir, name)
    ca = Path(out_dir, CA_CERT_FILE)
    return (
        f"[tls]\ncert = {json.dumps(str(cert))}\nkey = {json.dumps(str(key))}\n"
        f"ca = {json.dumps(str(ca))}\nmutual = {'true' if mutual else 'false'}\n"
    )
