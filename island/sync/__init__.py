"""The island's sync engine: pushes round deltas to its aggregator and follows global versions.

Local-update training (DiLoCo, Douillard et al. 2023; CO2, Sun et al., ICLR 2024) needs two
things from the network, and this package is both. ``SyncEngine`` (``engine``) is assembled
from one part per concept:

- ``pushes``: the ordered push queue. ``submit_delta`` compresses a round's pseudo-gradient
  with error feedback, signs it with a strictly increasing ``sequence`` and queues it; one
  background task sends the queue in order; a bounded backlog holds pushes while the link is
  down (overflow drops the oldest waiting one); ``state_dict`` keeps undelivered pushes.
- ``versions``: the version stream. ``follow(v)`` subscribes from ``v + 1``, verifies and
  buffers each ``u_v`` in order, resubscribes after a gap, records arrival times, and
  ``take_versions`` decodes them (``VersionGapError`` when some are gone) and notes which of
  this island's sequences each version merged. ``expect_manifest`` makes it refuse a version
  whose tensors are not the island's model's.
- ``joiner``: snapshot fetch for a late joiner (``theta_v`` exactly, then follow ``v + 1``),
  checked the same way (``SnapshotRefusedError``).
- ``engine``: the clients' lifecycle (a ``TransportClient`` per role, replaced after a link
  failure), the counters, and shutdown. ``config``: ``SyncConfig`` and ``SyncStats``.

Concurrency: the training loop is synchronous and calls the engine from one thread. The
network side lives on a ``comms.aio.LoopThread`` (given, or owned by the engine): one pusher
task and one follower task, each with its own ``TransportClient`` (channels are replaced
after a link failure). Shared state (the pending queue, the version buffer, counters) sits
behind one ``threading.Lock`` held only for bookkeeping, never across I/O. Encoding and error
feedback run in the calling thread, so the residuals always match what was queued; decoding
versions runs in the calling thread too, at the round boundary. Every blocking call takes a
timeout.
"""

from island.sync.config import SyncConfig, SyncStats
from island.sync.engine import ClientFactory, SyncEngine
from island.sync.joiner import SnapshotRefusedError
from island.sync.pushes import PushOutcome
from island.sync.versions import VERSION_SIGNER_ROLES, SyncTimeoutError, VersionGapError

__all__ = [
    "VERSION_SIGNER_ROLES",
    "ClientFactory",
    "PushOutcome",
    "SnapshotRefusedError",
    "SyncConfig",
    "SyncEngine",
    "SyncStats",
    "SyncTimeoutError",
    "VersionGapError",
]
