"""Fixtures shared by the island sync tests, and the test process's gRPC settings."""

import os

# Before anything imports grpc (it reads this at import): tests start children with
# preexec_fn (scripts/federation_procs.py), and with gRPC's fork support on such a child can
# abort between fork and exec (grpc/grpc#43055).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import pytest
from test_sync import ProtocolHarness


@pytest.fixture
def harness():
    """A real transport server with a protocol-checking handler, closed after the test."""
    h = ProtocolHarness()
    h.start_server()
    yield h
    h.close()
