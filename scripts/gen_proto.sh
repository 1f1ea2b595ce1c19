#!/usr/bin/env bash
# Regenerate gpupool/_proto/ from proto/gpupool/v1/*.proto with pinned generators.
# CI runs this and fails on any difference (tests/unit/test_proto_fresh.py does the same check).
# --help / -h: print this header (what the script does, its options) and exit, running nothing (round 48).
if [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  exit 0
fi
set -euo pipefail
cd "$(dirname "$0")/.."
GRPCIO_TOOLS_VERSION=1.85.1
MYPY_PROTOBUF_VERSION=5.1.0
have() { python -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }
if ! have grpcio-tools "$GRPCIO_TOOLS_VERSION" || ! have mypy-protobuf "$MYPY_PROTOBUF_VERSION"; then
  python -m pip install -q "grpcio-tools==$GRPCIO_TOOLS_VERSION" "mypy-protobuf==$MYPY_PROTOBUF_VERSION"
fi
out="${1:-gpupool/_proto}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python -m grpc_tools.protoc -I proto \
  --python_out="$tmp" --grpc_python_out="$tmp" --mypy_out="$tmp" --mypy_grpc_out="$tmp" \
  proto/gpupool/v1/*.proto
mkdir -p "$out"
rm -f "$out"/*_pb2*.py "$out"/*_pb2*.pyi
for f in "$tmp"/gpupool/v1/*; do
  # Generated modules import each other as gpupool.v1.X; they live flat in gpupool._proto.
  sed -e 's/^from gpupool\.v1 import /from gpupool._proto import /' \
      -e 's/^import gpupool\.v1\.\([a-z_0-9]*\)$/import gpupool._proto.\1/' \
      -e 's/gpupool\.v1\.\([a-z_0-9]*_pb2\)\b/gpupool._proto.\1/g' "$f" > "$out/$(basename "$f")"
done
[ -f "$out/__init__.py" ] || echo '"""Generated protobuf and gRPC modules (scripts/gen_proto.sh). Never edit by hand."""' > "$out/__init__.py"
