"""Generated gRPC/protobuf modules of the Archipelago wire protocol (package archipelago.v1).

``archipelago.proto`` is the source of truth; ``archipelago_pb2*.py`` are generated from it by
``scripts/gen_protos.sh`` and committed (a test checks they match a fresh regeneration). The
generated code checks at import that the installed protobuf and grpcio runtimes are at least
the versions that generated it.
"""
