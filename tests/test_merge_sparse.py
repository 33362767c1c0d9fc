"""Sparse updates merged without densifying: a ``topk`` or ``sparse2`` delta is admitted as its
entries (comms.codecs.SparseTensor) and added at its indices, with the same bits as its dense
form, and without a model-sized temporary."""

import tracemalloc

import numpy as np
import pytest
from aggtools import delta_bytes, make_federation

from aggregator.direction import dot
from aggregator.gateway import AdmissionPolicy, admit, encoded_norm_dot
from aggregator.merge import PartialAggregate, accumulate, scaled_add_
from aggregator.robust import sum_of_squares
from aggregator.staleness import get_staleness_function
from comms.codecs import SparseTensor, get_codec
from comms.envelope import Envelope
from comms.errors import ShapeMismatchError
from comms.identity import ReplayGuard
from comms.update import Manifest, decode_update

SHAPES = {"w": (96, 257), "b": (300,), "tiny": (3,)}


def encoded(rng, codec, scale=1.0) -> tuple[dict, dict]:
    """A random update through ``codec``: (entries as the merge takes them, dense arrays)."""
    c = get_codec(codec)
    sparse, dense = {}, {}
    for name, shape in SHAPES.items():
        payload = c.encode(scale * rng.standard_normal(shape).astype(np.float32))
        dense[name] = c.decode(payload, shape)
        sparse[name] = c.decode_sparse(payload, shape)
    return sparse, dense


@pytest.mark.parametrize("codec", ["sparse2", "topk"])
def test_accumulating_entries_gives_the_bits_of_accumulating_dense_arrays(codec):
    rng = np.random.default_rng(0)
    updates = [encoded(rng, codec, scale=10.0 ** rng.uniform(-3, 1)) for _ in range(12)]
    weights = [1.0, *rng.uniform(0.05, 3.0, size=11)]  # a weight of 1 takes the plain-add path
    got, want = PartialAggregate(), PartialAggregate()
    for i, ((sparse, dense), w) in enumerate(zip(updates, weights, strict=True)):
        accumulate(got, sparse, w, update_id=("a", i))
        accumulate(want, dense, w, update_id=("a", i))
        if i == 5:  # the next partial reuses these buffers, as a service does after a flush
            got, want = PartialAggregate(spare=got.weighted_sum), PartialAggregate()
    for name in SHAPES:
        assert got.weighted_sum[name].tobytes() == want.weighted_sum[name].tobytes(), name
    assert got.weight_sum == want.weight_sum and got.contributors == want.contributors


def test_norm_and_dot_of_entries_equal_those_of_the_dense_array():
    rng = np.random.default_rng(1)
    sparse, dense = encoded(rng, "sparse2")
    ref = rng.standard_normal(SHAPES["w"]).astype(np.float32)
    assert sum_of_squares(sparse["w"]) == pytest.approx(sum_of_squares(dense["w"]), rel=1e-12)
    assert dot(sparse["w"], ref) == pytest.approx(dot(dense["w"], ref), rel=1e-12)
    with pytest.raises(ShapeMismatchError):
        dot(sparse["w"], ref[:10])


@pytest.mark.parametrize(
    "indices",
    [[0, 2, 2], [2, 1, 0], [0, 1, 10], [-1, 0, 1]],
    ids=["duplicated", "unsorted", "out of range", "negative"],
)
def test_entries_a_merge_cannot_add_once_each_are_refused(indices):
    bad = SparseTensor((10,), np.array(indices), np.ones(3, np.float32))
    acc = np.zeros(10, np.float32)
    with pytest.raises(ShapeMismatchError, match="strictly increasing"):
        scaled_add_(acc, bad, np.float32(0.5))
    assert not acc.any()  # nothing was added


@pytest.fixture
def admission(tmp_path):
    shapes = {"w": (1024, 1024)}
    fed = make_federation(tmp_path, 1, aggregators=(), shapes=shapes)
    x = {"w": np.random.default_rng(2).standard_normal(shapes["w"]).astype(np.float32)}
    manifest = Manifest.from_arrays(x)
    data = delta_bytes(fed.islands[0], x, sequence=1, codec="sparse2")

    def run(**policy):
        pol = AdmissionPolicy(fed.roster, get_staleness_function("fedbuff"), **policy)
        return admit(data, policy=pol, manifests=lambda m: manifest, v_now=lambda m: 0,
                     guard=ReplayGuard(), decode=True, clip_bound=1.0)  # fmt: skip

    return run, data, manifest


def test_a_sparse_delta_is_admitted_and_merged_as_its_entries_without_a_dense_copy(admission):
    """4 MB of float32 parameters, 2% kept: the admission (decode, norm, clip) and the merge
    into existing buffers allocate a fraction of one dense tensor."""
    run, data, manifest = admission
    dense = decode_update(Envelope.from_bytes(data, max_bytes=1 << 24), manifest)["w"]
    partial = PartialAggregate()
    run(clip="adaptive").merge_into(partial)  # the buffers exist from here on
    tracemalloc.start()
    try:
        admitted = run(clip="adaptive")
        partial.contributors.clear()  # the same update again, as a second island's
        admitted.merge_into(partial)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(admitted.delta["w"], SparseTensor) and admitted.clipped
    assert peak < dense.nbytes / 4, f"{peak} bytes allocated for a {dense.nbytes}-byte tensor"
    want = np.multiply(dense, np.float32(admitted.scale), dtype=np.float32)
    assert admitted.delta["w"].dense().tobytes() == want.tobytes()  # clipped to the bit
    env = Envelope.from_bytes(data, max_bytes=1 << 24)
    assert encoded_norm_dot(env, manifest)[0] == admitted.norm  # validate-only admission agrees
