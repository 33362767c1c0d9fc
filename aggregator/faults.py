"""Test-only fault points: kill this process at an exact moment, for ``kill -9`` tests.

``ARCHIPELAGO_FAULT=<name>`` in a process's environment makes :func:`fault_point` of that
name send the process ``SIGKILL``, as a crash there would. Unset (always, outside tests) it
does nothing. The points:

- ``leaf.after_intent``: a leaf or mid logged a flush intent; the partial is not yet sent.
- ``leaf.before_mark``: its parent acknowledged the partial; the mark is not yet written.
- ``root.before_mark``: the root wrote a version and its state; the WAL mark is not written.
"""

from __future__ import annotations

import os
import signal

FAULT = os.environ.get("ARCHIPELAGO_FAULT", "")


def fault_point(name: str) -> None:
    if name == FAULT:
        os.kill(os.getpid(), signal.SIGKILL)
