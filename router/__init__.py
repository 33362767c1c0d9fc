"""Partitioning, the learned router, ensembles of experts, the inference server and client.

``Client`` / ``AsyncClient`` (``router.client``) and ``EnsembleModel`` (``router.ensemble``) are
imported on first use, so ``import router`` stays light (no torch until a model is needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AsyncClient",
    "BadRequestError",
    "Client",
    "ConnectionFailed",
    "EnsembleModel",
    "RouterClientError",
    "ServerError",
    "UnauthorizedError",
]

_LAZY = {
    "AsyncClient": "router.client",
    "BadRequestError": "router.client",
    "Client": "router.client",
    "ConnectionFailed": "router.client",
    "RouterClientError": "router.client",
    "ServerError": "router.client",
    "UnauthorizedError": "router.client",
    "EnsembleModel": "router.ensemble",
}

if TYPE_CHECKING:
    from router.client import (
        AsyncClient,
        BadRequestError,
        Client,
        ConnectionFailed,
        RouterClientError,
        ServerError,
        UnauthorizedError,
    )
    from router.ensemble import EnsembleModel


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'router' has no attribute {name!r}")
