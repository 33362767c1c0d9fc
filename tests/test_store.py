"""The model store keeps versions, snapshots and root state across reopen, and prunes safely."""

import numpy as np
import pytest

from aggregator.store import ModelStore
from comms.errors import NotFoundError, StorageError
from comms.update import Manifest


def test_versions_snapshots_state(tmp_path):
    store = ModelStore(tmp_path, "global")
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    store.save_manifest(Manifest.from_arrays(params))
    store.put_snapshot(0, params)
    for v in range(1, 6):
        store.put_version(v, b"u%d" % v)
    store.save_state({"theta/w": params["w"] + 1}, {"version": 5, "guard": {"a": 3}})

    again = ModelStore(tmp_path, "global")
    assert again.load_manifest() == Manifest.from_arrays(params)
    assert again.version_range() == (1, 5)
    assert again.get_version(3) == b"u3"
    np.testing.assert_array_equal(again.load_snapshot(0)["w"], params["w"])
    arrays, meta = again.load_state()
    assert meta == {"version": 5, "guard": {"a": 3}}
    np.testing.assert_array_equal(arrays["theta/w"], params["w"] + 1)
    with pytest.raises(NotFoundError, match="version 9"):
        again.get_version(9)
    assert not list(tmp_path.rglob("*.tmp"))


def test_prune_keeps_what_rolls_forward(tmp_path):
    store = ModelStore(tmp_path, "m", keep_versions=3, keep_snapshots=2)
    w = {"w": np.zeros(2, np.float32)}
    for v in range(1, 21):
        store.put_version(v, b"x")
        if v % 5 == 0:
            store.put_snapshot(v, w)
    store.prune()
    assert store.snapshot_versions() == [15, 20]
    # every version after the oldest kept snapshot stays, so it can roll forward to the newest
    assert store.stored_versions() == list(range(16, 21))
    assert store.newest_snapshot_at_or_below(17) == 15
    assert store.newest_snapshot_at_or_below(3) is None


def test_version_and_state_are_written_together(tmp_path):
    store = ModelStore(tmp_path, "global")
    theta = {"w": np.arange(4, dtype=np.float32)}
    store.save_version_and_state(
        10, b"u10", {"theta/w": theta["w"]}, {"version": 10}, snapshot=theta
    )
    store.save_version_and_state(11, b"u11", {"theta/w": theta["w"] + 1}, {"version": 11})
    again = ModelStore(tmp_path, "global")
    assert (again.get_version(10), again.get_version(11)) == (b"u10", b"u11")
    assert again.snapshot_versions() == [10]
    arrays, meta = again.load_state()
    assert meta == {"version": 11}
    np.testing.assert_array_equal(arrays["theta/w"], theta["w"] + 1)
    assert not list(tmp_path.rglob("*.tmp"))


def test_state_is_not_committed_without_its_version(tmp_path):
    store = ModelStore(tmp_path, "global")
    store.save_version_and_state(1, b"u1", {"theta/w": np.zeros(2, np.float32)}, {"version": 1})
    store.versions_dir.rename(tmp_path / "moved")
    store.versions_dir.write_bytes(b"")  # a file where the directory was: u_2 cannot be written
    with pytest.raises(StorageError, match="disk error: writing version 2"):
        store.save_version_and_state(2, b"u2", {"theta/w": np.ones(2, np.float32)}, {"version": 2})
    arrays, meta = store.load_state()
    assert meta == {"version": 1}  # still the state whose u_v is on disk
    np.testing.assert_array_equal(arrays["theta/w"], np.zeros(2, np.float32))
