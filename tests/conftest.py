"""Fixtures shared by the island sync tests."""

import pytest
from test_sync import ProtocolHarness


@pytest.fixture
def harness():
    """A real transport server with a protocol-checking handler, closed after the test."""
    h = ProtocolHarness()
    h.start_server()
    yield h
    h.close()
