"""Fuzz targets for files a user hands over and for the router server's request bodies.

Configs (TOML), the roster (JSON), key files (PEM), signed checkpoint manifests (JSON) and
the JSON bodies of ``POST /v1/generate`` and ``/v1/sample``. Registered in
``fuzz_targets.TARGETS`` on import (``fuzz_targets.targets()`` does it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import random
import tomllib
import typing
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from fuzz_mutations import (
    expand_placeholders,
    interesting_value,
    json_text,
    mutate_tree,
    set_path,
)
from fuzz_targets import (
    ISLAND,
    STRANGER,
    InvariantError,
    Target,
    fresh_dir,
    register,
    roster,
    scratch,
)

from comms.errors import CommsError, ConfigError

REPO = Path(__file__).resolve().parent.parent


# --- TOML configs -------------------------------------------------------------------------------


def toml_text(doc: dict) -> bytes:
    from comms.config import dump_toml

    try:
        text = dump_toml(doc)
    except (TypeError, ValueError, RecursionError):  # a value TOML cannot hold: say so badly
        text = repr(doc)[:4096]
    return expand_placeholders(text).encode("utf-8", errors="surrogatepass")


def key_paths(cls: type, prefix: tuple = ()) -> list[tuple]:
    """Every key of a config dataclass, nested tables and arrays of tables included."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = (*prefix, f.name)
        out.append(path)
        if dataclasses.is_dataclass(tp):
            out += key_paths(tp, path)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out += [(*path, 0, *p[len(path) :]) for p in key_paths(typing.get_args(tp)[0], path)]
    return out


def _set_known_key(rng: random.Random, doc: dict, cls: type) -> dict:
    path = rng.choice(key_paths(cls))
    value = interesting_value(rng, "toml")
    if 0 in path:  # an array of tables: [[models]]
        i = path.index(0)
        tables = doc.get(path[i - 1])
        if not (isinstance(tables, list) and tables and isinstance(tables[0], dict)):
            tables = doc[path[i - 1]] = [{}]
        set_path(tables[0], path[i + 1 :], value)
    else:
        set_path(doc, path, value)
    return doc


def _finite_everywhere(obj: Any, where: str = "") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise InvariantError(f"config accepted with {where or 'a value'} = {obj}")
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _finite_everywhere(getattr(obj, f.name), f"{where}.{f.name}".lstrip("."))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _finite_everywhere(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _finite_everywhere(v, f"{where}[{i}]")


def config_target(name: str, cls_path: str, seed_texts: list[str], derived: tuple[str, ...]):
    module, _, cls_name = cls_path.rpartition(".")

    @cache
    def cls():
        return getattr(__import__(module, fromlist=[cls_name]), cls_name)

    def seeds() -> list[bytes]:
        from comms.config import config_to_dict

        texts = [t.encode() for t in seed_texts]
        try:
            texts.append(toml_text(config_to_dict(cls()(name="x"))))
        except TypeError:
            texts.append(toml_text(config_to_dict(cls()())))
        return texts

    def mutate(rng: random.Random, data: bytes) -> bytes:
        doc = tomllib.loads(data.decode())
        if rng.random() < 0.6:
            doc = _set_known_key(rng, doc, cls())
        else:
            doc = mutate_tree(rng, doc, "toml")
        return toml_text(doc if isinstance(doc, dict) else {"value": doc})

    def run(data: bytes) -> None:
        from comms.config import load_config

        path = scratch() / f"{name}.toml"
        path.write_bytes(data)
        config = load_config(cls(), path)
        _finite_everywhere(config)
        for prop in derived:  # what the daemon computes from it at start-up
            try:
                getattr(config, prop)
            except Exception as e:
                raise InvariantError(f"accepted config, but {prop} raises {e!r}") from e

    def random_text(rng: random.Random) -> bytes:
        doc: dict = {}
        for _ in range(rng.randrange(1, 6)):
            _set_known_key(rng, doc, cls())
        return toml_text(doc)

    return register(Target(f"config.{name}", f"comms.config.load_config({cls_name})", run,
                           (ConfigError,), seeds, (mutate,), random_text))  # fmt: skip


def _example(name: str) -> str:
    path = REPO / "docs" / "examples" / name
    return path.read_text() if path.is_file() else 'name = "x"\n'


config_target("aggregator", "aggregator.config.AggregatorConfig",
              [_example("leaf.toml"), _example("root.toml")], ("max_update_bytes",))  # fmt: skip
config_target("island", "island.config.IslandConfig", [_example("island.toml")], ())
config_target("router_serve", "router.serve_config.ServeConfig",
              ['experts = ["e0", "e1"]\nrouter = "r"\nrule = "top_k:2"\n[limits]\nmax_samples = 8\n'],
              ("host_port",))  # fmt: skip
config_target(
    "router",
    "router.cli.RouterConfig",
    ['[workload]\nname = "flow"\n[partition]\nk = 4\n[router]\nsteps = 10\n'],
    (),
)


# --- JSON documents: the roster, request bodies, checkpoint manifests ------------------------


def json_mutator(rng: random.Random, data: bytes) -> bytes:
    return json_text(mutate_tree(rng, json.loads(data), "json"))


def random_json(rng: random.Random) -> bytes:
    return json_text(interesting_value(rng, "json"))


def roster_seeds() -> list[bytes]:
    one = roster().to_json().encode()
    named = json.dumps({"peers": [{"public_key": STRANGER.public_key.hex(), "role": "admin"}]})
    return [one, named.encode(), b'{"peers": []}']


def run_roster(data: bytes) -> None:
    from comms.identity import Roster

    path = scratch() / "roster.json"
    path.write_bytes(data)
    Roster.load(path)


register(Target("roster", "comms.identity.Roster.load", run_roster, (ConfigError,),
                roster_seeds, (json_mutator,), random_json))  # fmt: skip


def key_seeds() -> list[bytes]:
    path = scratch() / "seed-key.pem"
    ISLAND.save(path)
    return [path.read_bytes()]


def run_key(data: bytes) -> None:
    from comms.identity import Identity

    path = scratch() / "key.pem"
    path.write_bytes(data)
    path.chmod(0o600)  # an open key file is refused before its bytes are parsed
    Identity.load(path)


register(Target("key_file", "comms.identity.Identity.load (PEM key files)", run_key,
                (ConfigError,), key_seeds))  # fmt: skip


# --- signed checkpoints ------------------------------------------------------------------------

TINY_FLOW = {"hidden": 8, "n_blocks": 1, "time_dim": 4}


@cache
def _checkpoint() -> tuple[Path, bytes]:
    """A real expert checkpoint of a tiny model, and its manifest (inputs replace it)."""
    from island.checkpoint import build_workload_model, save_expert

    d = fresh_dir("checkpoint")
    model = build_workload_model("flow", TINY_FLOW)
    save_expert(d, model, workload="flow", workload_config=TINY_FLOW, expert_id="e0",
                cluster=0, identity=ISLAND, partition="p0", train_steps=1)  # fmt: skip
    return d, _at_fixed_time(d / "manifest.json")


def _at_fixed_time(path: Path) -> bytes:
    """The signed manifest at ``path`` with a fixed ``created_at`` (re-signed, written back),
    so that a run's inputs depend on its seed alone."""
    from island.checkpoint import sign_manifest

    doc = sign_manifest({**json.loads(path.read_bytes()), "created_at": "2030-01-01T00:00:00Z"},
                        ISLAND)  # fmt: skip
    path.write_text(json.dumps(doc, indent=2, sort_keys=True))
    return path.read_bytes()


def checkpoint_dir() -> Path:
    return _checkpoint()[0]


def checkpoint_seeds() -> list[bytes]:
    return [_checkpoint()[1]]


def mutate_manifest(rng: random.Random, data: bytes) -> bytes:
    """Edit a field (often the workload config) and, mostly, re-sign with the signer's key."""
    from island.checkpoint import sign_manifest

    doc = json.loads(data)
    if rng.random() < 0.4:
        config = doc.setdefault("workload_config", {})
        key = rng.choice(("hidden", "n_blocks", "time_dim", "device", "batch_size", "extra"))
        if isinstance(config, dict):
            config[key] = rng.choice((0, -1, 3, 2**16, 2**31, 10**18, 1.5, "cuda", "meta", None))
        if rng.random() < 0.2:
            doc["workload"] = rng.choice(("bytelm", "flow", "nope", 3))
    else:
        doc = mutate_tree(rng, doc, "json")
    if isinstance(doc, dict) and rng.random() < 0.8:
        with contextlib.suppress(TypeError, ValueError):  # unsignable (surrogates): as is
            doc = sign_manifest(doc, ISLAND)
    return json_text(doc)


def run_checkpoint(data: bytes) -> None:
    """``read_manifest`` (signature, signer, digests, format, kind), then ``load_expert``."""
    from island.checkpoint import MANIFEST_FILE, load_expert

    d = checkpoint_dir()
    (d / MANIFEST_FILE).write_bytes(data)
    trusted = [ISLAND.public_key] if len(data) % 3 == 0 else None
    load_expert(d, roster=roster() if len(data) % 3 == 1 else None, trusted_keys=trusted)


register(Target("checkpoint", "island.checkpoint.read_manifest + load_expert", run_checkpoint,
                (CommsError,), checkpoint_seeds, (mutate_manifest,), random_json))  # fmt: skip


TINY_ROUTER = {"hidden": 8, "depth": 1, "time_dim": 4}


@cache
def _router_checkpoint() -> tuple[Path, bytes]:
    import torch

    from router.checkpoint import build_router, save_router

    d = fresh_dir("router-checkpoint")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        router = build_router("flow", TINY_ROUTER, 2)
    save_router(d, router, "flow", TINY_ROUTER, 2, ["e0", "e1"], identity=ISLAND,
                workload="flow")  # fmt: skip
    return d, _at_fixed_time(d / "manifest.json")


def mutate_router_manifest(rng: random.Random, data: bytes) -> bytes:
    from island.checkpoint import sign_manifest

    doc = json.loads(data)
    if rng.random() < 0.5:
        key = rng.choice(("router_config", "router_config", "num_experts", "router_kind"))
        if key == "router_config" and isinstance(doc.get(key), dict):
            doc[key][rng.choice(("hidden", "depth", "time_dim", "extra"))] = rng.choice(
                (0, -1, 3, 2**16, 2**31, 10**18, 1.5, None)
            )
        else:
            doc[key] = rng.choice((0, 1, 2, 3, 2**20, 10**12, "cbtm", "prefix", "flow", None))
    else:
        doc = mutate_tree(rng, doc, "json")
    if isinstance(doc, dict) and rng.random() < 0.8:
        with contextlib.suppress(TypeError, ValueError):
            doc = sign_manifest(doc, ISLAND)
    return json_text(doc)


def run_router_checkpoint(data: bytes) -> None:
    from router.checkpoint import MANIFEST_FILE, load_router

    d = _router_checkpoint()[0]
    (d / MANIFEST_FILE).write_bytes(data)
    load_router(d, trusted_keys=[ISLAND.public_key] if len(data) % 2 else None)


register(Target("router_checkpoint", "router.checkpoint.load_router", run_router_checkpoint,
                (CommsError,), lambda: [_router_checkpoint()[1]], (mutate_router_manifest,),
                random_json))  # fmt: skip


# --- router serve: request bodies -------------------------------------------------------------


class _Request:
    """What the handlers read of an aiohttp request: the body, refused past the size limit
    as aiohttp's ``client_max_size`` does."""

    def __init__(self, raw: bytes, limit: int):
        self.raw, self.limit = raw, limit

    async def read(self) -> bytes:
        from aiohttp import web

        if len(self.raw) > self.limit:
            raise web.HTTPRequestEntityTooLarge(max_size=self.limit, actual_size=len(self.raw))
        return self.raw


@cache
def _server(workload: str):
    """A stand-in for ``RouterServer`` that runs its real request handlers (body reading,
    parsing, validation, the response) with the model calls replaced by no-ops."""
    from router.serve_config import LimitsConfig
    from router.server import RouterServer

    class Counter:
        def inc(self, n=1):
            pass

    class Stub:
        _json_body = RouterServer._json_body
        _require_workload = RouterServer._require_workload
        generate = RouterServer.generate
        sample = RouterServer.sample

        def __init__(self):
            self.served = SimpleNamespace(workload=workload, rule="top1")
            self.limits = LimitsConfig()
            self.metrics = SimpleNamespace(sampled_images=Counter(), generated_bytes=Counter())

        async def _generate_stream(self, request, params):
            return "stream"

        async def _generation(self, params):
            yield {"type": "done", "text": "", "bytes": params.max_bytes}

        def _sample(self, n, steps, seed, rule):
            return np.zeros((n, 8, 8), np.float32), {}

    return Stub()


@cache
def _loop() -> asyncio.AbstractEventLoop:
    return asyncio.new_event_loop()


def _request_errors() -> tuple[type[BaseException], ...]:
    from aiohttp import web

    from router.requests import RequestError

    return (RequestError, web.HTTPException)


def router_target(name: str, workload: str, endpoint: str, seed_bodies: list[dict]):
    def run(data: bytes) -> None:
        from router.requests import RequestError

        server = _server(workload)
        handler = getattr(server, endpoint)
        try:
            _loop().run_until_complete(handler(_Request(data, server.limits.max_body_bytes)))
        except RequestError as e:
            if not 400 <= e.status < 500:
                raise InvariantError(f"a bad request answered {e.status}: {e.message}") from e
            raise

    return register(Target(
        name, f"router.server.RouterServer.{endpoint} (body reading, parsing, validation)",
        run, _request_errors(), lambda: [json_text(b) for b in seed_bodies],
        (json_mutator,), random_json,
    ))  # fmt: skip


router_target("router.generate", "bytelm", "generate", [
    {"prompt": "def f(x):", "max_bytes": 16, "temperature": 0.8, "top_p": 0.9, "seed": 1,
     "rule": "top_k:2", "stream": False, "raw": True},
    {"prompt": "", "stream": True}, {"prompt": "héllo", "rule": "threshold:0.2", "temperature": 0},
])  # fmt: skip
router_target("router.sample", "flow", "sample", [
    {"n": 4, "steps": 10, "seed": 3, "rule": "top1", "format": "png"},
    {"n": 2, "format": "array"}, {},
])  # fmt: skip
