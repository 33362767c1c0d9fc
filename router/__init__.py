"""Partitioning, the learned router, ensembles of experts, the inference server and client."""
