"""The federation dashboard: its routes behind the token, its live stream, a leaf's summary
reaching the root, and peers' bad reports dropped without losing their updates. Real
aggregator services on loopback (port 0); islands are signed pushes from test identities."""

from __future__ import annotations

import asyncio
import json
import math
import time

import aiohttp
import pytest
from aggtools import make_federation, random_delta
from test_aggregator_service import wait_for

from aggregator.config import ModelConfig
from aggregator.dashboard.app import COOKIE, session_value
from aggregator.dashboard.reports import MAX_ISLANDS, MAX_POINTS, child_summary, island_report
from aggregator.dashboard.router_watch import router_state
from aggregator.dashboard.view import KEEP_REJECTIONS, FederationView, ddp_bytes_per_step
from aggregator.service import AggregatorService
from comms.errors import (
    MalformedError,
    NotFoundError,
    ReplayError,
)
from comms.identity import Identity
from comms.transport import TransportClient
from comms.update import encode_update

TOKEN = "dashboard-t0ken"
ROUTES = ("/dashboard", "/dashboard/static/dashboard.js", "/dashboard/static/dashboard.css",
          "/dashboard/data", "/dashboard/events")  # fmt: skip


def push_bytes(ident, delta, sequence, meta=None, base_version=0) -> bytes:
    env = encode_update(delta, codec="none", model_id="global", kind="delta",
                        sender=ident.peer_id, sequence=sequence, base_version=base_version,
                        meta=meta or {}, identity=ident)  # fmt: skip
    return env.to_bytes()


def leaf_config(fed, parent: str, name: str = "leaf0", interval_s: float = 0.1, **merge):
    cfg = fed.config(name, "leaf", parent=parent, **merge)
    cfg.summary_interval_s = interval_s
    return cfg


def seen_at_root(root, leaf: str, **fields) -> bool:
    """The root holds a summary from ``leaf`` whose own record has these ``fields``."""
    snap = root.view.snapshot(root)
    rec = next((a for a in snap["aggregators"] if a["name"] == leaf), None)
    return rec is not None and all(rec.get(k) == v for k, v in fields.items())


async def fetch(session, url, token=None, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, headers=headers, **kw) as r:
        if r.content_type == "text/event-stream":
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
            return r.status, r.headers, first.decode()
        return r.status, r.headers, await r.text()


async def test_page_assets_data_and_events_need_the_token(tmp_path):
    fed = make_federation(tmp_path, 1, aggregators=("root",))
    cfg = fed.config("root", "root")
    cfg.http, cfg.http_token = "127.0.0.1:0", TOKEN
    root = AggregatorService(cfg)
    await root.start()
    base = f"http://{root.http_address}"
    try:
        async with aiohttp.ClientSession() as s:
            for path in ROUTES:
                for token in (None, "wrong"):
                    status, headers, body = await fetch(s, base + path, token)
                    assert status == 401, (path, token)
                    assert headers["WWW-Authenticate"] == "Bearer" and TOKEN not in body
            status, _, body = await fetch(s, base + "/dashboard")
            assert "?token=" in body  # the 401 page says what to do
            status, headers, page = await fetch(s, base + "/dashboard", TOKEN)
            assert status == 200 and headers["Content-Type"].startswith("text/html")
            assert "/dashboard/static/dashboard.js" in page
            assert "http" not in page.split("<body>")[1]  # no CDN: every asset is served here
            status, headers, _ = await fetch(s, base + "/dashboard/static/dashboard.js", TOKEN)
            assert status == 200 and headers["Content-Type"].startswith("text/javascript")
            assert (await fetch(s, base + "/dashboard/static/../http.py", TOKEN))[0] == 404
            assert (await fetch(s, base + "/dashboard/static/index.py", TOKEN))[0] == 404
            status, headers, event = await fetch(s, base + "/dashboard/events", TOKEN)
            assert status == 200 and headers["Content-Type"] == "text/event-stream"
            assert event.startswith("event: snapshot\ndata: ")
            snap = json.loads(event.split("data: ", 1)[1])
            assert snap["name"] == "root" and snap["models"][0]["model_id"] == "global"
            assert snap["models"][0]["params"] == 32 * 16 + 16
        # a browser: ?token= once, then the cookie (which is not the token)
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address
        async with aiohttp.ClientSession(cookie_jar=jar) as s:
            assert (await fetch(s, base + "/dashboard?token=wrong"))[0] == 401
            async with s.get(base + f"/dashboard?token={TOKEN}", allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/dashboard"
                cookie = r.headers["Set-Cookie"]
            assert TOKEN not in cookie and session_value(TOKEN) in cookie
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            for path in ROUTES:
                assert (await fetch(s, base + path))[0] == 200, path
            assert {c.key for c in jar} == {COOKIE}
    finally:
        await root.stop()


async def test_without_a_token_the_dashboard_is_open(tmp_path, monkeypatch):
    monkeypatch.delenv("ARCHIPELAGO_HTTP_TOKEN", raising=False)
    fed = make_federation(tmp_path, 1, aggregators=("root",))
    cfg = fed.config("root", "root")
    cfg.http = "127.0.0.1:0"
    root = AggregatorService(cfg)
    await root.start()
    try:
        async with aiohttp.ClientSession() as s:
            for path in ROUTES:
                assert (await fetch(s, f"http://{root.http_address}{path}"))[0] == 200, path
    finally:
        await root.stop()


async def test_an_open_event_stream_does_not_hold_up_the_aggregators_stop(tmp_path):
    fed = make_federation(tmp_path, 1, aggregators=("root",))
    cfg = fed.config("root", "root")
    cfg.http = "127.0.0.1:0"
    root = AggregatorService(cfg)
    await root.start()
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{root.http_address}/dashboard/events") as r,
    ):
        await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
        t0 = time.perf_counter()
        await asyncio.wait_for(root.stop(), 10)  # aiohttp alone would wait up to 60 s
        assert time.perf_counter() - t0 < 2.0


async def test_a_leafs_summary_of_its_islands_reaches_the_roots_dashboard(tmp_path):
    """Two islands push to a leaf (K = 2) with reports in their meta; the leaf's summaries
    (its own channel, on a timer) reach the root, whose dashboard data then lists both
    islands, the leaf feeding the root, the loss points, the bytes, and a replay refused at
    the leaf."""
    fed = make_federation(tmp_path, 3)
    root_cfg = fed.config("root", "root", buffer_k=1)
    root_cfg.http = "127.0.0.1:0"
    root = AggregatorService(root_cfg)
    root_address = await root.start()
    leaf = AggregatorService(leaf_config(fed, root_address, buffer_k=2))
    await leaf.start()
    try:
        datas = []
        for i in range(2):
            report = {"step": 10 + i, "steps_per_s": 2.5 + i, "utilization": 0.75,
                      "train_loss": 3.0 - i, "val_loss": 2.9, "val_version": 0,
                      "bytes_down": 1000 + i}  # fmt: skip
            meta = {"steps": 10, "every": 10, "report": report}
            datas.append(push_bytes(fed.islands[i], random_delta(fed.theta0, i), 1, meta))
        async with TransportClient(leaf.address, identity=fed.islands[0]) as c:
            for data in datas:
                await c.push(data)
            with pytest.raises(ReplayError):
                await c.push(datas[0], retries=0)
            await wait_for(lambda: root.lines["global"].version >= 1)
            more = [push_bytes(fed.islands[i], random_delta(fed.theta0, 5 + i), 2,
                               {"steps": 10, "every": 10}, base_version=1) for i in range(2)]  # fmt: skip
            await wait_for(lambda: leaf.lines["global"].version >= 1)
            for data in more:
                await c.push(data)
            await wait_for(lambda: root.lines["global"].version >= 2)
            await wait_for(lambda: leaf.lines["global"].version >= 2)
            await wait_for(lambda: seen_at_root(root, "leaf0", version=2, partials_sent=2))
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://{root.http_address}/dashboard/data") as r,
        ):
            snap = await r.json()
    finally:
        await leaf.stop()
        await root.stop()
    islands = {r["name"]: r for r in snap["islands"]}
    assert set(islands) == {"island0", "island1"}
    for i, name in enumerate(("island0", "island1")):
        rec = islands[name]
        assert rec["leaf"] == "leaf0" and rec["alive"] and rec["pushes"] == 2
        assert rec["steps_per_s"] == 2.5 + i and rec["utilization"] == 0.75  # the first report
        assert rec["bytes_up"] == len(datas[i]) + len(more[i]) and rec["bytes_down"] == 1000 + i
        assert rec["steps_pushed"] == 20 and rec["base_version"] == 1 and rec["staleness"] == 0
    assert islands["island0"]["rejected"] == {"replay": 1}
    aggs = {a["name"]: a for a in snap["aggregators"]}
    assert aggs["leaf0"]["parent"] == "root" and aggs["leaf0"]["role"] == "leaf"
    assert aggs["leaf0"]["partials_sent"] == 2 and aggs["root"]["version"] == 2
    assert aggs["leaf0"]["age_s"] < 5.0  # fresh: summaries every 0.1 s
    assert aggs["root"]["wal_bytes"] > 0
    assert [r["reason"] for r in snap["rejections"]] == ["replay"]
    assert snap["rejections"][0]["at"] == "leaf0" and snap["rejections"][0]["sender"] == "island0"
    points = sorted((p["island"], p["step"], p["train_loss"]) for p in snap["loss"])
    assert points == [("island0", 10, 3.0), ("island1", 11, 2.0)]
    assert [v for _, v in snap["models"][0]["versions"]] == [1, 2]
    params = 32 * 16 + 16
    assert snap["bytes"]["ddp"] == round((10 + 11) * ddp_bytes_per_step(params, 2))
    assert snap["bytes"]["up"] == sum(map(len, datas + more))


async def test_the_root_sees_every_loss_report_even_two_in_one_partial(tmp_path):
    """island0 pushes twice between two of its leaf's summaries (0.5 s apart): the summary
    holds its latest record, and its recent loss points carry the superseded report to the
    root too."""
    fed = make_federation(tmp_path, 2)
    root = AggregatorService(fed.config("root", "root", buffer_k=1))
    leaf = AggregatorService(leaf_config(fed, await root.start(), interval_s=0.5, buffer_k=3))
    await leaf.start()
    try:
        pushes = [(0, 1, {"step": 10, "train_loss": 3.0}), (0, 2, {"step": 20, "train_loss": 2.5}),
                  (1, 1, {"step": 10, "train_loss": 3.1, "val_loss": 3.2, "val_version": 0})]  # fmt: skip
        async with TransportClient(leaf.address, identity=fed.islands[0]) as c:
            for i, seq, report in pushes:
                delta = random_delta(fed.theta0, 10 * i + seq)
                await c.push(push_bytes(fed.islands[i], delta, seq, {"report": report}))
            await wait_for(lambda: root.lines["global"].version == 1)
            await wait_for(lambda: len(root.view.loss) == 3)
    finally:
        await leaf.stop()
        await root.stop()
    snap = root.view.snapshot(root)
    got = sorted((p["island"], p["step"], p["train_loss"], p.get("val_loss")) for p in snap["loss"])
    assert got == [("island0", 10, 3.0, None), ("island0", 20, 2.5, None),
                   ("island1", 10, 3.1, 3.2)]  # fmt: skip
    t = {(p["island"], p["step"]): p["t"] for p in snap["loss"]}
    assert t[("island0", 10)] <= t[("island0", 20)] <= snap["at"]
    assert all("points" not in r for r in snap["islands"])


def two_line_config(fed, name, role, **kw):
    """A config serving two model lines: the global model and expert ``f1``'s."""
    cfg = leaf_config(fed, name=name, **kw) if role == "leaf" else fed.config(name, role, **kw)
    init = str(fed.init_path) if role == "root" else ""
    cfg.models.append(ModelConfig(model_id="f1", init=init, codec="none"))
    return cfg


def flow_router(tmp_path):
    """A real ``router serve`` app over two tiny flow experts, ``f0`` (cluster 0, version 1)
    and ``f1`` (cluster 1, version 2), and a flow router (the router server's own test's)."""
    import torch
    from test_router_server import FLOW, LIMITS, sharpen, write_experts

    from router.checkpoint import save_router
    from router.models import FlowRouter
    from router.server import RouterServer, ServeConfig, load_served_ensemble

    identity = Identity.generate()
    torch.manual_seed(0)
    model = FlowRouter(2, hidden=16, depth=1, time_dim=8)
    sharpen(model)
    save_router(tmp_path / "router", model, "flow", {"hidden": 16, "depth": 1, "time_dim": 8}, 2,
                identity=identity, workload="flow")  # fmt: skip
    config = ServeConfig(experts=write_experts(tmp_path / "experts", "flow", FLOW, 2, identity),
                         router=str(tmp_path / "router"), rule="full", limits=LIMITS)  # fmt: skip
    return RouterServer(load_served_ensemble(config), config.limits, token=TOKEN)


@pytest.mark.slow  # a real router serve: torch and two experts, 4-13 s here
async def test_every_model_line_and_the_routers_experts_are_on_the_roots_page(
    tmp_path, monkeypatch
):
    """A root and a leaf serve two model lines, the global model and expert f1's; island0
    trains the first, island1 the second, through the leaf. A real router serves f0 and f1.
    The root's page data lists both lines with their versions and islands, f1 as the expert
    of cluster 1 (the router's version 2), the router up with both experts; once the router
    stops, it is shown down with the reason, its last answer kept."""
    monkeypatch.setattr("aggregator.dashboard.router_watch.ASK_INTERVAL_S", 0.1)
    router = flow_router(tmp_path)
    await router.start()
    fed = make_federation(tmp_path, 2)
    root_cfg = two_line_config(fed, "root", "root", buffer_k=1)
    root_cfg.http, root_cfg.router, root_cfg.router_token = "127.0.0.1:0", router.url, TOKEN
    root = AggregatorService(root_cfg)
    leaf = AggregatorService(two_line_config(fed, "leaf0", "leaf", parent=await root.start(),
                                             buffer_k=1))  # fmt: skip
    await leaf.start()
    try:
        async with TransportClient(leaf.address, identity=fed.islands[0]) as c:
            for i, model_id in enumerate(("global", "f1")):
                env = encode_update(random_delta(fed.theta0, i), codec="none", model_id=model_id,
                                    kind="delta", sender=fed.islands[i].peer_id, sequence=1,
                                    meta={"report": {"step": 3}}, identity=fed.islands[i])  # fmt: skip
                await c.push(env.to_bytes())
        await wait_for(lambda: all(line.version == 1 for line in root.lines.values()))
        await wait_for(lambda: len(root.view.snapshot(root)["islands"]) == 2)
        await wait_for(lambda: root.router_watch.snapshot()["status"] == "up")
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://{root.http_address}/dashboard/data") as r,
        ):
            snap = await r.json()
        await router.stop()
        await wait_for(lambda: root.router_watch.snapshot()["status"] == "down")
        down = root.view.snapshot(root)["router"]
    finally:
        await leaf.stop()
        await root.stop()
        await router.stop()
    models = {m["model_id"]: m for m in snap["models"]}
    assert set(models) == {"global", "f1"}
    for m in models.values():
        assert m["version"] == 1 and [v for _, v in m["versions"]] == [1]
        assert m["islands"] == 1 and m["alive"] == 1 and m["params"] == 32 * 16 + 16
    assert not models["global"]["expert"] and models["global"]["cluster"] is None
    assert models["f1"]["expert"] and models["f1"]["cluster"] == 1
    assert models["f1"]["router_version"] == 2
    islands = {r["name"]: r["model_id"] for r in snap["islands"]}
    assert islands == {"island0": "global", "island1": "f1"}
    assert snap["router"]["status"] == "up" and snap["router"]["rule"] == "full"
    assert snap["router"]["workload"] == "flow" and snap["router"]["url"] == router.url
    got = [(e["id"], e["cluster"], e["version"]) for e in snap["router"]["experts"]]
    assert got == [("f0", 0, 1), ("f1", 1, 2)]
    assert (
        down["status"] == "down" and down["error"] and down["experts"] == snap["router"]["experts"]
    )


async def test_without_a_router_an_experts_cluster_comes_from_its_islands_reports(tmp_path):
    """No router: island1, training expert f1's line on cluster 3, says so in its push
    report; the root's page shows f1 as the expert of cluster 3 and the global line as none."""
    fed = make_federation(tmp_path, 2)
    root = AggregatorService(two_line_config(fed, "root", "root", buffer_k=1))
    leaf = AggregatorService(two_line_config(fed, "leaf0", "leaf", parent=await root.start(),
                                             buffer_k=1))  # fmt: skip
    await leaf.start()
    try:
        async with TransportClient(leaf.address, identity=fed.islands[0]) as c:
            for i, (model_id, report) in enumerate(
                (("global", {"step": 2}), ("f1", {"step": 2, "cluster": 3}))
            ):
                env = encode_update(random_delta(fed.theta0, i), codec="none", model_id=model_id,
                                    kind="delta", sender=fed.islands[i].peer_id, sequence=1,
                                    meta={"report": report}, identity=fed.islands[i])  # fmt: skip
                await c.push(env.to_bytes())
        await wait_for(lambda: len(root.view.snapshot(root)["islands"]) == 2)
        snap = root.view.snapshot(root)
    finally:
        await leaf.stop()
        await root.stop()
    models = {m["model_id"]: m for m in snap["models"]}
    assert snap["router"] is None
    assert models["f1"]["expert"] and models["f1"]["cluster"] == 3
    assert not models["global"]["expert"] and models["global"]["cluster"] is None


def test_an_expert_groups_island_reports_its_cluster():
    from island.config import ExpertConfig, IslandConfig
    from island.daemon import Island

    tiny = {"d_model": 32, "n_layer": 1, "n_head": 2, "context": 32}
    cfg = IslandConfig(name="island0", workload="bytelm", workload_config=tiny,
                       expert=ExpertConfig(partition="partition", cluster=2))  # fmt: skip
    assert island_report({"report": Island(cfg)._push_report()})["cluster"] == 2
    cfg.expert = ExpertConfig()  # a global model's island: no cluster
    assert "cluster" not in Island(cfg)._push_report()


def test_a_routers_bad_answer_is_refused_naming_the_field():
    good = {"workload": "flow", "rule": "full", "experts": [{"id": "e0", "cluster": 2}]}
    assert router_state(good)["experts"] == [
        {"id": "e0", "cluster": 2, "version": None, "output": None, "train_steps": None}
    ]
    for bad, field in (([], "router"), ({"experts": "x"}, "router.experts"),
                       ({"experts": [{"cluster": 1}]}, r"experts\[0\]"),
                       ({"experts": [{"id": "e", "cluster": "one"}]}, r"experts\[0\]\.cluster"),
                       ({"experts": [{"id": "e"}] * 300}, "at most")):  # fmt: skip
        with pytest.raises(MalformedError, match=field):
            router_state(bad)


async def test_a_bad_report_is_dropped_and_its_update_kept(tmp_path):
    fed = make_federation(tmp_path, 2, aggregators=("root",))
    root = AggregatorService(fed.config("root", "root", buffer_k=2))
    await root.start()
    try:
        bad = {"steps": 10, "every": 10, "report": {"utilization": 7.0, "step": 3}}
        async with TransportClient(root.address, identity=fed.islands[0]) as c:
            await c.push(push_bytes(fed.islands[0], random_delta(fed.theta0, 0), 1, bad))
            await c.push(push_bytes(fed.islands[1], random_delta(fed.theta0, 1), 1,
                                    {"report": {"step": 4, "utilization": 0.5}}))  # fmt: skip
            await wait_for(lambda: root.lines["global"].version == 1)  # both merged
    finally:
        await root.stop()
    snap = root.view.snapshot(root)
    assert snap["bad_reports"] == 1
    islands = {r["name"]: r for r in snap["islands"]}
    assert "island0" not in islands  # its report was dropped whole, before any change
    assert islands["island1"]["utilization"] == 0.5


def test_refusals_with_made_up_model_ids_do_not_grow_the_view_without_bound(tmp_path):
    fed = make_federation(tmp_path, 1, aggregators=("root",))
    view = FederationView("leaf0", "leaf", fed.roster)
    delta = random_delta(fed.theta0, 0)
    for i in range(MAX_ISLANDS + 20):
        env = encode_update(delta, codec="none", model_id=f"m{i}", kind="delta",
                            sender=fed.islands[0].peer_id, sequence=1, identity=fed.islands[0])  # fmt: skip
        view.rejected(env.to_bytes(), NotFoundError(f"model 'm{i}' is not served here"))
    assert len(view.islands) == MAX_ISLANDS and len(view.rejections) == KEEP_REJECTIONS
    assert (
        view.rejections[-1]["reason"] == "not_found" and view.rejections[-1]["sender"] == "island0"
    )


@pytest.mark.parametrize(
    "report, field",
    [
        ({"utilization": 1.5}, "report.utilization"),
        ({"step": -1}, "report.step"),
        ({"step": 2.5}, "report.step"),
        ({"step": True}, "report.step"),
        ({"train_loss": math.nan}, "report.train_loss"),
        ({"train_loss": "low"}, "report.train_loss"),
        ({"bytes_down": 2**60}, "report.bytes_down"),
        ([1, 2], "report"),
    ],
)
def test_island_report_refuses_bad_values_naming_the_field(report, field):
    with pytest.raises(MalformedError, match=field.replace(".", r"\.")):
        island_report({"report": report})


def test_island_report_keeps_known_fields_only():
    got = island_report({"report": {"step": 5, "utilization": 1, "secret": "x" * 10**6}})
    assert got == {"step": 5, "utilization": 1.0}
    assert island_report({"steps": 3}) == {}


def test_child_summary_bounds_sizes_and_cuts_strings():
    island = {"name": "n" * 1000 + "\x1b[2J", "age_s": 1.0, "rejected": {"replay": 2}}
    got = child_summary({"islands": [island], "aggregators": [{"name": "a", "peer": "p"}]})
    assert len(got["islands"][0]["name"]) == 64 and got["islands"][0]["rejected"] == {"replay": 2}
    escaped = child_summary({"islands": [{**island, "name": "a\x1bb"}]})["islands"][0]["name"]
    assert escaped == "a?b"
    with pytest.raises(MalformedError, match="more than"):
        child_summary({"islands": [island] * (MAX_ISLANDS + 1)})
    with pytest.raises(MalformedError, match="needs a name and a peer"):
        child_summary({"aggregators": [{"name": "a"}]})
    with pytest.raises(MalformedError, match="age_s"):
        child_summary({"islands": [{"name": "x", "age_s": -1.0}]})
    with pytest.raises(MalformedError, match="rejected"):
        child_summary({"islands": [{**island, "rejected": {str(i): 1 for i in range(99)}}]})
    with pytest.raises(MalformedError, match="expected a map"):
        child_summary([1])
    points = [{"age_s": 1.0, "step": i, "train_loss": 2.0} for i in range(MAX_POINTS + 1)]
    with pytest.raises(MalformedError, match="points"):
        child_summary({"islands": [{**island, "points": points}]})
    with pytest.raises(MalformedError, match=r"points\[0\]\.train_loss"):
        child_summary(
            {"islands": [{**island, "points": [{"age_s": 1, "step": 1, "train_loss": []}]}]}
        )
    with pytest.raises(MalformedError, match="a step and age_s"):
        child_summary({"islands": [{**island, "points": [{"age_s": 1.0}]}]})
