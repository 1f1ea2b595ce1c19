#!/usr/bin/env bash
# The native runner (server/native_runner.cpp) under AddressSanitizer and UBSan, in-process: the unit tests that
# drive it (tests/unit/test_server_runs.py, test_server_learned_hostile.py, test_server_native_free.py,
# test_server_native_upload.py, test_server_native_seeded.py, test_server_native_records.py: the frame readers
# `eager_records` and `eager_frame` on hostile frames; test_server_slices.py: the front's frame cut `split_frame` on
# hostile frames; test_hostile46_attention.py: the fused attention's C++ backward on hostile seeds in learned runs;
# test_hostile47_views.py: forged view geometries through the dispatcher-free views)
# and the structured fuzz on recorded training streams (tests/integration/test_runner_fuzz.py; test_native_fuzz.py:
# a slice of scripts/fuzz_native.py, whose longer runs are scripts/fuzz_native.sh). docs/operations.md
# "The native runner under sanitizers".
#
#   bash scripts/runner_asan.sh                 # ~4 min the first time (the sanitized build), then ~1 min
#   CASES=40 SEED=7 bash scripts/runner_asan.sh # a longer fuzz (cases per workload), other seeds
#   RECORDS=100000 bash scripts/runner_asan.sh -k records  # more hostile frames for eager_records
#   bash scripts/runner_asan.sh -k encoder      # extra arguments go to pytest
#
# Why in-process: a session's worker caps its private mappings (RLIMIT_DATA, server/sandbox.py) and ASan's
# shadow memory is terabytes of them, so a live daemon's workers cannot run it. The recordings are made first by a
# plain Python (through a real daemon), then replayed under ASan.
# --help / -h: print this header (what the script does, its options) and exit, running nothing (round 48).
if [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  exit 0
fi
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
work=${RUNNER_ASAN_DIR:-${TMPDIR:-/tmp}/gpupool-runner-asan}
mkdir -p "$work"
for model in tiny-mlp encoder; do
    [ -s "$work/$model.json" ] || "$PY" bench/eager_replay.py --dump "$model" "$work/$model.json" --steps 6
done
. scripts/asan_env.sh
export GPUPOOL_RUNNER_FUZZ_RECORDINGS="$work"
export GPUPOOL_RUNNER_FUZZ_CASES=${CASES:-10}
export GPUPOOL_RUNNER_FUZZ_SEED=${SEED:-0}
export GPUPOOL_RECORDS_FUZZ_CASES=${RECORDS:-3000}
# the sanitized build must really be the one loaded (else every test would pass on the Python path alone)
"$PY" -c '
from gpupool.server import native_runner as n
m = n.load()
assert m is not None, "the sanitized native runner did not load"
print("sanitized native runner:", m.__file__)
'
exec "$PY" -m pytest -q -p no:cacheprovider -s tests/unit/test_server_runs.py tests/unit/test_server_learned_hostile.py \
    tests/unit/test_server_native_free.py tests/unit/test_server_native_upload.py tests/unit/test_server_native_seeded.py \
    tests/unit/test_server_native_records.py tests/unit/test_server_slices.py tests/integration/test_runner_fuzz.py \
    tests/integration/test_native_fuzz.py tests/unit/test_hostile46_attention.py tests/unit/test_hostile47_views.py "$@"
