#!/usr/bin/env bash
# `gpupool up` as the demo runs it (no --fake-gpus: it looks for real GPUs first), this checkout against another,
# alternating: seconds from the start to the scheduler's "listening on" and to the `export GPUPOOL_SCHEDULER` line
# (scheduler and daemon up, the daemon registered), each up stopped (SIGINT) once it printed that line.
#
#   nice bash bench/up_start.sh /work/wt/base/.venv/bin [ROUNDS]     # the other checkout's venv bin folder
set -euo pipefail
cd "$(dirname "$0")/.."
other=$1
rounds=${2:-3}
here=$PWD/.venv/bin
run() {  # $1 = label, $2 = bin folder with gpupool
  local st t0 ts="" t1 pid
  st=$(mktemp -d)
  t0=$(date +%s.%N)
  env -u GPUPOOL_SCHEDULER PATH="$2:$PATH" "$2/gpupool" up --state "$st/s.db" --scheduler-listen 127.0.0.1:0 \
    --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --scheduler-metrics-listen 127.0.0.1:0 >"$st/up.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 3000); do
    [ -z "$ts" ] && grep -q "scheduler: listening on" "$st/up.log" && ts=$(date +%s.%N)
    grep -q "export GPUPOOL_SCHEDULER" "$st/up.log" && break
    kill -0 $pid 2>/dev/null || { cat "$st/up.log"; exit 1; }
    sleep 0.1
  done
  t1=$(date +%s.%N)
  kill -INT $pid
  wait $pid || true
  rm -rf "$st"
  printf '%-6s scheduler listening %6.2f s   up %6.2f s   load %s\n' "$1" "$(echo "$ts - $t0" | bc)" \
    "$(echo "$t1 - $t0" | bc)" "$(cut -d' ' -f1 /proc/loadavg)"
}
for _ in $(seq 1 "$rounds"); do
  run other "$other"
  run this "$here"
done
