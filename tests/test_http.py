"""The status endpoints every daemon serves, with and without a bearer token, on loopback."""

from __future__ import annotations

import json
from types import SimpleNamespace

import aiohttp
import pytest

from aggregator.config import AggregatorConfig
from comms.http import http_token, start_app, status_app

TOKEN = "t0ken-of-the-status"


async def get(address: str, path: str, token: str | None = None) -> tuple[int, dict, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{address}{path}", headers=headers) as r,
    ):
        return r.status, dict(r.headers), await r.text()


@pytest.fixture
async def serve():
    runners = []

    async def start(app):
        runner, address = await start_app(app, "127.0.0.1:0")
        runners.append(runner)
        return address

    yield start
    for runner in runners:
        await runner.cleanup()


def status_service(config: AggregatorConfig, status: dict, metrics: bytes = b""):
    """What ``aggregator.http.start_status_server`` reads of a service, without its lines."""
    return SimpleNamespace(
        config=config,
        status=lambda: status,
        metrics=SimpleNamespace(exposition=lambda: metrics),
        http_address="",
    )


def trio(**kwargs):
    return status_app(lambda: {"name": "n1", "version": 3}, lambda: b"up 1\n", **kwargs)


async def test_without_a_token_everything_is_open(serve):
    address = await serve(trio())
    for path in ("/healthz", "/status", "/metrics"):
        assert (await get(address, path))[0] == 200


async def test_token_guards_status_and_leaves_healthz_and_metrics_open(serve):
    address = await serve(trio(token=TOKEN))
    for token in (None, "wrong", TOKEN + "x", ""):
        status, headers, body = await get(address, "/status", token)
        assert status == 401
        assert headers["WWW-Authenticate"] == "Bearer"
        assert json.loads(body)["error"]["type"] == "unauthorized"
        assert TOKEN not in body
    status, _, body = await get(address, "/status", TOKEN)
    assert status == 200 and json.loads(body) == {"name": "n1", "version": 3}
    assert (await get(address, "/healthz"))[0] == 200
    assert (await get(address, "/metrics"))[0] == 200


async def test_protect_metrics_guards_metrics_too(serve):
    address = await serve(trio(token=TOKEN, protect_metrics=True))
    assert (await get(address, "/metrics"))[0] == 401
    assert (await get(address, "/metrics", "wrong"))[0] == 401
    status, _, body = await get(address, "/metrics", TOKEN)
    assert status == 200 and body == "up 1\n"
    assert (await get(address, "/healthz"))[0] == 200


def test_config_token_wins_and_the_environment_fills_in(monkeypatch):
    monkeypatch.delenv("ARCHIPELAGO_HTTP_TOKEN", raising=False)
    assert http_token("") is None
    assert http_token("from-config") == "from-config"
    monkeypatch.setenv("ARCHIPELAGO_HTTP_TOKEN", "from-env")
    assert http_token("") == "from-env"
    assert http_token("from-config") == "from-config"


async def test_aggregator_status_server_takes_the_config_token(serve, monkeypatch):
    from aggregator.http import start_status_server

    monkeypatch.delenv("ARCHIPELAGO_HTTP_TOKEN", raising=False)
    config = AggregatorConfig(name="leaf", http_token=TOKEN, http_token_metrics=True)
    service = status_service(config, {"name": "leaf"})
    runner = await start_status_server(service, "127.0.0.1:0")
    try:
        assert (await get(service.http_address, "/status"))[0] == 401
        assert (await get(service.http_address, "/metrics"))[0] == 401
        assert (await get(service.http_address, "/status", TOKEN))[0] == 200
        assert (await get(service.http_address, "/healthz"))[0] == 200
    finally:
        await runner.cleanup()


def test_island_status_command_sends_the_token(capsys, monkeypatch):
    from comms.aio import LoopThread
    from island.cli import main

    monkeypatch.delenv("ARCHIPELAGO_HTTP_TOKEN", raising=False)
    with LoopThread("status-cli-test") as loop:
        runner, address = loop.run(start_app(trio(token=TOKEN), "127.0.0.1:0"), 10)
        try:
            assert main(["status", f"http://{address}"]) == 1
            err = capsys.readouterr().err
            assert "401" in err and "--token" in err
            assert main(["status", f"http://{address}", "--token", TOKEN]) == 0
            assert json.loads(capsys.readouterr().out) == {"name": "n1", "version": 3}
            monkeypatch.setenv("ARCHIPELAGO_HTTP_TOKEN", TOKEN)
            assert main(["status", f"http://{address}"]) == 0
        finally:
            loop.run(runner.cleanup(), 10)


def test_config_keys_load_from_toml(tmp_path):
    from comms.config import load_config
    from island.config import IslandConfig

    path = tmp_path / "a.toml"
    path.write_text('name = "a"\nhttp_token = "abc"\nhttp_token_metrics = true\n')
    config = load_config(AggregatorConfig, path)
    assert (config.http_token, config.http_token_metrics) == ("abc", True)
    path.write_text('name = "i"\naggregator = "h:1"\nhttp_token = "abc"\n[sync]\nmodel_id = "m"\n')
    island = load_config(IslandConfig, path)
    assert (island.http_token, island.http_token_metrics) == ("abc", False)
