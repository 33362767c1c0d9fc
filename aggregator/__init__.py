"""The aggregator service: gateway, merge functions, the tree, the root and the model store."""
