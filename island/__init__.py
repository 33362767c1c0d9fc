"""The per-node daemon: workloads, the inner loop, the sync engine, snapshots, the drop-in API.

For your own training loop::

    from island import LocalUpdate, SyncConfig, SyncEngine
    engine = SyncEngine(SyncConfig(model_id="global", every=100), identity, "leaf:7000")
    with LocalUpdate(model, optimizer, engine=engine) as lu:
        for batch in data:
            ...; optimizer.step(); optimizer.zero_grad()
            lu.step()
"""

from typing import Any

_EXPORTS = {
    "LocalUpdate": "island.local_update",
    "SyncConfig": "island.sync",
    "SyncEngine": "island.sync",
    "Island": "island.daemon",
    "IslandConfig": "island.config",
    "get_workload": "island.workloads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # imported on first use: `island --help` stays fast
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'island' has no attribute {name!r}")
