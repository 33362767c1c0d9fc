"""Every decoder of bytes from a peer or a user's file, fuzzed: only typed errors come out.

The targets (``scripts/fuzz_targets.py``) run the real decoders: the update envelope and
``decode_update``, the gateway's admission, WAL records and segment files, codecs, chunk
streams, DHT records, signed read requests (``ReadGuard``), the TOML configs, the roster, key files, expert and router checkpoint
manifests and the router server's request bodies. For each, hypothesis draws random bytes and
mutations of valid seeds (byte-level havoc, and structured edits re-signed with a roster key so
the checks behind the signature run). Properties: nothing escapes but the target's typed
errors, every rejection says what is wrong, no input takes long, and crafted headers declaring
huge sizes are refused before anything of that size is allocated. ``scripts/fuzz.py`` runs the
same targets for 100,000 inputs each; the regression tests below pin the defects it found.
"""

from __future__ import annotations

import base64
import json
import math
import random
import struct
import sys
import time
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from fuzz_mutations import BIGINT_DIGITS, DEEP_TEXT
from fuzz_targets import (
    AGGREGATOR,
    ISLAND,
    MAX_ENVELOPE_BYTES,
    classify,
    make_input,
    memory_cap,
    roster,
    targets,
)

from comms.errors import ConfigError, MalformedError, OversizeError, RejectedError

TARGETS = targets()
NAMES = sorted(TARGETS)
# Examples per target and strategy: the whole file stays under ~30 s on 2 busy cores.
EXAMPLES = {"checkpoint": 30, "discovery": 60, "reads": 300}
DEFAULT_EXAMPLES = 100
MAX_SECONDS_PER_INPUT = 5.0


def check(name: str, data: bytes) -> None:
    result = classify(TARGETS[name], data)
    assert result.status != "crash", f"{name}: {result.error} on {data[:300]!r}\n{result.trace}"
    assert result.seconds < MAX_SECONDS_PER_INPUT, f"{name}: {result.seconds:.1f} s on one input"
    if result.status == "rejected":  # classify counts an empty message as a crash already
        assert len(result.message) >= 10, f"{name}: uninformative rejection {result.message!r}"


def run_property(name: str, strategy, make) -> None:
    @settings(max_examples=EXAMPLES.get(name, DEFAULT_EXAMPLES), deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def prop(drawn):
        check(name, make(drawn))

    with memory_cap(2 << 30):  # an unbounded allocation fails here, not on the machine
        prop()


@pytest.mark.parametrize("name", NAMES)
def test_random_bytes_are_refused_with_typed_errors(name):
    run_property(name, st.binary(max_size=2048), lambda data: data)


@pytest.mark.parametrize("name", NAMES)
def test_mutated_seeds_are_refused_with_typed_errors(name):
    """Havoc and structured mutations of valid seeds (re-signed, re-digested)."""
    run_property(name, st.integers(0, 2**64 - 1),
                 lambda seed: make_input(TARGETS[name], random.Random(seed))[1])  # fmt: skip


def test_every_target_accepts_its_valid_seeds():
    """The mutations start from inputs that pass: a target that refuses everything tests
    nothing behind its first check."""
    for name, target in TARGETS.items():
        results = [classify(target, s) for s in target.seeds()]
        assert any(r.status == "accepted" for r in results), (name, results)
        assert not [r for r in results if r.status == "crash"], (name, results)


# --- no allocation of what a header declares -----------------------------------------------------


def traced_peak(fn) -> int:
    """Peak bytes of Python allocations (numpy's included) while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def refused_small(fn, error=RejectedError, limit=1 << 20) -> str:
    caught = []

    def call():
        with pytest.raises(error) as info:
            fn()
        caught.append(str(info.value))

    peak = traced_peak(call)
    assert peak < limit, f"{peak} bytes allocated before refusing"
    return caught[0]


def _signed_envelope(header_edit) -> bytes:
    from fuzz_wire_targets import envelope_seeds, join_envelope, split_envelope

    header, _, payload = split_envelope(envelope_seeds()[0])
    header_edit(header)
    return join_envelope(random.Random(0), header, payload)


def test_envelope_declaring_1e12_elements_is_refused_before_allocating():
    from comms.envelope import Envelope
    from comms.update import expected_nbytes

    def huge(header):
        header["tensors"][0].update(shape=[10**12], nbytes=4 * 10**12)

    data = _signed_envelope(huge)
    message = refused_small(lambda: Envelope.from_bytes(
        data, max_bytes=MAX_ENVELOPE_BYTES, expected_nbytes=expected_nbytes))  # fmt: skip
    assert "outside the payload" in message or "payload" in message


def test_envelope_header_length_and_msgpack_counts_are_not_trusted():
    from comms.envelope import Envelope

    preamble = b"ARCP" + struct.pack(">HI", 3, 2**32 - 1)
    refused_small(lambda: Envelope.from_bytes(preamble + b"\x00" * 16, max_bytes=1 << 20))
    array32 = b"\xdd\xff\xff\xff\xff"  # a msgpack array announcing 2**32 - 1 items
    data = b"ARCP" + struct.pack(">HI", 3, len(array32)) + array32 + b"\x00"
    refused_small(lambda: Envelope.from_bytes(data, max_bytes=1 << 20), MalformedError)


def test_codec_shape_of_1e12_elements_is_refused_before_allocating():
    from comms.codecs import get_codec

    for name in ("none", "fp16", "bf16", "int8", "int4", "sparse2", "sign1"):
        codec = get_codec(name)
        refused_small(lambda c=codec: c.decode(b"\x00" * 64, (10**12,)), MalformedError)
        refused_small(lambda c=codec: c.validate(b"\x00" * 64, (10**6, 10**6)), MalformedError)


def test_topk_shape_beyond_its_index_space_is_refused_before_allocating():
    """topk with a tiny fraction keeps one entry of any shape: 8 bytes declared a 1e12-element
    tensor, and decode called np.zeros(10**12) (MemoryError); validate decoded too."""
    from comms.codecs import codec_from_spec

    codec = codec_from_spec({"name": "topk", "fraction": 1e-12})
    payload = np.array([5], np.uint32).tobytes() + np.array([1.0], np.float32).tobytes()
    with memory_cap(1 << 30):
        message = refused_small(lambda: codec.decode(payload, (10**12,)), MalformedError)
        refused_small(lambda: codec.validate(payload, (10**12,)), MalformedError)
    assert "2**32" in message
    # Within the index space, validate checks the entries without the dense array.
    assert traced_peak(lambda: codec.validate(payload, (2**31,))) < 1 << 20


def test_upload_declaring_a_terabyte_is_refused_at_its_first_message():
    from comms.chunks import UploadTable

    table = UploadTable(max_upload_bytes=1 << 20)
    refused_small(lambda: table.open("u", 10**12, b"\x00" * 32, {}), OversizeError)


def test_wal_record_declaring_4_gib_is_cut_without_reading_past_the_file(tmp_path):
    from aggregator.wal import _HEAD, MAGIC, WriteAheadLog

    head = _HEAD.pack(MAGIC, 1, 1, 2**32 - 1, b"\x00" * 16)
    (tmp_path / "00000000000000000001.wal").write_bytes(head + b"x" * 100)
    peak = traced_peak(lambda: WriteAheadLog(tmp_path).close())
    assert peak < 1 << 20


# --- regressions: defects the fuzzer found, fixed ------------------------------------------------


@pytest.mark.parametrize("text", [b"name = '\xff\xfe'\n", ("a = " + BIGINT_DIGITS).encode(),
                                  ("a = " + DEEP_TEXT).encode()], ids=["utf8", "bigint", "deep"])  # fmt: skip
def test_config_file_that_is_not_toml_is_a_config_error(tmp_path, text):
    """Invalid UTF-8 (UnicodeDecodeError), a 5001-digit integer (ValueError) and arrays nested
    3000 deep (RecursionError) escaped ``load_config``."""
    from aggregator.config import AggregatorConfig
    from comms.config import load_config

    path = tmp_path / "agg.toml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=r"agg\.toml"):
        load_config(AggregatorConfig, path)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_config_refuses_non_finite_numbers(tmp_path, value):
    """``max_update_mb = inf`` was accepted, and ``max_update_bytes`` then raised
    OverflowError at start-up; NaN passed every ``<`` check."""
    from aggregator.config import AggregatorConfig
    from comms.config import load_config

    path = tmp_path / "agg.toml"
    path.write_text(f'name = "x"\nmax_update_mb = {value}\n')
    with pytest.raises(ConfigError, match=r"max_update_mb.*finite"):
        load_config(AggregatorConfig, path)


def test_aggregator_config_refuses_a_max_update_size_beyond_an_int(tmp_path):
    """``max_update_mb = 1e308`` passed validation; ``max_update_bytes`` then raised
    OverflowError (int of an infinite float) when the service started."""
    from aggregator.config import AggregatorConfig
    from comms.config import load_config

    path = tmp_path / "agg.toml"
    path.write_text('name = "x"\nmax_update_mb = 1e308\n')
    with pytest.raises(ConfigError, match="max_update_mb"):
        load_config(AggregatorConfig, path)


@pytest.mark.parametrize("text", ['{"peers": [], "n": ' + BIGINT_DIGITS + "}", DEEP_TEXT],
                         ids=["bigint", "deep"])  # fmt: skip
def test_roster_that_json_cannot_read_is_a_config_error(tmp_path, text):
    from comms.identity import Roster

    path = tmp_path / "roster.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="roster"):
        Roster.load(path)


@pytest.mark.parametrize("oid", ["2a0330", "2b656f"], ids=["unknown", "x448"])
def test_key_file_of_another_algorithm_is_a_config_error(tmp_path, oid):
    """An Ed25519 key relabelled with an algorithm cryptography does not know raised
    UnsupportedAlgorithm; relabelled X448 (whose keys are 56 bytes, not 32), OpenSSL's
    InternalError."""
    from comms.identity import Identity

    pem = tmp_path / "k.pem"
    ISLAND.save(pem)
    lines = pem.read_text().splitlines()
    der = base64.b64decode("".join(lines[1:-1]))
    der = der.replace(bytes.fromhex("06032b6570"), bytes.fromhex("0603" + oid))
    body = base64.encodebytes(der).decode().strip()
    pem.write_text(f"{lines[0]}\n{body}\n{lines[-1]}\n")
    with pytest.raises(ConfigError, match=r"k\.pem"):
        Identity.load(pem)


def _manifest_run(text: bytes):
    from fuzz_file_targets import run_checkpoint

    return lambda: run_checkpoint(text)


def _signed_manifest(edit) -> bytes:
    from fuzz_file_targets import checkpoint_seeds
    from fuzz_mutations import json_text

    from island.checkpoint import sign_manifest

    doc = json.loads(checkpoint_seeds()[0])
    edit(doc)
    return json_text(sign_manifest(doc, ISLAND))


@pytest.mark.parametrize("kind", ["bigint", "deep", "surrogate"])
def test_checkpoint_manifest_that_cannot_be_read_is_a_typed_error(kind):
    """A 5001-digit integer and deep nesting escaped ``json.loads`` (ValueError,
    RecursionError); a manifest holding a lone surrogate escaped the signature check as
    UnicodeEncodeError."""
    from comms.errors import CommsError

    if kind == "surrogate":
        from fuzz_file_targets import checkpoint_seeds
        from fuzz_mutations import json_text

        doc = json.loads(checkpoint_seeds()[0])  # signed; a lone surrogate added (as \ud800)
        text = json_text({**doc, "expert_id": "e\ud800"})
    else:
        text = ('{"a": ' + (BIGINT_DIGITS if kind == "bigint" else DEEP_TEXT) + "}").encode()
    with pytest.raises(CommsError):
        _manifest_run(text)()


@pytest.fixture(scope="module")
def checkpoints_loaded_once():
    """Loads the fuzz targets' genuine expert and router checkpoints once, so that the timed
    refusals below measure the refusal, not the first load's imports and setup (6 s on a
    loaded machine, inside the first case's 2 s bound, before this fixture)."""
    from fuzz_file_targets import run_router_checkpoint

    _manifest_run(_signed_manifest(lambda d: None))()
    run_router_checkpoint(_router_manifest(lambda d: None))


@pytest.mark.parametrize("config", [{"hidden": 2**16}, {"hidden": 2**40}, {"n_blocks": 10**9},
                                    {"hidden": 10**18}], ids=str)  # fmt: skip
def test_checkpoint_config_larger_than_its_weights_is_refused_before_building(
    config, checkpoints_loaded_once
):
    """A (signed) manifest whose workload config describes a model far larger than the
    weights file made ``load_expert`` allocate it first: 16 GiB for hidden = 2**16, or
    build a billion blocks one at a time."""
    text = _signed_manifest(lambda d: d["workload_config"].update(config))
    started = time.perf_counter()
    with memory_cap(512 << 20), pytest.raises(ConfigError, match="weights"):
        _manifest_run(text)()
    assert time.perf_counter() - started < 2.0


def _router_manifest(edit) -> bytes:
    from fuzz_file_targets import _router_checkpoint
    from fuzz_mutations import json_text

    from island.checkpoint import sign_manifest

    doc = json.loads(_router_checkpoint()[1])
    edit(doc)
    return json_text(sign_manifest(doc, ISLAND))


@pytest.mark.parametrize("edit", [{"router_config": {"hidden": 2**16}}, {"num_experts": 10**9},
                                  {"router_config": {"depth": 10**9}}], ids=str)  # fmt: skip
def test_router_checkpoint_larger_than_its_weights_is_refused_before_building(
    edit, checkpoints_loaded_once
):
    """The same for router checkpoints: ``load_router`` built the router a manifest describes
    (a 16 GiB hidden layer; a billion tiny layers, one at a time) before reading a weight."""
    from fuzz_file_targets import run_router_checkpoint

    text = _router_manifest(lambda d: d.update(edit))
    started = time.perf_counter()
    with memory_cap(512 << 20), pytest.raises(ConfigError, match="weights"):
        run_router_checkpoint(text)
    assert time.perf_counter() - started < 2.0


def test_router_checkpoint_of_kind_cbtm_without_its_partition_is_a_config_error():
    """A signed router manifest naming kind ``cbtm`` with no partition beside it escaped
    ``load_router`` as FileNotFoundError."""
    from fuzz_file_targets import run_router_checkpoint

    text = _router_manifest(lambda d: d.update(router_kind="cbtm"))
    with pytest.raises(ConfigError, match="partition"):
        run_router_checkpoint(text)


def _admit_meta(meta_edit, decode=True):
    from fuzz_wire_targets import _admit

    def edit(header):
        meta_edit(header["meta"])

    return lambda: _admit(_signed_envelope(edit), decode=decode)


@pytest.mark.parametrize("tokens", ["many", {"n": 1}, [1], 1e300, -5, True], ids=repr)
def test_gateway_refuses_a_tokens_count_that_is_not_a_sane_number(tokens):
    """``float(meta["tokens"])`` raised ValueError or TypeError; 1e300 was admitted (and
    acknowledged) with a weight the merge then refused."""
    with pytest.raises(MalformedError, match="tokens"):
        _admit_meta(lambda m: m.update(tokens=tokens))()


@pytest.mark.parametrize("body", [b"", b"\x00\x00\x00\x05\xc1", b"\x00\x00\x00\x01\x01",
                                  b"\x00\x00\x00\x09" + msgpack.packb({"s": 0}),
                                  b"\xff\xff\xff\xff", b"\x00\x00\x00\x01\x91"], ids=repr)  # fmt: skip
def test_parse_wal_record_refuses_garbage_with_malformed_error(body):
    """Garbage raised msgpack's FormatError, ValueError, TypeError or KeyError."""
    from aggregator.gateway import parse_wal_record

    with pytest.raises(MalformedError, match="WAL record"):
        parse_wal_record(body)


@pytest.mark.parametrize("head", [{"s": 0, "w": 0.0}, {"s": 0, "w": 1e-300}, {"s": -1, "w": 1.0},
                                  {"s": 0, "w": 1e300}, {"s": "0", "w": 1.0}, {"s": 0, "w": True}],
                         ids=repr)  # fmt: skip
def test_parse_wal_record_refuses_figures_the_merge_cannot_use(head):
    """A weight of 0 (or one that rounds to 0 in float32) replayed through admission and
    then failed in the merge."""
    from aggregator.gateway import parse_wal_record

    packed = msgpack.packb(head)
    with pytest.raises(MalformedError, match="WAL record"):
        parse_wal_record(len(packed).to_bytes(4, "big") + packed + b"envelope")


def test_wal_record_with_an_index_past_the_index_space_does_not_break_appends(tmp_path):
    """A record (with a valid checksum) at index 2**64 - 1 made the next ``append`` fail with
    struct.error: the index did not fit the record header any more."""
    from aggregator.wal import _HEAD, MAGIC, MARK, WriteAheadLog, _digest

    good = WriteAheadLog(tmp_path)
    good.append(b"one")
    good.close()
    index = 2**64 - 1
    record = _HEAD.pack(MAGIC, MARK, index, 0, _digest(MARK, index, b""))
    segment = tmp_path / "00000000000000000001.wal"
    segment.write_bytes(segment.read_bytes() + record)
    wal = WriteAheadLog(tmp_path)
    assert wal.torn_bytes == len(record)  # cut like any corrupt record
    assert wal.append(b"two") == 2
    wal.close()


@pytest.mark.parametrize("exp", [math.nan, math.inf], ids=repr)
def test_discovery_refuses_a_non_finite_expiration(exp):
    """A record signed with expiration NaN (or Inf) never expired: every comparison with
    the clock is false."""
    from comms.discovery import decode_record, encode_record

    value = encode_record(AGGREGATOR, "model", "global", {"version": 1}, exp)
    with pytest.raises(MalformedError, match="expiration"):
        decode_record("model", "global", value, 1000.0, now=999.0, roster=roster())


def test_router_body_with_a_5001_digit_integer_is_a_400():
    """``json.loads`` raises a plain ValueError for an integer past the digit limit, which the
    body parser did not catch: the server answered 500."""
    from router.requests import RequestError, parse_json_body

    with pytest.raises(RequestError) as info:
        parse_json_body(b'{"seed": ' + BIGINT_DIGITS.encode() + b"}")
    assert info.value.status == 400 and "digits" in info.value.message
    for name in ("router.generate", "router.sample"):
        result = classify(TARGETS[name], b'{"seed": ' + BIGINT_DIGITS.encode() + b"}")
        assert result.status == "rejected", result.trace


def test_router_number_field_given_an_integer_beyond_float_range_is_a_400():
    """``math.isfinite`` raised OverflowError for an integer of 400 digits given where a
    number was expected (``top_p``): a 500."""
    from router.requests import RequestError, take

    with pytest.raises(RequestError) as info:
        take({"top_p": 10**400}, "top_p", "number", 1.0, lo=0.0, hi=1.0)
    assert info.value.status == 400 and "finite" in info.value.message
    assert len(info.value.message) < 200
    result = classify(TARGETS["router.generate"], b'{"top_p": 1' + b"0" * 400 + b"}")
    assert result.status == "rejected", result.trace


# --- signed read requests (ReadGuard) -------------------------------------------------------------


def _read_steps(*steps) -> bytes:
    return msgpack.packb([list(s) for s in steps], use_bin_type=True)


def test_read_guard_caps_its_nonces_and_admits_valid_reads_again_once_they_expire():
    """A flood of fresh, valid reads from one key fills its share of the nonce table
    (``TooManyReadsError``), the other key is still served, and once the window has passed
    the same key is admitted again; the table never holds more than its caps."""
    from fuzz_wire_targets import (
        READ_MAX_NONCES,
        READ_MAX_PER_SENDER,
        READ_NOW,
        READ_WINDOW_S,
        _signed_read,
    )

    rng = random.Random(3)

    def read(signer, at, advance=0.0):
        return ("Fetch", _signed_read(signer, "Fetch", "global", -1, at, rng.randbytes(16)),
                advance)  # fmt: skip

    flood = [read(ISLAND, READ_NOW) for _ in range(READ_MAX_PER_SENDER + 1)]
    result = classify(TARGETS["reads"], _read_steps(*flood))
    assert (result.status, result.error) == ("rejected", "TooManyReadsError"), result.trace
    assert f"limit {READ_MAX_PER_SENDER} per reader" in result.message
    both = [read(k, READ_NOW) for k in (ISLAND, AGGREGATOR) * READ_MAX_PER_SENDER]
    later = READ_NOW + 2 * READ_WINDOW_S + 1
    again = [read(ISLAND, READ_NOW), read(ISLAND, later, 2 * READ_WINDOW_S + 1)]
    assert len(both) == READ_MAX_NONCES
    assert classify(TARGETS["reads"], _read_steps(*both, *again[1:])).status == "accepted"
    result = classify(TARGETS["reads"], _read_steps(*both, *again))
    assert (result.status, result.error) == ("rejected", "TooManyReadsError"), result.trace
    assert f"{READ_MAX_NONCES} signed reads" in result.message


def test_read_target_catches_a_guard_that_admits_a_replay(monkeypatch):
    """The target holds the guard to the rules: a guard that forgot its nonces (or admitted
    a read its rules refuse) is a crash, not an accepted input."""
    from fuzz_wire_targets import READ_NOW, _signed_read

    from comms.reads import ReadGuard

    step = ("Subscribe", _signed_read(AGGREGATOR, "Subscribe", "global", 4, READ_NOW,
                                      bytes(range(16))), 0.0)  # fmt: skip
    result = classify(TARGETS["reads"], _read_steps(step, step))
    assert (result.status, result.error) == ("rejected", "ReadDeniedError")
    assert "replayed request" in result.message
    monkeypatch.setattr(ReadGuard, "_remember", lambda self, what, auth, now: None)
    result = classify(TARGETS["reads"], _read_steps(step, step))
    assert (result.status, result.error) == ("crash", "InvariantError")
    assert "admitted a Subscribe that deserves read_replay" in result.message
