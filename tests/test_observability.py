"""Logs, metrics and plots of real daemons on loopback.

A root and a leaf (``aggregator serve``) and an island (``island run``) run as processes with
their stderr in files: every line is one JSON object carrying its daemon's fields (the
island's name, model id, version and step; the root's model id and version on each version it
publishes), and the tools that read those logs (``chaos_checks``, the federation report) find
what they look for. Every ``/metrics`` (root, leaf, island, ``router serve``) parses with
prometheus-client's own parser and follows Prometheus' naming conventions. ``island plot``
draws the run's plots from its records.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.config import AggregatorConfig, MergeConfig, ModelConfig
from comms.config import save_config
from comms.http import url_of
from comms.identity import Identity, Roster
from comms.logs import read_log
from island.config import IslandConfig, SnapshotConfig
from island.daemon import export_initial_parameters
from island.sync import SyncConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import chaos_checks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
TINY = {"d_model": 32, "n_layer": 1, "n_head": 2, "context": 32, "batch_size": 4}
PNG = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- conventions

UNIT_WORDS = {"bytes", "seconds", "ratio", "versions"}
ABBREVIATIONS = {"s", "ms", "us", "sec", "secs", "mb", "kb", "gb", "mib", "kib", "pct", "in",
                 "out", "milliseconds", "minutes", "hours", "megabytes", "kilobytes"}  # fmt: skip


def metric_families(text: str) -> dict:
    """``name -> family``, parsed by prometheus-client; the ``_created`` gauges it writes
    beside counters and histograms are left out."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {n: f for n, f in families.items()
            if not (n.endswith("_created") and n[: -len("_created")] in families)}  # fmt: skip


def convention_problems(families: dict) -> list[str]:
    """Names that break Prometheus' conventions: a counter whose samples lack ``_total``, a
    gauge or histogram named ``_total``, a unit word (bytes, seconds, ...) anywhere but at the
    end, an abbreviated or non-base unit, no help text, no project prefix."""
    problems = []
    for name, f in families.items():
        words = name.split("_")
        if not name.startswith(("archipelago_", "router_")):
            problems.append(f"{name}: no archipelago_ or router_ prefix")
        if not f.documentation:
            problems.append(f"{name}: no help text")
        if f.type == "counter":
            bad = [s.name for s in f.samples if not s.name.endswith(("_total", "_created"))]
            if bad:
                problems.append(f"{name}: counter samples without _total: {bad}")
        elif name.endswith("_total"):
            problems.append(f"{name}: a {f.type} named _total")
        for unit in UNIT_WORDS & set(words[:-1]):
            problems.append(f"{name}: unit {unit!r} is not the name's last word")
        for word in ABBREVIATIONS & set(words):
            problems.append(f"{name}: {word!r} is not a base unit spelt out")
    return problems


def test_the_convention_check_finds_bad_names():
    text = (
        "# HELP archipelago_bytes_in_total B\n# TYPE archipelago_bytes_in_total counter\n"
        "archipelago_bytes_in_total 3\n"
        "# HELP archipelago_queue_total Q\n# TYPE archipelago_queue_total gauge\n"
        "archipelago_queue_total 1\n"
        "# HELP archipelago_tokens_per_s T\n# TYPE archipelago_tokens_per_s gauge\n"
        "archipelago_tokens_per_s 1\n"
        "# HELP archipelago_push_seconds P\n# TYPE archipelago_push_seconds histogram\n"
        'archipelago_push_seconds_bucket{le="+Inf"} 1\narchipelago_push_seconds_count 1\n'
        "archipelago_push_seconds_sum 0.5\n"
    )
    problems = convention_problems(metric_families(text))
    assert len(problems) == 4, problems
    assert any("archipelago_bytes_in: unit 'bytes'" in p for p in problems)
    assert any("'in' is not a base unit" in p for p in problems)
    assert any("archipelago_queue_total: a gauge named _total" in p for p in problems)
    assert any("archipelago_tokens_per_s: 's'" in p for p in problems)


# --------------------------------------------------------------------------- a small run


def _start(args: list[str], log: Path, ready: str):
    logf = open(log, "ab")
    p = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=logf,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    logf.close()
    line = p.stdout.readline().decode()
    if ready not in line:
        p.kill()
        raise RuntimeError(f"{args} did not start: {line!r}; see {log}:\n{log.read_text()[-2000:]}")
    return p, line


def _stop(p, timeout: float = 60) -> int:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
    return p.wait()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _configs(run: Path) -> tuple[IslandConfig, AggregatorConfig]:
    """Keys, roster, theta_0 and the root's config under ``run``; the island's and the leaf's
    (its parent to be set)."""
    for sub in ("keys", "configs", "metrics", "state", "logs"):
        (run / sub).mkdir(parents=True)
    roster = Roster()
    for name, role in (("island0", "island"), ("root", "aggregator"), ("leaf", "aggregator")):
        ident = Identity.generate()
        ident.save(run / "keys" / f"{name}.pem")
        roster.add(ident.public_key, role, name)
    roster.save(run / "roster.json")
    island = IslandConfig(
        name="island0", key=str(run / "keys" / "island0.pem"), roster=str(run / "roster.json"),
        workload="bytelm", workload_config=TINY, steps=100_000, threads=1, eval_batches=1,
        http="127.0.0.1:0", metrics_file=str(run / "metrics" / "island0.jsonl"),
        sync=SyncConfig(model_id="global", every=5, codec="int8"),
        snapshot=SnapshotConfig(dir=str(run / "state" / "island0")),
    )  # fmt: skip
    export_initial_parameters(island, str(run / "init.safetensors"))
    for name, role in (("root", "root"), ("leaf", "leaf")):
        cfg = AggregatorConfig(
            name=name, role=role, key=str(run / "keys" / f"{name}.pem"),
            roster=str(run / "roster.json"), state_dir=str(run / "state" / name),
            http="127.0.0.1:0", merge=MergeConfig(buffer_k=1, deadline_s=5.0),
            models=[ModelConfig("global", init=str(run / "init.safetensors") if role == "root"
                                else "")],
        )  # fmt: skip
        save_config(cfg, run / "configs" / f"{name}.toml")
    return island, cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """root <- leaf <- island0, trained until the root published three versions; every
    daemon's /metrics scraped while they run; then all stopped with SIGTERM."""
    run = tmp_path_factory.mktemp("run")
    island, leaf_config = _configs(run)
    logs = run / "logs"
    procs = []
    try:
        root, line = _start(["aggregator", "serve", str(run / "configs" / "root.toml")],
                            logs / "root.log", "serving on")  # fmt: skip
        procs.append(root)
        root_http = url_of(line.split(" http ")[1].split()[0])
        leaf_config.parent = line.split("serving on ")[1].split()[0]
        save_config(leaf_config, run / "configs" / "leaf.toml")
        leaf, line = _start(["aggregator", "serve", str(run / "configs" / "leaf.toml")],
                            logs / "leaf.log", "serving on")  # fmt: skip
        procs.append(leaf)
        leaf_http = url_of(line.split(" http ")[1].split()[0])
        island.aggregator = line.split("serving on ")[1].split()[0]
        save_config(island, run / "configs" / "island0.toml")
        proc, line = _start(["island", "run", str(run / "configs" / "island0.toml")],
                            logs / "island0.log", "training")  # fmt: skip
        procs.append(proc)
        island_url = line.rsplit(" ", 1)[1].strip()
        deadline = time.time() + 150
        while _root_version(root_http) < 3:
            assert time.time() < deadline, (logs / "island0.log").read_text()[-3000:]
            assert proc.poll() is None, (logs / "island0.log").read_text()[-3000:]
            time.sleep(0.2)
        metrics = {
            "root": _get(f"{root_http}/metrics"),
            "leaf": _get(f"{leaf_http}/metrics"),
            "island": _get(f"{island_url}/metrics"),
        }
        codes = [_stop(p) for p in reversed(procs)]
    finally:
        for p in procs:
            _stop(p, 10)
    yield SimpleNamespace(dir=run, logs=logs, metrics=metrics, codes=codes)


def _root_version(base: str) -> float:
    families = metric_families(_get(f"{base}/metrics"))
    samples = families["archipelago_model_version"].samples
    return max((s.value for s in samples), default=0.0)


def _sample(families: dict, name: str, **labels) -> float:
    """The sum of a family's samples named ``name`` whose labels include ``labels``."""
    family = families[re.sub(r"_(total|bucket|count|sum)$", "", name)]
    return sum(s.value for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())  # fmt: skip


# --------------------------------------------------------------------------- metrics


def test_every_daemon_metrics_page_parses_and_follows_the_conventions(run):
    parsed = {name: metric_families(text) for name, text in run.metrics.items()}
    for name, families in parsed.items():
        assert convention_problems(families) == [], name
    root, leaf, island = parsed["root"], parsed["leaf"], parsed["island"]
    assert _sample(root, "archipelago_updates_accepted_total", kind="partial") >= 3
    assert _sample(root, "archipelago_model_version", model_id="global") >= 3
    assert _sample(leaf, "archipelago_updates_accepted_total", kind="delta") >= 3
    assert _sample(leaf, "archipelago_received_bytes_total") > 0
    assert _sample(leaf, "archipelago_sent_bytes_total") > 0  # partials and versions
    assert _sample(leaf, "archipelago_update_staleness_versions_count") >= 3
    assert _sample(leaf, "archipelago_partials_sent_total") >= 3
    assert _sample(island, "archipelago_island_sent_bytes_total", island="island0") > 0
    assert _sample(island, "archipelago_island_received_bytes_total", island="island0") > 0
    assert 0 < _sample(island, "archipelago_island_utilization_ratio") <= 1
    assert _sample(island, "archipelago_island_step") >= 15
    assert island["archipelago_island_staleness_versions"].type == "gauge"


def test_router_serve_metrics_parse_and_its_logs_are_json(tmp_path):
    import torch

    from router import Client
    from router.checkpoint import build_workload_model, save_expert, save_router
    from router.models import PrefixRouter

    identity = Identity.generate()
    model = {k: TINY[k] for k in ("d_model", "n_layer", "n_head", "context")}
    experts = []
    for k in range(2):
        save_expert(
            tmp_path / f"e{k}", build_workload_model("bytelm", model, seed=k), workload="bytelm",
            workload_config=model, expert_id=f"e{k}", cluster=k, identity=identity,
        )  # fmt: skip
        experts.append(str(tmp_path / f"e{k}"))
    torch.manual_seed(0)
    save_router(
        tmp_path / "router", PrefixRouter(2, d_model=16, n_layers=1, context=32), "prefix",
        {"d_model": 16, "n_layers": 1, "context": 32}, 2, identity=identity, workload="bytelm",
    )  # fmt: skip
    serve = tmp_path / "serve.toml"
    serve.write_text(f'listen = "127.0.0.1:0"\nexperts = {json.dumps(experts)}\n'
                     f'router = "{tmp_path / "router"}"\n[limits]\nmax_new_bytes = 8\n')  # fmt: skip
    log = tmp_path / "router.log"
    proc, line = _start(["router", "serve", str(serve), "--log-level", "debug"], log, "serving")
    try:
        url = line.rsplit(" ", 1)[1].strip()
        Client(url, timeout=30).generate("hi", max_bytes=8, seed=0)
        families = metric_families(_get(url + "/metrics"))
    finally:
        assert _stop(proc) == 0
    assert convention_problems(families) == []
    assert _sample(families, "router_requests_total", endpoint="/v1/generate", status="200") == 1
    assert _sample(families, "router_generated_bytes_total") == 8
    assert _sample(families, "router_request_seconds_count", endpoint="/v1/generate") == 1
    lines = log.read_text().splitlines()
    assert lines, "router serve logged nothing at debug level"
    for text in lines:
        doc = json.loads(text)
        assert {"time", "level", "logger", "message"} <= doc.keys(), text


# --------------------------------------------------------------------------- logs


def _json_lines(path: Path) -> list[dict]:
    out = []
    for text in path.read_text().splitlines():
        doc = json.loads(text)  # every line one JSON object: raises on anything else
        assert {"time", "level", "logger", "message"} <= doc.keys(), text
        out.append(doc)
    return out


def test_an_islands_round_records_are_fields_of_its_json_log_lines(run):
    """Each round's record is the line's own fields (``record = "round"``), equal to the
    record in the island's metrics file, with a readable message instead of JSON text."""
    rounds = [d for d in _json_lines(run.logs / "island0.log") if d.get("record") == "round"]
    written = [
        json.loads(t) for t in (run.dir / "metrics" / "island0.jsonl").read_text().split("\n") if t
    ]
    assert len(rounds) >= 3 and len(rounds) == len(written)
    for logged, record in zip(rounds, written, strict=True):
        assert logged["message"] == f"round {record['round']} recorded at step {record['step']}"
        assert {k: logged.get(k) for k in record} == record  # a None is left off the line
        assert isinstance(logged["round"], int) and isinstance(logged["train_loss"], float)
        assert isinstance(logged["bytes_sent"], int) and 0 <= logged["utilization"] <= 1
    assert [d["round"] for d in rounds] == list(range(1, len(rounds) + 1))


def test_daemon_logs_are_json_lines_with_their_fields(run):
    assert run.codes == [0, 0, 0]  # island, leaf, root each stopped cleanly by SIGTERM
    island = _json_lines(run.logs / "island0.log")
    assert all(d["island"] == "island0" and d["model_id"] == "global" for d in island)
    assert all(isinstance(d["step"], int) for d in island)
    pushes = [d for d in island if "accepted (staleness" in d["message"]]
    assert len(pushes) >= 3
    assert all(isinstance(d["version"], int) for d in pushes)  # from the sync engine's thread
    assert [d["step"] for d in pushes] == sorted(d["step"] for d in pushes)
    assert max(d["step"] for d in pushes) >= 15

    root = _json_lines(run.logs / "root.log")
    assert all(d["aggregator"] == "root" and d["role"] == "root" for d in root)
    published = [d for d in root if re.match(r"root: version \d+ of global from", d["message"])]
    assert [d["version"] for d in published] == list(range(1, len(published) + 1))
    assert all(d["model_id"] == "global" for d in published)
    leaf = _json_lines(run.logs / "leaf.log")
    assert all(d["aggregator"] == "leaf" and d["role"] == "leaf" for d in leaf)
    assert any(d.get("model_id") == "global" and "replica" in d["message"] for d in leaf)

    # the tools that read daemon logs read these
    text = (run.logs / "root.log").read_text()
    assert chaos_checks.read_published(run.logs / "root.log", "global") == [
        d["version"] for d in published
    ]
    from island.plots import staleness_from_log, version_times

    assert len(staleness_from_log((run.logs / "island0.log").read_text())) == len(pushes)
    (first,) = read_log(text, lambda d: d["message"].startswith("root: version 1 of "))
    times = version_times(text, first["time"])  # epoch seconds, read from its ISO time
    assert sorted(times) == [0, *range(1, len(published) + 1)]
    assert times[1] == pytest.approx(0.0, abs=1e-6) and times[len(published)] > 0


def test_text_on_a_terminal_json_elsewhere_and_a_forced_format(tmp_path):
    import io
    import logging

    from comms.logs import log_context, setup_logging

    log = logging.getLogger("archipelago.test")
    master, replica = os.openpty()
    tty = open(replica, "w")  # a terminal: readable text
    piped = io.StringIO()  # not a terminal: JSON
    try:
        for stream in (tty, piped):
            handler = setup_logging("info", stream)
            step = iter(range(10, 100))
            with log_context(island="island7", step=lambda s=step: next(s)):
                log.info("round %d done", 3, extra={"version": 5})
            log.debug("below the level")
            logging.getLogger().removeHandler(handler)
        tty.flush()
        shown = os.read(master, 4096).decode()
    finally:
        tty.close()
        os.close(master)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO archipelago\.test: round 3 done  "
        r"island=island7 step=10 version=5\r?\n",
        shown,
    ), shown
    (doc,) = [json.loads(x) for x in piped.getvalue().splitlines()]
    assert doc["message"] == "round 3 done" and doc["level"] == "INFO"
    assert (doc["island"], doc["step"], doc["version"]) == ("island7", 10, 5)
    # both read back alike
    back = read_log(shown + piped.getvalue())
    assert [d["message"].split("  ")[0] for d in back] == ["round 3 done"] * 2
    assert abs(back[0]["time"] - back[1]["time"]) < 5


def test_levels_keep_their_standard_names_after_hivemind_renames_warning():
    import io
    import logging

    import hivemind.utils.logging  # noqa: F401  (as comms.discovery does: WARNING -> "WARN")

    from comms.logs import setup_logging

    assert logging.getLevelName(logging.WARNING) == "WARN"
    for fmt in ("json", "text"):
        stream = io.StringIO()
        handler = setup_logging("info", stream, fmt)
        logging.getLogger("archipelago.test").warning("a warning")
        logging.getLogger().removeHandler(handler)
        (line,) = read_log(stream.getvalue())
        assert line["level"] == "WARNING", stream.getvalue()


def test_every_command_takes_the_log_options_and_text_can_be_forced(run):
    from aggregator.cli import build_parser as aggregator_parser
    from island.cli import build_parser as island_parser
    from router.cli import build_parser as router_parser

    commands = [island_parser(), ["run", "c"], ["keygen", "k"], ["init", "c", "--out", "o"],
                ["status", "u"], ["plot", "d"], aggregator_parser(), ["serve", "c"],
                ["tls", "init", "d"], router_parser(), ["partition", "c"], ["train", "c"],
                ["eval", "c"], ["serve", "c"]]  # fmt: skip
    for item in commands:
        if not isinstance(item, list):
            parser = item
            continue
        args = parser.parse_args([*item, "--log-level", "debug", "--log-format", "text"])
        assert (args.log_level, args.log_format) == ("debug", "text"), item
    # a restarted root with --log-format text writes text into its file, read back alike
    log = run.logs / "root-text.log"
    root, _ = _start(["aggregator", "serve", str(run.dir / "configs" / "root.toml"),
                      "--log-format", "text"], log, "serving on")  # fmt: skip
    assert _stop(root) == 0
    lines = log.read_text().splitlines()
    assert lines and not any(x.startswith("{") for x in lines)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) aggregator", lines[0]), (
        lines[0]
    )
    assert any("aggregator=root role=root" in x for x in lines)
    assert len(read_log(log.read_text())) == len(lines)


JSON_ERROR = '{"time": "2026-12-04T07:00:00.000Z", "level": "ERROR", "logger": "a", "message": "m"}'
JSON_WARNING_WITH_TRACEBACK = (
    '{"time": "2026-12-04T07:00:00.000Z", "level": "WARNING", "logger": "a", "message": "m", '
    '"exc": "Traceback (most recent call last): ..."}'
)
JSON_INFO = (
    '{"time": "2026-12-04T07:00:00.000Z", "level": "INFO", "logger": "island.daemon", '
    '"message": "island0: resumed from /r/snap-0000000040 at step 40", "island": "island0"}'
)
TEXT_INFO = (
    "2026-12-04 07:00:00,000 WARNING island.daemon: island0: resumed from /r/snap at step 25  "
    "island=island0 step=25"
)


@pytest.mark.parametrize(
    ("line", "error"),
    [(JSON_ERROR, True), (JSON_WARNING_WITH_TRACEBACK, True), (JSON_INFO, False),
     ("2026-12-04 07:00:00,000 ERROR aggregator.service: x", True), (TEXT_INFO, False),
     ("Traceback (most recent call last):", True)],
)  # fmt: skip
def test_the_soak_finds_error_lines_in_either_format(line, error):
    import soak

    assert soak.error_line(line) is error


def test_chaos_reads_the_resumed_step_from_either_format(tmp_path):
    import chaos_procs

    log = tmp_path / "island0.log"
    log.write_text(f"{TEXT_INFO}\n{JSON_ERROR}\n")
    assert chaos_procs.resumed_step(log) == 25
    log.write_text(f"{TEXT_INFO}\n{JSON_INFO}\n")  # the newest run's
    assert chaos_procs.resumed_step(log) == 40


# --------------------------------------------------------------------------- plots


def test_island_plot_draws_the_runs_plots_from_its_records(run):
    out = run.dir / "drawn"
    proc = subprocess.run(
        [sys.executable, "-m", "island", "plot", str(run.dir), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(figures["plots"]) == {"val_loss", "val_loss_time", "bytes", "utilization",
                                     "staleness"}  # fmt: skip
    for path in figures["plots"].values():
        data = Path(path).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, path
    records = [
        json.loads(x) for x in (run.dir / "metrics" / "island0.jsonl").read_text().splitlines()
    ]
    acks = [
        json.loads(x)
        for x in (run.dir / "state" / "island0" / "acks.jsonl").read_text().splitlines()
    ]
    assert figures["islands"] == ["island0"]
    assert figures["records"] == {"island0": len(records)}
    # the loss over time is on the records' wall clock, from the island's start: the earliest
    # wall_time - t of its records (both are rounded to the millisecond, so each record's
    # difference may be a millisecond off the first's)
    start = min(r["wall_time"] - r["t"] for r in records)
    assert figures["shared_clock"] is True
    expected = [(r["wall_time"] - start, r["val_loss"]) for r in records
                if r.get("val_loss") is not None]  # fmt: skip
    drawn = figures["loss_over_time"]["island0"]
    assert [v for _, v in drawn] == [v for _, v in expected]
    assert [t for t, _ in drawn] == pytest.approx([t for t, _ in expected])
    assert figures["steps"] == [records[-1]["step"]]
    assert figures["bytes_sent"] == [records[-1]["bytes_sent"]]
    assert figures["staleness"]["island0"] == [int(a["staleness"]) for a in acks
                                               if a["status"] == "accepted"]  # fmt: skip
    params = sum(p.numel() for p in _model_params())
    assert figures["params"] == params
    # a single island: a ring all-reduce sends nothing
    assert figures["ddp_equivalent_bytes"] == [0.0]


def test_run_figures_compare_only_pushing_islands_with_data_parallel(tmp_path):
    """Two local-update islands and an expert: a ring all-reduce over the two moves
    2 (2 - 1) / 2 x 4 bytes x 100 parameters = 400 bytes per island per step."""
    from island.plots import read_run, run_figures

    (tmp_path / "metrics").mkdir()
    rows = {
        "island0": [{"t": 1.0, "island": "island0", "step": 10, "bytes_sent": 50, "staleness": 0},
                    {"t": 2.0, "island": "island0", "step": 20, "bytes_sent": 90, "staleness": 1}],
        "island1": [{"t": 1.5, "island": "island1", "step": 5, "bytes_sent": 40, "staleness": 2}],
        "expert0": [{"t": 3.0, "island": "expert0", "step": 30, "val_loss": 2.5}],
    }  # fmt: skip
    for name, records in rows.items():
        text = "".join(json.dumps(r) + "\n" for r in records)
        (tmp_path / "metrics" / f"{name}.jsonl").write_text(text + '{"t": 4, "isl')  # torn
    f = run_figures(read_run(tmp_path), params=100)
    assert f["islands"] == ["expert0", "island0", "island1"]
    assert f["steps"] == [30, 20, 5] and f["bytes_sent"] == [None, 90, 40]
    assert f["ddp_equivalent_bytes"] == [None, 8000.0, 2000.0]
    assert f["staleness"] == {"expert0": [], "island0": [0, 1], "island1": [2]}


def test_island_plot_lines_islands_up_on_the_wall_clock(tmp_path):
    """island1 started 5 s after island0 and was resumed at wall second 120 (its ``t`` starts
    again at 0): its points sit at their wall-clock seconds after island0's start, not at its
    own ``t``. Records without a wall clock (an older run) keep their own seconds."""
    from island.plots import loss_over_time, read_run, render_run

    (tmp_path / "m").mkdir()
    rows = {
        "island0": [{"t": 10.0, "wall_time": 110.0, "island": "island0", "step": 5, "val_loss": 3.0},
                    {"t": 30.0, "wall_time": 130.0, "island": "island0", "step": 9, "val_loss": 2.5}],
        "island1": [{"t": 10.0, "wall_time": 115.0, "island": "island1", "step": 4, "val_loss": 3.1},
                    {"t": 2.0, "wall_time": 122.0, "island": "island1", "step": 6},
                    {"t": 8.0, "wall_time": 128.0, "island": "island1", "step": 7, "val_loss": 2.7}],
    }  # fmt: skip
    for name, records in rows.items():
        (tmp_path / "m" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                              for r in records))  # fmt: skip
    points, shared = loss_over_time(read_run(tmp_path))
    assert shared is True
    assert points == {"island0": [(10.0, 3.0), (30.0, 2.5)],
                      "island1": [(15.0, 3.1), (28.0, 2.7)]}  # fmt: skip
    figures = render_run(tmp_path, tmp_path / "out")
    assert Path(figures["plots"]["val_loss_time"]).read_bytes().startswith(PNG)

    for records in rows.values():
        for r in records:
            del r["wall_time"]
    (tmp_path / "old").mkdir()
    for name, records in rows.items():
        (tmp_path / "old" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                                for r in records))  # fmt: skip
    points, shared = loss_over_time(read_run(tmp_path / "old"))
    assert shared is False
    assert points == {"island0": [(10.0, 3.0), (30.0, 2.5)],
                      "island1": [(10.0, 3.1), (8.0, 2.7)]}  # fmt: skip


def _model_params():
    from island.workloads import get_workload

    return get_workload("bytelm", **TINY).build_model(0).parameters()


def test_island_plot_says_what_is_missing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "island", "plot", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert f"island plot: {tmp_path}: no island round records" in proc.stderr
    assert "Traceback" not in proc.stderr
