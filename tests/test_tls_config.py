"""TLS from the configs: the ``[tls]`` section of aggregator and island configs (parsing and
every refusal), an aggregator served from such a config (it refuses plaintext clients and,
with ``mutual``, clients without a certificate its CA signed; a leaf follows it over TLS), and
``aggregator tls init`` (files, modes, SANs, the snippets it prints, no silent overwrite)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import stat
import time
import tomllib
from pathlib import Path

import pytest
from aggtools import make_federation
from cryptography import x509

from aggregator.cli import main as aggregator_main
from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from comms.config import config_from_dict
from comms.errors import ConfigError
from comms.identity import ALLOW_OPEN_KEYS_ENV
from comms.tls import TLSConfig, TLSMismatchError, init_federation, material_paths
from comms.transport import ClientTLS, TransportClient
from island.config import IslandConfig

pytestmark = pytest.mark.timeout(60)

HOSTS = ["127.0.0.1", "localhost"]
ISLAND = {"name": "island0", "aggregator": "127.0.0.1:1", "sync": {"model_id": "g"}}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A federation's material (root, leaf0, island0) and a stranger's, from another CA."""
    base = tmp_path_factory.mktemp("pki")
    init_federation(base / "fed", {"root": HOSTS, "leaf0": HOSTS, "island0": ["island0"]})
    init_federation(base / "other", {"stranger": ["stranger"]}, ca_name="Another CA")
    return base


def section(pki: Path, name: str, fed: str = "fed", **over) -> dict:
    cert, key = material_paths(pki / fed, name)
    doc = {"cert": str(cert), "key": str(key), "ca": str(pki / "fed" / "ca.pem"), "mutual": True}
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


def root_doc(tls: dict | None) -> dict:
    doc = {"name": "root", "role": "root", "models": [{"model_id": "g", "init": "x.safetensors"}]}
    return doc if tls is None else {**doc, "tls": tls}


def leaf_doc(tls: dict) -> dict:
    return {"name": "leaf0", "role": "leaf", "parent": "127.0.0.1:1", "tls": tls}


def island_doc(tls: dict) -> dict:
    return {**ISLAND, "tls": tls}


# ------------------------------------------------------------------ parsing and validation


@pytest.mark.parametrize("tls", [None, {}])
def test_no_or_empty_section_is_plaintext(tls):
    island = island_doc(tls) if tls is not None else ISLAND
    for cls, doc in ((AggregatorConfig, root_doc(tls)), (IslandConfig, island)):
        cfg = config_from_dict(cls, doc)
        assert not cfg.tls.enabled and cfg.tls.describe() == "tls=off"
        assert cfg.tls.server_tls() is None and cfg.tls.client_tls() is None


def test_full_sections_give_server_and_client_material(pki):
    root = config_from_dict(AggregatorConfig, root_doc(section(pki, "root"))).tls
    assert root.describe() == "tls=on (mutual)"
    server = root.server_tls()
    assert server.cert_pem == material_paths(pki / "fed", "root")[0].read_bytes()
    assert server.client_ca_pem == (pki / "fed" / "ca.pem").read_bytes()  # mutual: verified
    island = config_from_dict(
        IslandConfig, island_doc(section(pki, "island0", server_name="localhost"))
    ).tls
    client = island.client_tls()
    assert client.cert_pem == material_paths(pki / "fed", "island0")[0].read_bytes()
    assert client.server_name == "localhost"
    # not mutual: the server asks for no client certificate
    one_way = config_from_dict(AggregatorConfig, root_doc(section(pki, "root", mutual=False)))
    assert one_way.tls.describe() == "tls=on" and one_way.tls.server_tls().client_ca_pem is None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: root_doc(section(p, "root", cert=None, ca=None, mutual=False)),
         "key: a TLS key without its certificate"),
        (lambda p: root_doc(section(p, "root", key=None, ca=None, mutual=False)),
         "cert: a TLS certificate without its private key"),
        (lambda p: root_doc(section(p, "root", ca=None)), "mutual: needs ca"),
        (lambda p: island_doc(section(p, "island0", cert=None, key=None)),
         "mutual: needs cert and key"),
        (lambda p: root_doc(section(p, "root", cert=str(p / "nowhere.pem"))),
         "cannot read"),
        (lambda p: root_doc(section(p, "root", ca=str(p / "nowhere.pem"))), "cannot read"),
        (lambda p: root_doc(section(p, "root", key=str(material_paths(p / "fed", "leaf0")[1]))),
         "does not match the certificate"),
        (lambda p: root_doc(section(p, "stranger", fed="other")), "is not signed by the CA"),
        (lambda p: root_doc({"server_name": "root.example"}), "server_name: only used"),
        (lambda p: root_doc({**section(p, "root"), "kye": "x"}), "tls.kye: unknown key"),
        (lambda p: root_doc({"ca": str(p / "fed" / "ca.pem")}), "tls.cert: an aggregator serves"),
        (lambda p: leaf_doc(section(p, "leaf0", ca=None, mutual=False)),
         "tls.ca: a leaf or mid verifies its parent"),
        (lambda p: island_doc(section(p, "island0", ca=None, mutual=False)),
         "tls.ca: an island verifies its aggregator"),
    ],
)  # fmt: skip
def test_bad_sections_are_config_errors_that_say_what_to_set(pki, make, message):
    doc = make(pki)
    cls = IslandConfig if "sync" in doc else AggregatorConfig
    with pytest.raises(ConfigError, match="tls") as err:
        config_from_dict(cls, doc, "daemon.toml")
    assert message in str(err.value) and str(err.value).startswith("daemon.toml: ")


def test_a_key_others_may_read_is_refused(pki, tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_OPEN_KEYS_ENV, raising=False)
    key = tmp_path / "root-key.pem"
    shutil.copy(material_paths(pki / "fed", "root")[1], key)
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match=r"has mode 0644.*chmod 600"):
        config_from_dict(AggregatorConfig, root_doc(section(pki, "root", key=str(key))))


# ------------------------------------------------------------------ an aggregator over TLS


def client_material(pki: Path, name: str | None, fed: str = "fed") -> ClientTLS:
    ca = (pki / "fed" / "ca.pem").read_bytes()
    if name is None:
        return ClientTLS(ca)
    cert, key = material_paths(pki / fed, name)
    return ClientTLS(ca, cert.read_bytes(), key.read_bytes())


async def test_a_mutual_tls_root_serves_only_clients_with_a_ca_signed_cert(pki, tmp_path, caplog):
    fed = make_federation(tmp_path, 1)
    cfg = fed.config("root", "root")
    cfg.tls = TLSConfig(**section(pki, "root"))
    root = AggregatorService(cfg)
    with caplog.at_level(logging.INFO, logger="aggregator.service"):
        address = await root.start()
    try:
        assert "aggregator root: tls=on (mutual)" in caplog.text
        reader = fed.islands[0]
        refusals = [
            (None, "speaks TLS and this daemon dials it in plaintext"),
            (client_material(pki, None), "requires a client certificate"),
            (client_material(pki, "stranger", "other"), "refused this daemon's client certificate"),
        ]
        for tls, message in refusals:
            t0 = time.monotonic()
            async with TransportClient(address, tls, identity=reader, deadline_s=10) as client:
                with pytest.raises(TLSMismatchError, match=message):
                    await client.fetch("global", -1)
            assert time.monotonic() - t0 < 5  # said at once, not after the retries
        async with TransportClient(
            address, client_material(pki, "island0"), identity=reader
        ) as client:
            assert len(await client.fetch("global", -1)) > 0
    finally:
        await root.stop()


async def test_a_leaf_follows_a_tls_root_and_one_without_tls_is_told_why(pki, tmp_path, caplog):
    fed = make_federation(tmp_path, 1)
    cfg = fed.config("root", "root")
    cfg.tls = TLSConfig(**section(pki, "root"))
    root = AggregatorService(cfg)
    address = await root.start()
    try:
        plain = AggregatorService(fed.config("leaf0", "leaf", parent=address))
        try:
            with (
                caplog.at_level(logging.WARNING, logger="aggregator.service"),
                pytest.raises(TLSMismatchError, match=r"set \[tls\] ca"),
            ):
                await asyncio.wait_for(plain.start(), 20)
        finally:
            await plain.stop()
        assert "aggregator leaf0: tls=off" in caplog.text
        leaf_cfg = fed.config("leaf0", "leaf", parent=address)
        leaf_cfg.tls = TLSConfig(**section(pki, "leaf0"))
        leaf = AggregatorService(leaf_cfg)
        await leaf.start()
        try:
            assert leaf.lines["global"].version == 0  # its replica came over mutual TLS
            # an island with the CA's certificate reads from the leaf, one without is refused
            reader = fed.islands[0]
            async with TransportClient(
                leaf.address, client_material(pki, "island0"), identity=reader
            ) as client:
                assert len(await client.fetch("global", -1)) > 0
            async with TransportClient(leaf.address, identity=reader) as client:
                with pytest.raises(TLSMismatchError):
                    await client.fetch("global", -1)
        finally:
            await leaf.stop()
    finally:
        await root.stop()


async def test_a_tls_client_of_a_plaintext_aggregator_is_told_why(pki, tmp_path):
    fed = make_federation(tmp_path, 1)
    root = AggregatorService(fed.config("root", "root"))
    address = await root.start()
    try:
        tls = client_material(pki, "island0")
        async with TransportClient(address, tls, identity=fed.islands[0]) as client:
            with pytest.raises(TLSMismatchError, match="does not speak TLS"):
                await client.fetch("global", -1)
    finally:
        await root.stop()


# ------------------------------------------------------------------ aggregator tls init


def _init(capsys, *args: str) -> tuple[int, str, str]:
    rc = aggregator_main(["tls", "init", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_tls_init_writes_a_ca_and_pairs_with_sans_and_modes(tmp_path, capsys):
    out_dir = tmp_path / "tls"
    rc, out, err = _init(capsys, str(out_dir), "--ca-name", "Test CA",
                         "--daemon", "root=127.0.0.1,root.example", "--daemon", "leaf0=10.0.0.2",
                         "--island", "island0")  # fmt: skip
    assert rc == 0, err
    names = ("ca", "root", "leaf0", "island0")
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"{n}{s}.pem" for n in names for s in ("", "-key")
    )
    for path in out_dir.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.name.endswith("-key.pem") else 0o644), path
    ca = x509.load_pem_x509_certificate((out_dir / "ca.pem").read_bytes())
    assert ca.subject.rfc4514_string().startswith("CN=Test CA")
    want = {"root": ({"root.example"}, {"127.0.0.1"}), "leaf0": (set(), {"10.0.0.2"}),
            "island0": ({"island0"}, set())}  # fmt: skip
    for name, (dns, ips) in want.items():
        cert = x509.load_pem_x509_certificate(material_paths(out_dir, name)[0].read_bytes())
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(san.get_values_for_type(x509.DNSName)) == dns
        assert set(san.get_values_for_type(x509.IPAddress)) == {
            ipaddress.ip_address(i) for i in ips
        }
    # each printed [tls] section is a valid config section for that daemon
    blocks = out.split("\n# ")[1:]
    assert [b.split(" ", 1)[0] for b in blocks] == ["root", "leaf0", "island0"]
    for block in blocks:
        tls = tomllib.loads(block.split("\n", 1)[1])["tls"]
        cfg = config_from_dict(TLSConfig, tls)
        assert cfg.mutual and cfg.describe() == "tls=on (mutual)"
        assert Path(cfg.cert) == material_paths(out_dir, block.split(" ", 1)[0])[0]


def test_tls_init_refuses_to_overwrite_without_force_and_keeps_the_ca(tmp_path, capsys):
    out_dir = tmp_path / "tls"
    assert _init(capsys, str(out_dir), "--daemon", "root=127.0.0.1", "--island", "island0")[0] == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    rc, _, err = _init(capsys, str(out_dir), "--daemon", "root=127.0.0.1")
    assert rc == 2 and "already exist" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before  # nothing written
    rc, out, err = _init(capsys, str(out_dir), "--daemon", "root=127.0.0.1", "--force")
    assert rc == 0, err
    assert "signed with the existing CA" in out
    after = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert (
        after["root.pem"] != before["root.pem"] and after["root-key.pem"] != before["root-key.pem"]
    )
    assert after["ca.pem"] == before["ca.pem"] and after["ca-key.pem"] == before["ca-key.pem"]
    assert after["island0.pem"] == before["island0.pem"]
    # a daemon added later is signed by the same CA
    assert _init(capsys, str(out_dir), "--daemon", "leaf9=127.0.0.1")[0] == 0
    ca = x509.load_pem_x509_certificate(before["ca.pem"])
    leaf = x509.load_pem_x509_certificate(material_paths(out_dir, "leaf9")[0].read_bytes())
    leaf.verify_directly_issued_by(ca)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--daemon", "root"], "expected NAME=HOST"),
        (["--daemon", "root=not a host"], "neither an IP address nor"),
        (["--island", "ca"], "reserved"),
        (["--daemon", "root=127.0.0.1", "--island", "root"], "named twice"),
        ([], "no daemons"),
    ],
)
def test_tls_init_bad_arguments(tmp_path, capsys, args, message):
    usage = message.startswith("expected")  # argparse's own refusal: exit 2 with usage
    with pytest.raises(SystemExit) if usage else contextlib.nullcontext():
        rc, _, err = _init(capsys, str(tmp_path / "tls"), *args)
        assert rc == 2 and message in err
    if usage:
        assert message in capsys.readouterr().err
    assert not (tmp_path / "tls").exists() or not any((tmp_path / "tls").iterdir())
