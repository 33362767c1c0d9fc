"""`island run` with `[sync] fragments = 2` (streamed fragments, island.fragmented) against a
real `aggregator serve` root that serves the two fragment lines: pushes in turn to both, each
fragment's anchor is the root's theta of its line bit for bit, the status page and the
validation loss see every fragment, a kill -9 resumes each fragment at its version, and the
settings fragments cannot be combined with are ConfigErrors."""

import asyncio
import json
import shutil
import signal
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.numpy import load_file
from test_island_daemon import (
    _admin,
    _federation,
    _root_theta,
    _start,
    _start_root,
    _stop,
    _theta_at,
)

from comms.config import config_from_dict, save_config
from comms.errors import ConfigError
from comms.fragments import fragment_model_id, fragment_of
from island.config import IslandConfig
from island.daemon import Island, params_digest
from island.distributed import RankGroup
from island.fragmented import check_snapshot_fragments
from island.pseudo import load_numpy_into
from island.snapshot import latest_complete, read_snapshot
from island.snapshot.format import snapshot_dirs

pytestmark = pytest.mark.timeout(240)
LINES = [fragment_model_id("global", p) for p in range(2)]


def _fragment_theta0(tmp_path) -> list[dict]:
    """theta_0 of each fragment line: the root's cut of its init file."""
    theta0 = load_file(str(tmp_path / "init.safetensors"))
    sizes = {k: v.size for k, v in theta0.items()}
    return [{k: theta0[k] for k in fragment_of(sizes, p, 2)} for p in range(2)]


def _assert_roots_bits(address, reader, theta0s, anchor, versions) -> None:
    """Each fragment's part of ``anchor`` at ``versions[p]`` is its line's theta there, bit for
    bit, and ``anchor`` holds nothing else."""
    assert sorted(anchor) == sorted(k for t in theta0s for k in t)
    for p, (theta0, version) in enumerate(zip(theta0s, versions, strict=True)):
        theta = asyncio.run(_theta_at(address, theta0, version, reader, LINES[p]))
        for name, value in theta.items():
            assert anchor[name].tobytes() == value.tobytes(), (p, name)


def _pushes(first: int, every: int, steps: int) -> int:
    """Rounds a fragment pushes in ``steps`` steps: boundaries at first, first + every, ...,
    and the partial round after the last one."""
    boundaries = range(first, steps + 1, every)
    return len(boundaries) + (not boundaries or boundaries[-1] != steps)


def test_an_island_streams_two_fragments_bit_identical_with_the_root(tmp_path):
    """H = 4, two fragments: fragment 0 pushes after 2 steps and fragment 1 after 4 (their ack
    records), /status shows both lines' versions and staleness, each fragment's anchor is its
    line's theta at its version, and the last validation loss is the union of the anchors'."""
    (cfg,) = _federation(tmp_path, 1, steps=100_000, every=4, fragments=2)
    root, address, _ = _start_root(tmp_path)
    cfg.aggregator = address
    island = Island(cfg)
    thread = threading.Thread(target=island.run, daemon=True)
    thread.start()
    try:
        assert island.ready.wait(60)
        deadline = time.time() + 90
        while min(island.lu.versions) < 2 and time.time() < deadline:
            time.sleep(0.05)
        status = json.loads(
            urllib.request.urlopen(f"http://{island.http_address}/status", timeout=10).read()
        )
        assert [f["model_id"] for f in status["fragments"]] == LINES
        for f in status["fragments"]:
            assert f["version"] >= 2 and f["staleness"] >= 0 and f["bytes_sent"] > 0
        assert status["version"] == min(f["version"] for f in status["fragments"])
        metrics = urllib.request.urlopen(f"http://{island.http_address}/metrics", timeout=10)
        text = metrics.read().decode()
        for m in LINES:
            assert f'archipelago_island_fragment_version{{island="island0",model_id="{m}"}}' in text
    finally:
        island.stop()
        thread.join(90)
    try:
        assert not thread.is_alive()
        acks = [json.loads(x) for x in (tmp_path / "snap0" / "acks.jsonl").read_text().split("\n")
                if x]  # fmt: skip
        first = {m: next(a for a in acks if a["model_id"] == m) for m in LINES}
        assert first[LINES[0]]["steps"] == 2 and first[LINES[1]]["steps"] == 4  # the stagger
        assert all(a["status"] == "accepted" for a in acks)
        reader = _admin(tmp_path)
        versions = island.lu.versions
        for p, m in enumerate(LINES):  # each line merged this island's pushes, its tensors only
            version, theta = asyncio.run(_root_theta(address, reader, m))
            assert version >= versions[p] >= 2
            assert sorted(theta) == sorted(island.lu.updates[p].anchor)
        theta0s = _fragment_theta0(tmp_path)
        _assert_roots_bits(address, reader, theta0s, island.lu.anchor, versions)
        last = [json.loads(x) for x in open(cfg.metrics_file)][-1]
        assert [f["model_id"] for f in last["fragments"]] == LINES
        model = island.workload.build_model(cfg.seed)
        load_numpy_into(model, island.lu.anchor)
        want = island.workload.validation_loss(model, max_batches=cfg.eval_batches)
        assert last["val_loss"] == pytest.approx(want, rel=1e-6)
    finally:
        _stop(root)


def _fragments_apart(directory: str) -> bool:
    """True when the newest complete snapshot has fragments at different versions (where a
    resume that gave one fragment's version to another shows), after round 3."""
    try:
        meta = read_snapshot(latest_complete(directory)).meta
    except Exception:  # none yet, or rotated away while read: look again
        return False
    versions = meta["base_versions"]
    return meta["round"] >= 3 and len(set(versions)) == len(versions)


def _assert_whole_rounds(acks_path, every: int) -> None:
    """Every push of both runs holds a whole round of ``every`` steps, except fragment 0's
    first (every / 2: the stagger) and each line's last (the partial round at the end): a
    fragment mid-round at the snapshot went on with its round after the restart."""
    acks = [json.loads(x) for x in open(acks_path)]
    for m in LINES:
        pushes = sorted((a["sequence"], a["steps"]) for a in acks if a["model_id"] == m)
        last = pushes[-1][0]
        for sequence, steps in pushes:
            if sequence == 1 and m == LINES[0]:
                assert steps == every // 2, (m, pushes)
            elif sequence != last:
                assert steps == every, (m, pushes)


def _kill_came_when_fragments_were_apart(directory: str) -> None:
    """Remove the snapshots written after the newest one with fragments apart, as if the kill
    had come before them (the island then resumes from that one, and pushes again the rounds
    it pushed after it: replays, accepted once)."""
    for _, path in snapshot_dirs(Path(directory)):
        if _fragments_apart(str(path.parent)):
            return
        shutil.rmtree(path)
    raise AssertionError("no snapshot with the fragments at different versions")


def test_a_fragmented_island_killed_with_sigkill_resumes_each_fragment(tmp_path):
    """kill -9, then a restart: the snapshot holds every fragment's version and its anchor is
    each line's theta there; the restarted island trains from those versions, pushes every
    fragment's rounds once (a replayed round is not a second update: each line's version
    count is an uninterrupted run's) and ends bit-identical with the root."""
    every = 4
    (cfg,) = _federation(tmp_path, 1, steps=400, every=every, fragments=2)
    root, address, _ = _start_root(tmp_path)
    cfg.aggregator = address
    save_config(cfg, tmp_path / "island.toml")
    reader, theta0s = _admin(tmp_path), _fragment_theta0(tmp_path)
    try:
        p, _ = _start(["island", "run", str(tmp_path / "island.toml")], tmp_path / "island.log",
                      "training")  # fmt: skip
        metrics = tmp_path / "island0.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not _fragments_apart(cfg.snapshot.dir):
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        _kill_came_when_fragments_were_apart(cfg.snapshot.dir)
        before = [json.loads(x) for x in metrics.read_text().splitlines()]
        snap = latest_complete(cfg.snapshot.dir)
        assert snap is not None
        state = read_snapshot(snap)
        snap_step, versions = int(state.meta["step"]), state.meta["base_versions"]
        assert state.meta["fragments"] == 2 and snap_step % (every // 2) == 0
        _assert_roots_bits(address, reader, theta0s, state.anchor, versions)

        cfg.steps = max(r["step"] for r in before) + 2 * every + 1  # ends mid-round for both
        save_config(cfg, tmp_path / "island.toml")
        p, _ = _start(["island", "run", str(tmp_path / "island.toml")], tmp_path / "island.log",
                      "training")  # fmt: skip
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, (tmp_path / "island.log").read_text()[-3000:]
        log = (tmp_path / "island.log").read_text()
        assert f"resumed from {snap} at step {snap_step}" in log
        for m, v in zip(LINES, versions, strict=True):
            assert f"model {m}: training from global version {v}" in log
        after = [json.loads(x) for x in metrics.read_text().splitlines()][len(before) :]
        assert after[0]["step"] == snap_step + every // 2  # the stagger goes on
        summary = json.loads(out.decode().strip().splitlines()[-1])
        assert summary["step"] == cfg.steps
        for p_, m in enumerate(LINES):  # K = 1: one version per round pushed, each once
            version, _ = asyncio.run(_root_theta(address, reader, m))
            assert version == _pushes(every * (p_ + 1) // 2, every, cfg.steps), m
        _assert_whole_rounds(tmp_path / "snap0" / "acks.jsonl", every)
        final = [f["version"] for f in summary["fragments"]]
        rebuilt = {}
        for p_, v in enumerate(final):
            rebuilt.update(asyncio.run(_theta_at(address, theta0s[p_], v, reader, LINES[p_])))
        assert params_digest(rebuilt) == summary["anchor_digest"]
    finally:
        _stop(root)


def _config(**sync) -> IslandConfig:
    """An island config read as `island run` reads its file (nested tables validated)."""
    doc = {"name": "i", "aggregator": "127.0.0.1:1", "sync": {"model_id": "m", **sync}}
    return config_from_dict(IslandConfig, doc, "island.toml")


@pytest.mark.parametrize(
    "sync, match",
    [
        ({"fragments": 0}, "sync: fragments: a whole number >= 1"),
        ({"fragments": 2, "every_s": 1.0}, "instead of every_s"),
        ({"fragments": 2, "every": 4, "auto": True}, "not with auto"),
        ({"fragments": 5, "every": 4}, r"every \(4\) must be at least fragments \(5\)"),
    ],
)
def test_fragments_with_settings_they_do_not_combine_with_are_config_errors(sync, match):
    with pytest.raises(ConfigError, match=match):
        _config(**sync)
    _config(fragments=2, every=4)  # and without them it loads


def test_fragments_outside_a_single_process_local_update_island_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="for local_update mode"):
        replace(_config(fragments=2), mode="expert").validate()
    cfg = _config(fragments=2)
    cfg.expert.output, cfg.expert.partition, cfg.expert.cluster = "out", "part", 0
    with pytest.raises(ConfigError, match=r"expert\.output"):
        cfg.validate()

    class TwoRanks(RankGroup):
        world_size = 2

    with pytest.raises(ConfigError, match="not supported on a multi-rank island"):
        Island(_config(fragments=2), group=TwoRanks())


def test_more_fragments_than_tensors_and_a_root_without_the_lines_are_config_errors(tmp_path):
    """The model's tensor count bounds fragments (the error says how many it has); a root
    serving the whole model but not the fragment lines is named line by line."""
    (cfg,) = _federation(tmp_path, 1, steps=4, every=64)
    root, cfg.aggregator, _ = _start_root(tmp_path)
    cfg.snapshot.dir, cfg.http = "", ""
    try:
        cfg.sync.fragments = 64
        with pytest.raises(ConfigError, match=r"sync\.fragments = 64: the model has \d+ param"):
            Island(cfg).run()
        cfg.sync.fragments = 2
        with pytest.raises(ConfigError, match=r"serves no model line global\.f0, global\.f1"):
            Island(cfg).run()
    finally:
        _stop(root)


def test_a_snapshot_of_another_fragment_count_is_a_config_error():
    check_snapshot_fragments({"fragments": 2}, 2)
    check_snapshot_fragments({}, 1)  # a snapshot without fragments
    with pytest.raises(ConfigError, match=r"taken with 2; resume with sync\.fragments = 2"):
        check_snapshot_fragments({"fragments": 2}, 1)
    with pytest.raises(ConfigError, match=r"sync\.fragments = 3, but .* taken with 1"):
        check_snapshot_fragments({}, 3)
