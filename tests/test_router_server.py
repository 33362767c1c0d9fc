"""``router serve`` and ``router.Client`` on loopback: generation (whole and streamed), flow
sampling (arrays and PNG), expert listing, metrics, and bad requests answered 4xx with the
field named while the server keeps serving."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
import torch

from comms.aio import LoopThread
from comms.errors import ConfigError
from comms.identity import Identity
from router import AsyncClient, BadRequestError, Client, ConnectionFailed, ServerError
from router.checkpoint import build_workload_model, partition_id, save_expert, save_router
from router.models import FlowRouter, PrefixRouter
from router.partition import TextPartitioner
from router.server import LimitsConfig, RouterServer, ServeConfig, load_served_ensemble

BYTELM = {"context": 32, "n_layer": 1, "n_head": 2, "d_model": 32}
FLOW = {"hidden": 32, "n_blocks": 1, "time_dim": 8}
LIMITS = LimitsConfig(
    max_new_bytes=4096, max_prompt_bytes=256, max_samples=16, max_steps=20, max_body_bytes=4096
)


def sharpen(router, scale=3.0):
    with torch.no_grad():
        router.head.weight.normal_(0.0, scale / router.head.in_features**0.5)


def write_experts(root, workload, config, k, identity, partition=None):
    root.mkdir(parents=True, exist_ok=True)
    dirs = []
    for i in range(k):
        model = build_workload_model(workload, config, seed=i)
        d = root / f"{workload}-expert{i}"
        save_expert(
            d, model, workload=workload, workload_config=config, expert_id=f"{workload[0]}{i}",
            cluster=i, version=i + 1, identity=identity, partition=partition,
        )  # fmt: skip
        dirs.append(str(d))
    return dirs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    identity = Identity.generate()
    torch.manual_seed(0)
    text_router = PrefixRouter(2, d_model=16, n_layers=1, context=32)
    sharpen(text_router)
    config = {"d_model": 16, "n_layers": 1, "context": 32}
    save_router(
        root / "text-router", text_router, "prefix", config, 2, identity=identity,
        workload="bytelm",
    )  # fmt: skip
    flow_router = FlowRouter(2, hidden=16, depth=1, time_dim=8)
    sharpen(flow_router)
    save_router(
        root / "flow-router", flow_router, "flow", {"hidden": 16, "depth": 1, "time_dim": 8}, 2,
        identity=identity, workload="flow",
    )  # fmt: skip
    return {
        "root": root,
        "bytelm": ServeConfig(
            experts=write_experts(root, "bytelm", BYTELM, 2, identity),
            router=str(root / "text-router"),
            limits=LIMITS,
        ),
        "flow": ServeConfig(
            experts=write_experts(root, "flow", FLOW, 2, identity),
            router=str(root / "flow-router"),
            rule="full",
            limits=LIMITS,
        ),
    }


@pytest.fixture(scope="module")
def loop():
    with LoopThread("router-server-test") as thread:
        yield thread


def start_server(loop, config):
    served = load_served_ensemble(config)

    async def start():
        server = RouterServer(served, config.limits)
        await server.start()
        return server

    return loop.run(start(), 30)


@pytest.fixture(scope="module")
def text_server(loop, checkpoints):
    server = start_server(loop, checkpoints["bytelm"])
    yield server
    loop.run(server.stop(), 10)


@pytest.fixture(scope="module")
def flow_server(loop, checkpoints):
    server = start_server(loop, checkpoints["flow"])
    yield server
    loop.run(server.stop(), 10)


def post_raw(url, data: bytes):
    request = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --- generation -----------------------------------------------------------------------------


def test_generate_round_trip_matches_the_local_ensemble(text_server, checkpoints):
    client = Client(text_server.url, timeout=30)
    result = client.generate("def main(", max_bytes=40, temperature=0.8, seed=5, raw=True)
    assert result.bytes_generated == 40 and len(result.raw) == 40
    assert result.text == result.raw.decode("utf-8", errors="replace")
    assert sum(result.expert_counts.values()) == 40
    assert set(result.expert_counts) <= {"b0", "b1"}
    local = load_served_ensemble(checkpoints["bytelm"]).ensemble
    assert local.generate(b"def main(", 40, 0.8, 1.0, 5) == result.raw
    again = client.generate("def main(", max_bytes=40, temperature=0.8, seed=5, raw=True)
    assert again.raw == result.raw  # deterministic for a seed


def test_streamed_pieces_join_to_the_final_text(text_server):
    client = Client(text_server.url, timeout=30)
    with client.generate_stream("import ", max_bytes=24, seed=1, rule="full") as stream:
        pieces = list(stream)
    tokens = [p for p in pieces if p.expert is not None]
    assert len(tokens) == 24
    assert "".join(p.text for p in pieces) == stream.result.text
    assert stream.result.bytes_generated == 24 and stream.result.rule == "full"
    for piece in tokens:
        assert set(piece.weights) == {"b0", "b1"}  # the full rule keeps both experts
        assert abs(sum(piece.weights.values()) - 1.0) < 1e-4


def test_streaming_delivers_pieces_before_the_generation_ends(text_server):
    client = Client(text_server.url, timeout=30)
    registry = text_server.metrics.registry
    before = registry.get_sample_value("router_generated_bytes_total")
    stream = client.generate_stream("x", max_bytes=4000, seed=0)
    first = next(stream)
    assert first.expert in {"b0", "b1"}
    # counted at the end of a generation: the 4000-byte one is still running
    assert registry.get_sample_value("router_generated_bytes_total") == before
    assert client.health()["status"] == "ok"  # the loop answers while the model works
    stream.close()  # the client goes away mid-stream; the server carries on
    assert client.generate("y", max_bytes=3, seed=0).bytes_generated == 3


async def test_async_client_generates_and_streams(text_server):
    async with AsyncClient(text_server.url, timeout=30) as client:
        result = await client.generate("ab", max_bytes=8, seed=2)
        stream = await client.generate_stream("ab", max_bytes=8, seed=2)
        pieces = [p async for p in stream]
        assert (await client.health())["status"] == "ok"
    assert result.bytes_generated == 8
    assert "".join(p.text for p in pieces) == result.text == stream.result.text


async def test_concurrent_generations_with_different_rules_do_not_interfere(text_server):
    requests = [("full", 3), ("top1", 3), ("top_k:1", 4), ("full", 5)]
    async with AsyncClient(text_server.url, timeout=30) as client:
        together = await asyncio.gather(
            *(client.generate("q", max_bytes=12, seed=s, rule=r, raw=True) for r, s in requests)
        )
        alone = [
            await client.generate("q", max_bytes=12, seed=s, rule=r, raw=True) for r, s in requests
        ]
    assert [r.raw for r in together] == [r.raw for r in alone]
    assert [r.rule for r in together] == [r for r, _ in requests]


# --- sampling -------------------------------------------------------------------------------


def test_flow_sample_as_arrays_and_png(flow_server):
    client = Client(flow_server.url, timeout=30)
    images = client.sample(n=5, steps=4, seed=3)
    assert images.shape == (5, 8, 8) and images.dtype == np.float32
    assert np.isfinite(images).all()
    assert np.array_equal(images, client.sample(n=5, steps=4, seed=3))
    png = client.sample(n=5, steps=4, seed=3, format="png", rule="top1")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (3 * 33 + 1, 2 * 33 + 1)  # 3 x 2 grid of 8x8 images, x4, 1px pad
    idat_length = struct.unpack(">I", png[33:37])[0]
    raw = zlib.decompress(png[41 : 41 + idat_length])
    assert len(raw) == height * (width + 1)


# --- listing and metrics --------------------------------------------------------------------


def test_experts_health_and_metrics(text_server, flow_server):
    client = Client(text_server.url)
    listing = client.experts()
    assert listing["workload"] == "bytelm" and listing["rule"] == "top1"
    assert [(e["id"], e["output"], e["version"]) for e in listing["experts"]] == [
        ("b0", 0, 1),
        ("b1", 1, 2),
    ]
    assert listing["router"]["router_kind"] == "prefix"
    assert client.health() == {"status": "ok", "workload": "bytelm", "experts": 2}
    assert Client(flow_server.url).experts()["workload"] == "flow"
    client.generate("z", max_bytes=2, seed=0)
    with urllib.request.urlopen(text_server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'router_requests_total{endpoint="/v1/generate",status="200"}' in text
    assert 'router_expert_calls_total{expert="b' in text
    assert "router_request_seconds_bucket" in text


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_bytes": 4}, "prompt"),
        ({"prompt": "a", "max_bytes": 5000}, "max_bytes"),
        ({"prompt": "a", "max_bytes": 0}, "max_bytes"),
        ({"prompt": "a", "max_bytes": "ten"}, "max_bytes"),
        ({"prompt": "a", "temperature": -0.5}, "temperature"),
        ({"prompt": "a", "top_p": 0}, "top_p"),
        ({"prompt": "a", "temperature": 1e-9}, "temperature"),
        ({"prompt": "a", "rule": "top3"}, "rule"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "stream": "yes"}, "stream"),
        ({"prompt": "a", "temprature": 1.0}, "temprature"),
        ({"prompt": 7}, "prompt"),
        ({"prompt": "a" * 300}, "prompt"),
    ],
)
def test_bad_generate_requests_name_the_field(text_server, body, field):
    status, raw = post_raw(text_server.url + "/v1/generate", json.dumps(body).encode())
    error = json.loads(raw)["error"]
    assert status == 400 and error["field"] == field, error
    assert field in error["message"]


def test_client_raises_typed_errors_and_server_keeps_serving(text_server, flow_server):
    client = Client(text_server.url)
    with pytest.raises(BadRequestError) as info:
        client.generate("a", max_bytes=2, temperature=-1.0)
    assert info.value.status == 400 and info.value.field == "temperature"
    with pytest.raises(BadRequestError) as info:
        Client(flow_server.url).generate("a", max_bytes=2)
    assert info.value.kind == "wrong_workload" and "/v1/sample" in info.value.message
    with pytest.raises(BadRequestError) as info:
        client.sample(n=2)
    assert info.value.kind == "wrong_workload"
    with pytest.raises(BadRequestError) as info:
        Client(flow_server.url).sample(n=1000)
    assert info.value.field == "n"
    with pytest.raises(BadRequestError) as info:
        Client(flow_server.url).sample(n=2, format="gif")
    assert info.value.field == "format"
    assert client.generate("a", max_bytes=2, seed=0).bytes_generated == 2


def test_malformed_json_oversized_body_and_unknown_path(text_server):
    url = text_server.url
    status, raw = post_raw(url + "/v1/generate", b'{"prompt": "a",')
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_json"
    status, raw = post_raw(url + "/v1/generate", b'{"prompt": "a", "temperature": NaN}')
    assert status == 400 and json.loads(raw)["error"]["field"] == "temperature"
    status, raw = post_raw(url + "/v1/generate", b"[" * 3000)
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_json"
    status, raw = post_raw(url + "/v1/generate", b"[1, 2]")
    assert status == 400 and "JSON object" in json.loads(raw)["error"]["message"]
    status, raw = post_raw(url + "/v1/generate", json.dumps({"prompt": "a" * 8000}).encode())
    assert status == 413 and json.loads(raw)["error"]["type"] == "payload_too_large"
    status, raw = post_raw(url + "/v1/nothing", b"{}")
    assert status == 404 and "error" in json.loads(raw)
    assert Client(url).health()["status"] == "ok"


def test_requests_past_the_time_limit_get_504(loop, checkpoints):
    limits = dataclasses.replace(LIMITS, request_timeout=1e-6)
    server = start_server(loop, dataclasses.replace(checkpoints["bytelm"], limits=limits))
    try:
        client = Client(server.url, timeout=30)
        with pytest.raises(ServerError) as info:
            client.generate("a", max_bytes=50, seed=0)
        assert info.value.status == 504 and info.value.kind == "timeout"
        with pytest.raises(ServerError) as info, client.generate_stream("a", max_bytes=50) as s:
            list(s)
        assert info.value.status == 504
        assert client.health()["status"] == "ok"
    finally:
        loop.run(server.stop(), 10)


def test_unreachable_server_is_connection_failed():
    with pytest.raises(ConnectionFailed):
        Client("http://127.0.0.1:1", timeout=2).health()


# --- loading --------------------------------------------------------------------------------


def test_serve_config_and_mismatched_experts_are_config_errors(checkpoints):
    from comms.config import config_from_dict

    with pytest.raises(ConfigError, match="exactly one"):
        config_from_dict(ServeConfig, {"experts": ["a"], "router": "r", "partition": "p"})
    with pytest.raises(ConfigError, match="rule"):
        config_from_dict(ServeConfig, {"experts": ["a"], "router": "r", "rule": "best"})
    mixed = ServeConfig(
        experts=checkpoints["bytelm"].experts[:1], router=checkpoints["bytelm"].router
    )
    with pytest.raises(ConfigError, match="router has 2 outputs"):
        load_served_ensemble(mixed)
    wrong = ServeConfig(experts=checkpoints["flow"].experts, router=checkpoints["bytelm"].router)
    with pytest.raises(ConfigError, match="bytelm"):
        load_served_ensemble(wrong)


def test_cbtm_server_from_a_partition(loop, checkpoints, tmp_path):
    texts = ["import asyncio event loop task future"] * 3 + ["xml element tree parse node"] * 3
    partition = TextPartitioner(2, svd_dims=2, n_init=2).fit(texts)
    partition.save(tmp_path / "part")
    identity = Identity.generate()
    experts = write_experts(
        tmp_path, "bytelm", BYTELM, 2, identity, partition=partition_id(tmp_path / "part")
    )
    config = ServeConfig(experts=experts, partition=str(tmp_path / "part"), limits=LIMITS)
    strangers = write_experts(tmp_path / "other", "bytelm", BYTELM, 2, identity, partition="zz")
    with pytest.raises(ConfigError, match="another partition"):
        load_served_ensemble(dataclasses.replace(config, experts=strangers))
    server = start_server(loop, config)
    try:
        client = Client(server.url, timeout=30)
        assert client.generate("asyncio loop", max_bytes=6, seed=0).bytes_generated == 6
        assert client.experts()["router"]["router_kind"] == "cbtm"
    finally:
        loop.run(server.stop(), 10)


# --- bearer token ---------------------------------------------------------------------------


def test_token_guards_the_api_and_healthz_stays_open(loop, checkpoints):
    from router.client import UnauthorizedError

    served = load_served_ensemble(checkpoints["bytelm"])
    server = RouterServer(served, LIMITS, token="s3cret-router")
    loop.run(server.start(), 30)
    try:
        with pytest.raises(UnauthorizedError, match="token=") as info:
            Client(server.url, timeout=30).experts()
        assert info.value.status == 401 and info.value.kind == "unauthorized"
        with pytest.raises(UnauthorizedError):
            Client(server.url, timeout=30, token="wrong").generate("a", max_bytes=4, seed=0)
        status, body = post_raw(server.url + "/v1/generate", b'{"prompt": "a"}')
        assert status == 401 and b"s3cret" not in body
        client = Client(server.url, timeout=30, token="s3cret-router")
        assert client.generate("a", max_bytes=4, seed=0).text is not None
        assert client.experts()["experts"]
        assert Client(server.url).health()["status"] == "ok"  # /healthz: no token needed
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            assert b'status="401"' in r.read()  # refusals are counted; /metrics open

        async def with_async_client():
            async with AsyncClient(server.url, timeout=30, token="s3cret-router") as c:
                return await c.experts()

        assert loop.run(with_async_client(), 30)["experts"]
    finally:
        loop.run(server.stop(), 10)


# --- TLS ----------------------------------------------------------------------------------------


def test_tls_serves_https_and_mutual_tls_requires_a_client_certificate(loop, checkpoints, tmp_path):
    from comms.tls import CA_CERT_FILE, TLSConfig, init_federation, material_paths
    from router.server import router_https_context

    init_federation(tmp_path, {"router": ["127.0.0.1"], "user": ["user"]})
    init_federation(tmp_path / "other", {"stranger": ["stranger"]}, ca_name="Another CA")
    ca = str(tmp_path / CA_CERT_FILE)
    cert, key = map(str, material_paths(tmp_path, "router"))
    user_cert, user_key = map(str, material_paths(tmp_path, "user"))
    stranger = tuple(map(str, material_paths(tmp_path / "other", "stranger")))
    tls = TLSConfig(cert=cert, key=key, ca=ca, mutual=True)
    served = load_served_ensemble(checkpoints["bytelm"])
    server = RouterServer(served, LIMITS, ssl_context=router_https_context(tls))
    loop.run(server.start(), 30)
    try:
        assert server.url.startswith("https://127.0.0.1:")
        client = Client(server.url, timeout=30, ca=ca, cert=user_cert, key=user_key)
        assert client.experts()["experts"]
        assert client.generate("a", max_bytes=4, seed=0).text is not None

        async def async_experts(**tls_args):
            async with AsyncClient(server.url, timeout=30, **tls_args) as c:
                return await c.experts()

        assert loop.run(async_experts(ca=ca, cert=user_cert, key=user_key), 30)["experts"]
        refused = [
            {"ca": ca},  # no client certificate
            {"ca": ca, "cert": stranger[0], "key": stranger[1]},  # one another CA signed
            {},  # the system trust store does not know the federation CA
        ]
        for tls_args in refused:
            with pytest.raises(ConnectionFailed):
                Client(server.url, timeout=30, **tls_args).experts()
        with pytest.raises(ConnectionFailed):
            Client(server.url.replace("https://", "http://"), timeout=30).experts()
        with pytest.raises(ValueError, match="both cert and key"):
            Client(server.url, ca=ca, cert=user_cert)
    finally:
        loop.run(server.stop(), 10)
    # one-way TLS (no mutual): any client that trusts the CA
    server = RouterServer(served, LIMITS, ssl_context=router_https_context(
        TLSConfig(cert=cert, key=key)))  # fmt: skip
    loop.run(server.start(), 30)
    try:
        assert Client(server.url, timeout=30, ca=ca).experts()["experts"]
    finally:
        loop.run(server.stop(), 10)


def test_a_tls_section_without_a_certificate_is_refused_at_load(checkpoints, tmp_path):
    from comms.config import load_config
    from comms.tls import init_federation

    init_federation(tmp_path, {"router": ["127.0.0.1"]})
    config = checkpoints["bytelm"]
    path = tmp_path / "serve.toml"
    lines = [f"experts = {json.dumps(config.experts)}", f"router = {json.dumps(config.router)}"]
    path.write_text("\n".join([*lines, "[tls]", f'ca = "{tmp_path}/ca.pem"', ""]))
    with pytest.raises(ConfigError, match=r"tls\.cert: router serve serves HTTPS"):
        load_config(ServeConfig, path)
