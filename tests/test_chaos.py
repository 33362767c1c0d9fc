"""The chaos harness (scripts/chaos.py): its invariant checks go red on broken records, and a
short run with kills across roles, aimed fault points and supervisor restarts passes them.

The run (marked slow) starts a root with a DHT, two leaves and four islands as real processes,
kills an island, a leaf and the root with kill -9 at seeded random times, lets fault points
kill a leaf between its WAL append and the ack, an island after its push was acknowledged and
the root between its state and its WAL mark, restarts each as systemd would, and then checks
the daemons' records: every acknowledged update in exactly one version, the root's theta equal
to theta_0 plus every u_v, replicas and island anchors bit-identical at their versions,
versions only increasing, nothing left behind. About 90 s on the shared two-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import chaos_checks as checks  # noqa: E402

A, B = "a" * 64, "b" * 64


def ack(sender: str, seq: int, status: str = "accepted") -> dict:
    return {"sender": sender, "sequence": seq, "status": status, "steps": 10}


def test_acks_exactly_once_holds_and_goes_red():
    contributors = {1: [[A, 1], [B, 1]], 2: [[A, 2]]}
    acks = [ack(A, 1), ack(B, 1), ack(A, 2, "replayed"), ack(B, 2, "stale")]
    assert checks.check_acks_exactly_once(acks, contributors) == []
    lost = checks.check_acks_exactly_once([*acks, ack(B, 3)], contributors)
    assert len(lost) == 1 and "in no version (lost)" in lost[0]
    twice = checks.check_acks_exactly_once(acks, {**contributors, 3: [[A, 2]]})
    assert len(twice) == 1 and "in 2 versions [2, 3]" in twice[0]


def test_versions_increase_goes_red_on_gaps_bad_headers_and_republished_versions():
    good = [(1, 1, 0), (2, 2, 1), (3, 3, 2)]
    assert checks.check_versions_increase(good, [1, 2, 3]) == []
    assert checks.check_versions_increase(good[:1] + good[2:], [1, 3])  # a hole in the store
    assert checks.check_versions_increase([(1, 1, 0), (2, 2, 0)], [1, 2])  # wrong base
    assert checks.check_versions_increase(good, [1, 2, 2, 3])  # version 2 published twice
    assert checks.check_versions_increase(good, [1, 3, 2])  # backwards


def test_island_versions_reset_per_incarnation_only():
    run = [{"t": 1, "version": 1}, {"t": 2, "version": 3}]
    assert checks.check_island_versions([*run, {"t": 0.5, "version": 2}], "i") == []  # restart
    assert checks.check_island_versions([*run, {"t": 3, "version": 2, "step": 60}], "i")


def test_root_theta_and_replicas_are_compared_bit_for_bit():
    rng = np.random.default_rng(0)
    theta0 = {"w": rng.standard_normal(5).astype(np.float32)}
    updates = [{"w": rng.standard_normal(5).astype(np.float32) * 1e-3} for _ in range(3)]
    thetas = checks.rebuild_thetas(theta0, updates)
    theta = {"w": theta0["w"].copy()}
    for u in updates:
        theta["w"] += u["w"]
    assert checks.check_root_theta(thetas, 3, checks.digest(theta)) == []
    off = {"w": theta["w"].copy()}
    off["w"][2] = np.nextafter(off["w"][2], np.float32(1))  # one ulp
    assert checks.check_root_theta(thetas, 3, checks.digest(off))
    assert checks.check_root_theta(thetas, 2, checks.digest(theta))  # state behind the store
    assert checks.check_replicas(thetas, [("leaf", 3, checks.digest(theta))]) == []
    assert checks.check_replicas(thetas, [("leaf", 3, checks.digest(off))])
    assert checks.check_replicas(thetas, [("island", 4, checks.digest(theta))])  # unpublished


def test_loss_and_leftovers():
    assert checks.check_loss(2.0, 2.05) == []
    assert checks.check_loss(2.07, 2.0)  # 3.5% worse
    assert checks.check_loss(float("nan"), None)
    assert checks.check_leftovers([], []) == []
    assert len(checks.check_leftovers(["123 p2pd"], ["/tmp/hivemind-p2pd-x.sock"])) == 2


def test_a_process_on_its_way_out_is_not_left_behind_and_one_that_stays_is():
    """The leftover scan finds the run's processes by their marker, gives one that exits soon
    (torch_shm_manager after its last client) its grace, and reports one that stays."""
    from chaos_procs import RUN_ENV, lingering_processes

    run_id = f"test-{os.getpid()}"
    env = {**os.environ, RUN_ENV: run_id}
    exiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"], env=env)
    staying = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        time.sleep(0.3)  # both started (their environment is readable)
        stays = lingering_processes(run_id, grace_s=3.0)
        assert [p.split()[0] for p in stays] == [str(staying.pid)], stays
        assert exiting.poll() == 0
    finally:
        staying.kill()
        staying.wait()
        exiting.wait()
    assert lingering_processes(run_id, grace_s=1.0) == []


def test_restart_progress_is_the_first_one_seen_and_later_polls_do_not_move_it():
    """Restart-to-first-version is the root's first published version after its restart: the
    supervisor polls a root on (it has no acks), and a later poll must not move the mark to
    the poll's time. Restart-to-first-push likewise for an island; an ack from before the
    restart does not count."""
    from chaos_procs import Incarnation, note_island_progress, note_root_progress

    root = Incarnation(start=100.0, wall_start=1000.0)
    note_root_progress(root, [], 101.0)
    assert root.first_progress is None
    note_root_progress(root, [12], 102.5)
    note_root_progress(root, [12, 13], 120.0)
    assert root.first_progress == 102.5

    island = Incarnation(start=100.0, wall_start=1000.0)
    old = {**ack(A, 4), "t": 999.0}
    replayed = {**ack(A, 5, "replayed"), "t": 1001.0}
    note_island_progress(island, [old, replayed], 103.0)
    assert (island.first_ack, island.first_progress) == (103.0, None)
    note_island_progress(island, [old, replayed, {**ack(A, 6), "t": 1005.0}], 106.0)
    note_island_progress(island, [old, replayed, {**ack(A, 7), "t": 1009.0}], 110.0)
    assert (island.first_ack, island.first_progress) == (103.0, 106.0)


def test_torn_ack_log_line_is_skipped(tmp_path):
    path = tmp_path / "acks.jsonl"
    path.write_text(json.dumps(ack(A, 1)) + "\n" + '{"sender": "a", "seq')
    assert checks.read_jsonl(path) == [ack(A, 1)]


@pytest.mark.parametrize(("spec", "killed"), [("x@3", False), ("x@2", True), ("x", True)])
def test_fault_point_fires_at_its_visit(spec, killed):
    code = "from comms.faults import fault_point\nfault_point('x'); fault_point('y')\n"
    code += "fault_point('x')\nprint('alive')"
    env = {**os.environ, "ARCHIPELAGO_FAULT": spec, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert (p.returncode == -signal.SIGKILL) == killed
    assert (b"alive" in p.stdout) != killed


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_short_chaos_run_passes_every_check(tmp_path):
    out = tmp_path / "chaos"
    argv = [
        sys.executable, str(REPO / "scripts" / "chaos.py"), "--scenarios", "aimed",
        "--small", "--steps", "320", "--every", "20", "--slowdown", "6", "--aimed-random-kills", "3", "--kill-start", "6",
        "--kill-span", "10", "--aimed-set", "fast", "--eval-batches", "4",
        "--out", str(out), "--json", str(tmp_path / "chaos.json"),
    ]  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=380, cwd=REPO)
    assert (tmp_path / "chaos.json").exists(), p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads((tmp_path / "chaos.json").read_text())["results"][0]
    assert result["problems"] == {k: [] for k in result["problems"]}, p.stdout[-3000:]
    assert result["unexpected_exits"] == []
    fired = {e["fault"].split("@")[0] for e in result["faults_fired"]}
    assert {"leaf.after_wal_append", "island.after_ack", "root.before_mark"} <= fired, result
    assert sum(result["kills"].values()) >= 5, result["kills"]
    assert result["versions"] > 0 and result["acked_updates"] > 0
    assert p.returncode == 0
