"""The root's error feedback on published versions: ``[[models]] ef_decay`` (aggregator/root.py,
config.py, service.py). A lossy publish codec leaves a residual that joins the next ``u``;
with a decay beta the root publishes ``Q(u + beta * e)``."""

from __future__ import annotations

import numpy as np
import pytest
from aggtools import make_federation

from aggregator.config import ModelConfig
from aggregator.merge import PartialAggregate, accumulate
from aggregator.outer import make_outer_optimizer
from aggregator.root import RootModel
from aggregator.service import AggregatorService
from comms.codecs import ErrorFeedback, get_codec
from comms.errors import ConfigError
from comms.identity import Identity

SPARSE = {"name": "sparse2", "density": 0.05, "chunk": 64}


def merged(rng, theta0) -> PartialAggregate:
    partial = PartialAggregate()
    for who in "ab":
        delta = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in theta0.items()}
        accumulate(partial, delta, 1.0, update_id=(who, 1))
    return partial


def test_the_root_publishes_its_step_plus_the_decayed_residual():
    """Against a twin root that publishes losslessly (its u is the same: the outer step does
    not depend on theta), the sparse root's residual is what ErrorFeedback(beta) keeps of the
    same u's, bit for bit, and not what it keeps without the decay."""
    rng = np.random.default_rng(0)
    theta0 = {"w": np.zeros((8, 64), np.float32), "b": np.zeros(64, np.float32)}
    codec = get_codec(SPARSE)
    sparse = RootModel("m", theta0, make_outer_optimizer("sgd", lr=1.0), codec,
                       Identity.generate(), ef_decay=0.5)  # fmt: skip
    exact = RootModel("m", theta0, make_outer_optimizer("sgd", lr=1.0), get_codec("none"),
                      Identity.generate())  # fmt: skip
    decayed, whole = ErrorFeedback(0.5), ErrorFeedback()
    for _ in range(4):
        partial = merged(rng, theta0)
        got = sparse.step(partial).applied
        u = exact.step(partial).applied
        for name in theta0:
            expected = codec.decode(decayed.compress(name, u[name], codec), u[name].shape)
            assert got[name].tobytes() == expected.tobytes()
            whole.compress(name, u[name], codec)
    for name in theta0:
        assert sparse.residual.residuals()[name].tobytes() == decayed.residuals()[name].tobytes()
        assert sparse.residual.residuals()[name].tobytes() != whole.residuals()[name].tobytes()


@pytest.mark.parametrize("value", [0, 1.5, -1, True, None])
def test_a_bad_ef_decay_is_a_config_error(value):
    with pytest.raises(ConfigError, match="ef_decay: must be in"):
        ModelConfig("m", ef_decay=value).validate()


@pytest.mark.parametrize("decay", [None, 0.9])
async def test_a_served_lines_root_decays_as_configured(tmp_path, decay):
    fed = make_federation(tmp_path, 1, aggregators=("root",))
    cfg = fed.config("root", "root", buffer_k=1, clip="off")
    cfg.models[0].codec, cfg.models[0].outer = "sparse2", "sgd"
    if decay is not None:
        cfg.models[0].ef_decay = decay
    cfg.validate()
    root = AggregatorService(cfg)
    await root.start()
    try:
        assert root.lines["global"].root.residual.decay == (decay or 1.0)  # default: none
    finally:
        await root.stop()
