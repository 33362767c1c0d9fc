"""Test-only fault points: kill this process at an exact moment, for ``kill -9`` tests.

``ARCHIPELAGO_FAULT=<name>`` in a process's environment makes :func:`fault_point` of that
name send the process ``SIGKILL``, as a crash there would; ``<name>@<n>`` fires at the n-th
time the point is reached (``@1`` is the same as no count). Unset (always, outside tests)
:func:`fault_point` returns at once: one comparison of an empty string.

The points (the aggregator's are listed again in ``aggregator/faults.py``):

- ``island.after_ack``: an island's push was acknowledged; the island has not recorded it
  (no ack-log line, no counter), so it does not know its update was delivered.
- ``island.mid_snapshot``: an island's snapshot tensors are written into the temporary
  directory; its manifest is not, and nothing is renamed into place.
- ``leaf.after_wal_append``: an aggregator appended (and fsynced) an admitted update to its
  WAL; the ack is not yet sent.
- ``leaf.after_intent``: a leaf or mid logged a flush intent; the partial is not yet sent.
- ``leaf.before_mark``: its parent acknowledged the partial; the mark is not yet written.
- ``root.before_mark``: the root wrote a version and its state; the WAL mark is not written.
- ``root.before_publish``: the root's version is durable and marked; no subscriber has been
  told of it.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("ARCHIPELAGO_FAULT", "")
FAULT, _, _COUNT = _SPEC.partition("@")
_AT = int(_COUNT) if _COUNT.isdigit() and int(_COUNT) > 0 else 1
_hits = 0


def fault_point(name: str) -> None:
    """SIGKILL this process if ``name`` is the configured fault point (at its n-th visit)."""
    if FAULT and name == FAULT:
        global _hits
        _hits += 1
        if _hits >= _AT:
            os.kill(os.getpid(), signal.SIGKILL)
