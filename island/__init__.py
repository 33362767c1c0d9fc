"""The per-node daemon: workloads, the inner loop, the sync engine, snapshots, the drop-in API."""
