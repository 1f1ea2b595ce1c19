#!/usr/bin/env bash
# The main job on a fresh machine: install, start a one-machine pool (`gpupool up`: scheduler + daemon, real GPUs if
# torch sees any, else 2 fake GPUs), train the MLPerf sentiment CNN through it on half a GPU while a live view of the
# pool (`gpupool smi --watch`) shows each tenant's memory, busy % and ops/s, classify two reviews with the trained
# model on the CPU (the edge site), then stop the pool (`gpupool down`: it waits for every process of the pool).
#
#   bash scripts/demo.sh                 # 3 epochs of the plain CNN on the 5,000 real reviews shipped in the repo
#   bash scripts/demo.sh --web           # ... then serve the model on a web page (http://127.0.0.1:8000)
#   bash scripts/demo.sh --limit 0 --data ''   # extra arguments go to train.py: here the full benchmark, with
#                                        # aclImdb found in the cache or ../shared/data, else downloaded
#
# Environment: GPUPOOL_DEMO_SETUP=0 skips scripts/setup.sh (already installed); PYTHON (default python3);
# GPUPOOL_WEB_PORT (default 8000).
# --help / -h: print this header (what the script does, its options) and exit, running nothing (round 48).
if [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  exit 0
fi
set -euo pipefail
cd "$(dirname "$0")/.."
web=0
if [ "${1:-}" = --web ]; then web=1; shift; fi
# setup: the project, torch and the demo's extras (flask, for --web), not dev's tools (scripts/test.sh installs them),
# nor the Python client's native pieces (the demo runs `gpupool run`'s C++ client)
[ "${GPUPOOL_DEMO_SETUP:-1}" = 0 ] || GPUPOOL_SKIP_APT=1 GPUPOOL_SETUP_SHIM=0 GPUPOOL_SETUP_EXTRAS=demo bash scripts/setup.sh
state=$(mktemp -d)
log="$state/up.log"
# Ctrl-C: the training stops first (SIGTERM to `gpupool run`, which passes it on and releases the lease), then the
# pool. `up` runs in a session of its own, so that the terminal's SIGINT does not stop the pool under the training
# (until round 40 it did: the job died of DeviceLost, "host vm is draining", and the demo said "training failed"),
# and a script's background job ignores SIGINT, so the training never saw it.
echo "starting the pool: gpupool up (a scheduler and a daemon on this machine; its log follows once it is up, ~30-60 s)"
setsid gpupool up --state "$state/scheduler.db" --scheduler-listen 127.0.0.1:0 --listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --scheduler-metrics-listen 127.0.0.1:0 >"$log" 2>&1 &
up_pid=$!
train_pid=""
stop() {  # (set -e: a wait's status, 143 for the stopped training, must not end this before the pool is stopped)
  if [ -n "$train_pid" ] && kill -0 "$train_pid" 2>/dev/null; then
    kill -TERM "$train_pid" 2>/dev/null || true; wait "$train_pid" 2>/dev/null || true
  fi
  # `gpupool down` (until round 52 `kill -INT` and a wait for `up` alone) waits for every process of the pool, the
  # daemon's zygote, workers and log pumps too, before the folder goes; a SIGTERM where `up` has not yet written the
  # record `down` reads (Ctrl-C in its first second)
  if kill -0 $up_pid 2>/dev/null; then
    echo "stopping the pool: gpupool down --state $state/scheduler.db"
    gpupool down --state "$state/scheduler.db" >/dev/null 2>&1 || kill -TERM $up_pid 2>/dev/null || true
  fi
  wait $up_pid 2>/dev/null || true; rm -rf "$state"
}
trap stop EXIT
trap 'echo "interrupted: stopping the training and the pool"; exit 130' INT
# How a client reaches this pool: the `export ...` lines `gpupool up` prints (one place to change). `up` bounds its
# own start (a daemon's first start builds its native runner where setup did not: minutes on a loaded machine), so
# wait while it lives (20 min at most), passing on the build's lines as they come: its estimate, a line every 15 s
# while the compiler runs, its end (until round 49 one line, then minutes of silence).
said=0
for _ in $(seq 1 2400); do
  exports=$(grep -E '^\s*export GPUPOOL_[A-Z_]+=' "$log" || true)
  [ -n "$exports" ] && break
  kill -0 $up_pid 2>/dev/null || { cat "$log"; exit 1; }
  news=$(grep -o -E '((still )?building the native runner|native runner built in|no native runner after|native runner: no build).*' "$log" || true)
  if [ -n "$news" ]; then
    count=$(printf '%s\n' "$news" | wc -l)
    [ "$count" -le "$said" ] || { printf '%s\n' "$news" | tail -n +$((said + 1)) | sed 's/^/waiting for gpupool up: /'; said=$count; }
  fi
  sleep 0.5
done
[ -n "${exports:-}" ] || { echo "gpupool up did not come up:"; cat "$log"; exit 1; }
eval "$exports"
# `up`'s log, but for its banner's last line: how to stop that `up` (`gpupool down --state ...`, which here would stop
# the pool under the training, and the state folder is this script's). Here Ctrl-C is this script's (until round 55
# the line said "Ctrl-C stops both", `up`'s own Ctrl-C, which no terminal's reaches under setsid)
grep -v -F ' stops both (' "$log" || true
echo "Ctrl-C stops the training, then the pool (this script's own: gpupool down --state $state/scheduler.db)"
py=${PYTHON:-python3}
out=runs/demo
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--data sample --epochs 3 --bigram-buckets 0 --embed-dropout 0 --log-every 10)
echo "training: gpupool run -n 1 -p 0.5 -- $py examples/sentiment/train.py --device gpupool ${args[*]}"
gpupool run -n 1 -p 0.5 -- "$py" examples/sentiment/train.py --device gpupool --out "$out" --no-progress \
  "${args[@]}" >"$state/train.log" 2>&1 &
train_pid=$!
# The pool while it trains: devices, each tenant's memory / busy % / ops/s, leases, and the training log's tail.
# Off a terminal (a pipe, `| tee`, a CI log) a redrawn view shows only its last frame (round 49: 144-416 s silent
# while it trained): there smi prints a line of the pool every 5 s and the training's lines as they come, and the
# training log is not printed again after.
# (Ctrl-C ends the watch with 130, not by the signal, so bash runs no INT trap for it: stop here ourselves)
every=1; [ -t 1 ] || every=5
gpupool smi --watch --interval $every --until-pid $train_pid --log "$state/train.log" || {
  [ $? != 130 ] || { echo "interrupted: stopping the training and the pool"; exit 130; }
}
rc=0; wait $train_pid || rc=$?
[ ! -t 1 ] || grep -vE ' step [0-9]+: ' "$state/train.log" || true
[ $rc = 0 ] || { echo "training failed (exit $rc):"; tail -n 40 "$state/train.log"; exit $rc; }
echo "classifying two reviews with the trained model on the CPU (the edge site):"
"$py" examples/sentiment/infer.py --model "$out" "A moving, beautifully acted film. I loved every minute." \
  "Dull, predictable and far too long. A waste of time."
if [ $web = 1 ]; then
  echo "serving $out on http://127.0.0.1:${GPUPOOL_WEB_PORT:-8000} (Ctrl-C stops)"
  "$py" examples/sentiment/web.py --model "$out" --port "${GPUPOOL_WEB_PORT:-8000}"
fi
