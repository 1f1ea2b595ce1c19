#!/usr/bin/env bash
# The main job on a fresh machine: install, start a one-machine pool (`gpupool up`: scheduler + daemon,
# real GPUs if torch sees any, else 2 fake GPUs), train the MLPerf sentiment CNN through it on half a GPU,
# then stop the pool. Extra arguments go to train.py (default: 3 epochs of the plain CNN on 4,000 reviews,
# about 83% test accuracy in a minute or two; pass `--limit 0` for the full 25k/25k benchmark configuration,
# which stops at the 90.6% target).
set -euo pipefail
cd "$(dirname "$0")/.."
GPUPOOL_SKIP_APT=1 bash scripts/setup.sh
state=$(mktemp -d)
log="$state/up.log"
gpupool up --state "$state/scheduler.db" --scheduler-listen 127.0.0.1:0 --listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --scheduler-metrics-listen 127.0.0.1:0 >"$log" 2>&1 &
up_pid=$!
trap 'kill -INT $up_pid 2>/dev/null; wait $up_pid 2>/dev/null; rm -rf "$state"' EXIT
for _ in $(seq 1 120); do
  addr=$(sed -n 's/.*export GPUPOOL_SCHEDULER=\([0-9.:]*\).*/\1/p' "$log" | head -n 1)
  [ -n "$addr" ] && break
  kill -0 $up_pid 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.5
done
[ -n "${addr:-}" ] || { echo "gpupool up did not come up:"; cat "$log"; exit 1; }
cat "$log"
# Every link is mutual TLS: take the scheduler address, the CA and this user's tenant certificate from what
# `gpupool up` printed (export GPUPOOL_SCHEDULER=..., GPUPOOL_TLS_CA=..., GPUPOOL_TLS_CERT=..., GPUPOOL_TLS_KEY=...).
eval "$(sed -n 's/^  export \(GPUPOOL_[A-Z_]*=[^ ]*\)$/export \1/p' "$log")"
[ "$GPUPOOL_SCHEDULER" = "$addr" ] && [ -n "${GPUPOOL_TLS_CA:-}" ] || { echo "no TLS exports in:"; cat "$log"; exit 1; }
gpupool smi
args=("$@"); [ ${#args[@]} -gt 0 ] || args=(--limit 4000 --epochs 3 --bigram-buckets 0 --embed-dropout 0)
gpupool run -n 1 -p 0.5 -- python examples/sentiment/train.py --device gpupool "${args[@]}"
gpupool smi
