"""A full disk: what cannot be made durable is not acknowledged, the refusal says why, nothing
acknowledged is lost, the daemon lives on and takes pushes again once space returns.

The service tests mount a small tmpfs as the state directory (root only: CI runs as root);
the WAL test injects the same failure with a tiny RLIMIT_FSIZE in a subprocess, which needs
no privilege."""

import asyncio
import errno
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
from aggtools import delta_bytes, hand_versions, make_federation, random_delta

from aggregator.service import AggregatorService
from comms.envelope import Envelope
from comms.errors import LinkError
from comms.transport import TransportClient

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"w": (128, 128), "b": (128,)}  # 64 KiB of theta: its state takes ~200 KiB


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs mounted at tmp_path/"small", unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(
            "mounting a tmpfs needs root (CAP_SYS_ADMIN), which CI has: "
            f"{done.stderr.strip() or done.returncode}; test_wal_* covers the WAL without it"
        )
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path, chunk: int = 32 << 10) -> list[Path]:
    """Fill the file system of ``directory`` with ``chunk``-sized files until it is full."""
    files = []
    while True:
        path = directory / f"filler-{len(files)}"
        try:
            with open(path, "wb") as f:
                f.write(b"\xa5" * chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            path.unlink(missing_ok=True)
            return files
        files.append(path)


def free(files: list[Path]) -> None:
    for path in files:
        path.unlink(missing_ok=True)


def storage_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "aggregator.storage" and r.levelno >= logging.WARNING
    ]


async def test_a_leaf_on_a_full_disk_refuses_pushes_and_takes_them_again_when_space_returns(
    tmp_path, tmpfs, caplog
):
    caplog.set_level(logging.INFO)
    fed = make_federation(tmp_path, 4, aggregators=("root", "leaf0"), shapes=SHAPES)
    root = AggregatorService(fed.config("root", "root", buffer_k=1))
    root_addr = await root.start()
    leaf_cfg = fed.config("leaf0", "leaf", parent=root_addr, buffer_k=4)
    leaf_cfg.state_dir = str(tmpfs / "leaf0")
    leaf = AggregatorService(leaf_cfg)
    await leaf.start()
    A, B, C, D = fed.islands
    d = {k: random_delta(fed.theta0, i) for i, k in enumerate("ABCD")}
    fillers: list[Path] = []
    try:
        async with TransportClient(leaf.address, retries=0) as island:
            ack = await island.push(delta_bytes(A, d["A"], 1))
            assert ack["wal_index"] == "1"
            fillers = fill(tmpfs)
            upload_b = uuid.uuid4().hex
            for ident, key, upload_id in ((B, "B", upload_b), (C, "C", None), (B, "B", upload_b)):
                with pytest.raises(LinkError, match="UNAVAILABLE: disk full: appending"):
                    await island.push(delta_bytes(ident, d[key], 1), upload_id=upload_id)
            status = leaf.status()["models"]["global"]
            assert status["storage"]["failing"] and status["storage"]["wal"]["failures"] == 3
            assert "No space left on device" in status["storage"]["wal"]["last_error"]
            assert status["buffered"] == 1 and status["wal_index"] == 1
            metrics = leaf.metrics.exposition().decode()
            assert 'archipelago_updates_rejected_total{reason="disk_full"} 3.0' in metrics
            assert 'archipelago_storage_failing{model_id="global",part="wal"} 1.0' in metrics
            assert len(storage_warnings(caplog)) == 1  # once, not once per refused push

            free(fillers)  # space returns: the same upload is taken, no restart needed
            ack = await island.push(delta_bytes(B, d["B"], 1), upload_id=upload_b)
            assert ack["status"] == "accepted" and ack["wal_index"] == "2"
            ack = await island.push(delta_bytes(C, d["C"], 1))
            assert ack["wal_index"] == "3"
            assert not leaf.status()["models"]["global"]["storage"]["failing"]
            metrics = leaf.metrics.exposition().decode()
            assert 'archipelago_storage_failing{model_id="global",part="wal"} 0.0' in metrics
            assert any("writes succeed again" in r.getMessage() for r in caplog.records)
        await leaf.stop()
        leaf = AggregatorService(leaf_cfg)  # the same state dir: every ack is replayed
        await leaf.start()
        line = leaf.lines["global"]
        assert line.wal.torn_bytes == 0 and line.buffered == 3
        async with TransportClient(leaf.address, retries=0) as island:
            await island.push(delta_bytes(D, d["D"], 1))  # the K-th: the leaf flushes
        await wait_for(lambda: root.lines["global"].version == 1)
        env = Envelope.from_bytes(root.lines["global"].cache[1], max_bytes=1 << 30)
        assert env.header.meta["count"] == 4
        want = hand_versions(fed.theta0, [[(d[k], 0) for k in "ABCD"]])[-1]
        for k in want:
            np.testing.assert_allclose(root.lines["global"].theta[k], want[k], rtol=1e-5, atol=1e-6)
    finally:
        free(fillers)
        await leaf.stop()
        await root.stop()


async def test_a_root_that_cannot_persist_a_version_does_not_publish_it(tmp_path, tmpfs, caplog):
    """Its WAL takes the K-th update (acknowledged) but the version's files do not fit: no
    version is published, theta stays as stored, the update stays buffered, and the version
    is published once space returns; a restart holds it."""
    caplog.set_level(logging.INFO)
    fed = make_federation(tmp_path, 2, aggregators=("root",), shapes=SHAPES)
    cfg = fed.config("root", "root", buffer_k=2)
    cfg.state_dir = str(tmpfs / "root")
    root = AggregatorService(cfg)
    fillers: list[Path] = []
    try:
        await root.start()
        A, B = fed.islands
        d = {k: random_delta(fed.theta0, i) for i, k in enumerate("AB")}
        async with TransportClient(root.address, retries=0) as island:
            await island.push(delta_bytes(A, d["A"], 1))
            fillers = fill(tmpfs)
            free(fillers[:4])  # 128 KiB: room for a WAL record, not for the version's files
            ack = await island.push(delta_bytes(B, d["B"], 1))  # the K-th
            assert ack["status"] == "accepted" and ack["v_now"] == "0"
        line = root.lines["global"]
        assert line.version == 0 and line.buffered == 2
        for k, v in fed.theta0.items():  # restored from the stored state: theta_0's bits
            assert line.theta[k].tobytes() == v.tobytes()
        store = Path(cfg.state_dir) / "store" / "global"
        left = sorted(p.name for p in store.rglob("*") if p.name.endswith(".tmp"))
        assert left == [] and not (store / "versions" / "0000000001.env").exists()
        status = root.status()["models"]["global"]["storage"]
        assert status["failing"] and status["store"]["failing"] and not status["wal"]["failing"]
        metrics = root.metrics.exposition().decode()
        assert 'archipelago_flush_failures_total{model_id="global",reason="disk_full"}' in metrics
        assert 'archipelago_storage_failing{model_id="global",part="store"} 1.0' in metrics
        await asyncio.sleep(2.5)  # the flush is retried every second, quietly
        assert line.version == 0 and len(storage_warnings(caplog)) == 1
        free(fillers)
        await wait_for(lambda: line.version == 1)
        assert not root.status()["models"]["global"]["storage"]["failing"]
        want = hand_versions(fed.theta0, [[(d["A"], 0), (d["B"], 0)]])[-1]
        for k in want:
            np.testing.assert_allclose(line.theta[k], want[k], rtol=1e-5, atol=1e-6)
        theta1 = {k: v.copy() for k, v in line.theta.items()}
        await root.stop()
        root = AggregatorService(cfg)
        await root.start()
        assert root.lines["global"].version == 1
        for k, v in theta1.items():
            assert root.lines["global"].theta[k].tobytes() == v.tobytes()
    finally:
        free(fillers)
        await root.stop()


WAL_UNDER_FSIZE = textwrap.dedent(
    """
    import resource, signal, sys
    from aggregator.wal import WriteAheadLog
    from comms.errors import StorageError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    path = sys.argv[1]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, hard))
    wal = WriteAheadLog(path)
    acked = []
    for i in range(100):
        try:
            acked.append(wal.append(bytes([i]) * 3000))
        except StorageError as e:
            assert e.reason == "disk_full" and str(e).startswith("disk full: "), e
            assert wal.health.failing
            break
    assert wal.health.failures == 1
    assert not wal.mark_done(acked[-1], b"n" * 2000)  # a mark that does not fit: not recorded
    assert wal.mark == 0
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space returns
    acked.append(wal.append(b"after"))
    assert not wal.health.failing
    wal.close()
    print(len(acked))
    """
)


def test_wal_refuses_a_write_past_the_file_size_limit_and_keeps_no_torn_record(tmp_path):
    """RLIMIT_FSIZE makes the WAL's writes fail partway (EFBIG), as a full disk does: the
    append is refused, the record's bytes are cut, and the next append after the limit is
    lifted lands where a reopened log reads it."""
    done = subprocess.run(
        [sys.executable, "-c", WAL_UNDER_FSIZE, str(tmp_path / "wal")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    acked = int(done.stdout.strip())
    from aggregator.wal import WriteAheadLog

    wal = WriteAheadLog(tmp_path / "wal")  # raises WalCorruptError if a torn record was left
    bodies = [r.body for r in wal.pending()]
    assert wal.torn_bytes == 0 and len(bodies) == acked
    assert bodies[-1] == b"after" and bodies[:-1] == [bytes([i]) * 3000 for i in range(acked - 1)]


async def wait_for(pred, timeout=20.0):
    t0 = asyncio.get_running_loop().time()
    while not pred():
        if asyncio.get_running_loop().time() - t0 > timeout:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def test_a_leaf_whose_flush_intent_cannot_be_written_keeps_the_partial_and_retries(
    tmp_path,
):
    """The K-th update is logged and acknowledged, but the flush intent after it fails: no
    partial is sent (it would be counted twice after a crash), the buffer keeps both updates,
    and the flush is retried until the intent is written."""
    from aggregator.wal import storage_error

    fed = make_federation(tmp_path, 2, aggregators=("root", "leaf0"))
    root = AggregatorService(fed.config("root", "root", buffer_k=1))
    root_addr = await root.start()
    leaf = AggregatorService(fed.config("leaf0", "leaf", parent=root_addr, buffer_k=2))
    await leaf.start()
    line = leaf.lines["global"]
    real_intent, failures = line.wal.intent, []

    def full_intent(index, note):
        if len(failures) < 3:
            failures.append(index)
            raise storage_error(OSError(errno.ENOSPC, "No space left on device"), "intent")
        real_intent(index, note)

    line.wal.intent = full_intent
    try:
        async with TransportClient(leaf.address, retries=0) as island:
            for ident, s in zip(fed.islands, (0, 1), strict=True):
                ack = await island.push(delta_bytes(ident, random_delta(fed.theta0, s), 1))
                assert ack["status"] == "accepted"
        assert failures == [2] and line.buffered == 2 and line.partial_seq == 0
        await wait_for(lambda: root.lines["global"].version == 1)  # retried, then sent
        assert failures == [2, 2, 2] and line.partial_seq == 1
        env = Envelope.from_bytes(root.lines["global"].cache[1], max_bytes=1 << 30)
        assert env.header.meta["count"] == 2
        text = leaf.metrics.exposition().decode()
        assert 'archipelago_flush_failures_total{model_id="global",reason="disk_full"} 3.0' in text
    finally:
        await leaf.stop()
        await root.stop()


@pytest.mark.timeout(120)
def test_a_root_first_started_on_a_full_disk_exits_with_a_clear_error(tmp_path, tmpfs):
    """``aggregator serve`` whose state directory has no room for the initial state, or is
    not a directory at all, exits 1 with one line naming the error and where to look, not a
    traceback."""
    from comms.config import save_config

    fed = make_federation(tmp_path, 1, aggregators=("root",), shapes=SHAPES)
    cfg = fed.config("root", "root")
    fill(tmpfs)
    (tmp_path / "a-file").write_text("not a directory")
    for state_dir, error in ((tmpfs / "root", "No space left on device"),
                             (tmp_path / "a-file", "File exists")):  # fmt: skip
        cfg.state_dir = str(state_dir)
        save_config(cfg, tmp_path / "root.toml")
        run = subprocess.run(
            [sys.executable, "-m", "aggregator", "serve", str(tmp_path / "root.toml")],
            capture_output=True, text=True, timeout=90, cwd=REPO,
        )  # fmt: skip
        assert run.returncode == 1, run.stderr[-2000:]
        assert "Traceback" not in run.stderr, run.stderr[-2000:]
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith("aggregator: ") and error in last and "state_dir" in last, last
