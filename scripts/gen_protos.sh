#!/usr/bin/env bash
# Regenerate the Python modules of comms/proto/archipelago.proto with grpc_tools.protoc.
#
# Usage: scripts/gen_protos.sh [OUT_ROOT]
#   OUT_ROOT defaults to the repository root; files land in OUT_ROOT/comms/proto/.
#   PYTHON selects the interpreter (default: python3), which needs grpcio-tools.
#
# The proto is compiled with the repository root as include path, so the generated
# archipelago_pb2_grpc.py imports `from comms.proto import archipelago_pb2`, the package path
# it lives at, rather than a bare top-level `import archipelago_pb2`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_root="${1:-$root}"
python="${PYTHON:-python3}"

mkdir -p "$out_root/comms/proto"
cd "$root"
"$python" -m grpc_tools.protoc \
  --proto_path=. \
  --python_out="$out_root" \
  --pyi_out="$out_root" \
  --grpc_python_out="$out_root" \
  comms/proto/archipelago.proto

# Fail loudly if a grpc_tools release changes the import style.
if ! grep -q '^from comms.proto import archipelago_pb2' "$out_root/comms/proto/archipelago_pb2_grpc.py"; then
  echo "gen_protos.sh: unexpected import in archipelago_pb2_grpc.py; fix the include path" >&2
  exit 1
fi
