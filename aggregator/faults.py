"""Test-only fault points: kill this process at an exact moment, for ``kill -9`` tests.

``ARCHIPELAGO_FAULT=<name>`` (or ``<name>@<n>``: at the n-th visit) in a process's environment
makes :func:`fault_point` of that name send the process ``SIGKILL``, as a crash there would.
Unset (always, outside tests) it does nothing. The function lives in ``comms.faults`` so that
islands use the same points; the aggregator's points:

- ``leaf.after_wal_append``: an admitted update is in the WAL (fsynced); the ack is not sent.
- ``leaf.after_intent``: a leaf or mid logged a flush intent; the partial is not yet sent.
- ``leaf.before_mark``: its parent acknowledged the partial; the mark is not yet written.
- ``root.before_mark``: the root wrote a version and its state; the WAL mark is not written.
- ``root.before_publish``: the version is durable and marked; no subscriber was told yet.
"""

from __future__ import annotations

from comms.faults import FAULT, fault_point

__all__ = ["FAULT", "fault_point"]
