#!/usr/bin/env bash
# scripts/fuzz_native.py (the fuzz of the C++ paths that read a client's bytes) with the native runner built with
# AddressSanitizer and UBSan, in-process (its modes parsers and runs; daemon runs the plain build in the daemon's
# workers, whose RLIMIT_DATA refuses ASan's shadow memory). The first run builds the sanitized runner (~4 min).
#
#   bash scripts/fuzz_native.sh parsers --seconds 600 --seed 1
#   bash scripts/fuzz_native.sh runs --seconds 600 --seed 1 --recording /tmp/rec/tiny-mlp.json   # (eager_replay --dump)
# --help / -h: print this header (what the script does, its options) and exit, running nothing (round 48).
if [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}; [ -x "$PY" ] || PY=python3
  echo; "$PY" "$(dirname "$0")/fuzz_native.py" --help  # (its options; without the sanitizers' preload)
  exit 0
fi
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
. scripts/asan_env.sh
exec "$PY" scripts/fuzz_native.py "$@"
