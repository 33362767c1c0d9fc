"""The daemons' HTTP endpoints over HTTPS: an aggregator or island whose ``[tls]`` section has
a certificate serves ``/status``, ``/metrics`` and ``/healthz`` with it, on loopback."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import aiohttp
import pytest

from aggregator.config import AggregatorConfig
from comms.http import https_context, start_app, status_app
from comms.tls import (
    CA_CERT_FILE,
    TLSConfig,
    client_ssl_context,
    init_federation,
    material_paths,
    read_pem,
)
from tests.test_http import status_service

pytestmark = pytest.mark.timeout(60)

HOSTS = ["127.0.0.1", "localhost"]
TOKEN = "t0ken-over-tls"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("pki")
    init_federation(base / "fed", {"root": HOSTS, "island0": HOSTS})
    init_federation(base / "other", {"stranger": HOSTS}, ca_name="Another CA")
    return base


def tls_of(pki: Path, name: str, fed: str = "fed", **over) -> TLSConfig:
    cert, key = material_paths(pki / fed, name)
    ca = pki / "fed" / CA_CERT_FILE
    return TLSConfig(**{"cert": str(cert), "key": str(key), "ca": str(ca), "mutual": True, **over})


async def get(url: str, context: ssl.SSLContext | bool | None, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers, ssl=context if context is not None else True) as r,
    ):
        return r.status, await r.text()


async def start_aggregator_status(tls: TLSConfig):
    from aggregator.http import start_status_server

    config = AggregatorConfig(name="root", http_token=TOKEN, tls=tls)
    service = status_service(config, {"name": "root"}, b"archipelago_up 1\n")
    return service, await start_status_server(service, "127.0.0.1:0")


async def test_an_aggregator_with_a_certificate_serves_https_verified_by_the_federation_ca(
    pki, monkeypatch
):
    monkeypatch.delenv("ARCHIPELAGO_HTTP_TOKEN", raising=False)
    service, runner = await start_aggregator_status(tls_of(pki, "root"))
    ca = client_ssl_context(read_pem(pki / "fed" / CA_CERT_FILE))  # no client certificate
    try:
        url = service.http_url
        assert url == f"https://{service.http_address}"
        # a scraper or browser holds no federation certificate: not asked for, even mutual
        assert await get(url + "/healthz", ca) == (200, "ok\n")
        assert (await get(url + "/metrics", ca))[0] == 200
        assert (await get(url + "/status", ca))[0] == 401  # the token still guards it
        status, body = await get(url + "/status", ca, TOKEN)
        assert status == 200 and json.loads(body) == {"name": "root"}
        # the token never crosses in plaintext: plain HTTP to the port gets no answer
        with pytest.raises(aiohttp.ClientError):
            await get(f"http://{service.http_address}/status", None, TOKEN)
        # the certificate is the federation's: the system trust store, or another CA, refuses
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get(url + "/healthz", None)
        other = client_ssl_context(read_pem(pki / "other" / CA_CERT_FILE))
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get(url + "/healthz", other)
    finally:
        await runner.cleanup()


async def test_http_false_keeps_plain_http_and_no_certificate_means_plain_http(pki, monkeypatch):
    monkeypatch.delenv("ARCHIPELAGO_HTTP_TOKEN", raising=False)
    for tls in (tls_of(pki, "root", http=False), TLSConfig(ca=str(pki / "fed" / CA_CERT_FILE))):
        assert https_context(tls) is None
        service, runner = await start_aggregator_status(tls)
        try:
            assert service.http_url == f"http://{service.http_address}"
            assert await get(service.http_url + "/healthz", None) == (200, "ok\n")
        finally:
            await runner.cleanup()


def test_tls_http_loads_from_toml_and_defaults_on(tmp_path):
    from comms.config import load_config
    from comms.errors import ConfigError

    assert TLSConfig().http is True
    path = tmp_path / "i.toml"
    base = 'name = "i"\naggregator = "h:1"\n[sync]\nmodel_id = "m"\n[tls]\n'
    from island.config import IslandConfig

    path.write_text(base + "http = false\n")
    assert load_config(IslandConfig, path).tls.http is False
    path.write_text(base + 'http = "no"\n')
    with pytest.raises(ConfigError, match=r"tls\.http"):
        load_config(IslandConfig, path)


def test_island_status_command_reads_https_with_the_federation_ca(pki, capsys, monkeypatch):
    from comms.aio import LoopThread
    from island.cli import main

    monkeypatch.delenv("ARCHIPELAGO_HTTP_TOKEN", raising=False)
    app = status_app(lambda: {"name": "island0", "version": 4}, lambda: b"")
    context = https_context(tls_of(pki, "island0"))
    ca = str(pki / "fed" / CA_CERT_FILE)
    with LoopThread("https-status-cli-test") as loop:
        runner, address = loop.run(start_app(app, "127.0.0.1:0", context), 10)
        try:
            assert main(["status", f"https://{address}"]) == 1  # not the system's CA
            assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
            assert main(["status", f"https://{address}", "--ca", ca]) == 0
            assert json.loads(capsys.readouterr().out) == {"name": "island0", "version": 4}
            assert main(["status", f"https://{address}", "--ca", str(Path(ca).parent)]) == 1
            assert "cannot read" in capsys.readouterr().err  # a directory is no CA file
        finally:
            loop.run(runner.cleanup(), 10)
