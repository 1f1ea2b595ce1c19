#!/usr/bin/env bash
# Install everything gpupool needs on a fresh Debian machine: system packages (Prometheus for the e2e tests,
# PostgreSQL for the scheduler's HA tests - the tests start their own server with initdb/pg_ctl -, libseccomp2 for
# the daemon's sandboxed session workers, Chromium and its WebDriver for the browser test of the sentiment web page,
# g++ for the client's native device guard, ninja for the daemon's native runner and the C++ client), torch 2.13.0
# (pinned; the CPU build where the index has it, see GPUPOOL_TORCH_INDEX below), and the project with its dev extras
# (GPUPOOL_SETUP_EXTRAS=NAMES: those instead; scripts/demo.sh: demo). Last it builds the native device guard (client/torch/native_guard.cpp,
# ~1-2 s) into the per-user cache, so that tests and CI find it built; `import gpupool.torch` would build it at
# first use anyway, and without a compiler the client keeps torch's Python device guard (GPUPOOL_NATIVE=0 forces that).
# GPUPOOL_SETUP_SHIM=0 (scripts/demo.sh: it runs the C++ client) skips that guard and the Python client's op path.
# --help / -h: print this header (what the script does, its options) and exit, running nothing (round 48).
if [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  exit 0
fi
set -euo pipefail
cd "$(dirname "$0")/.."
have_pg() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
have_seccomp() { ldconfig -p | grep -q libseccomp.so.2; }
have_tools() { command -v prometheus && command -v chromium && command -v chromedriver && command -v g++ && command -v ninja; } >/dev/null 2>&1
if [ "${GPUPOOL_SKIP_APT:-0}" != 1 ] && ! { have_tools && have_pg && have_seccomp; }; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus postgresql libseccomp2 chromium \
      chromium-driver g++ ninja-build >/dev/null
  else
    echo "setup: no apt-get; install Prometheus, PostgreSQL, libseccomp2, Chromium (+ chromedriver), g++ and ninja yourself" >&2
  fi
fi
# torch as pip's indexes have it: PyPI's Linux wheel is the CUDA build (GBs); GPUPOOL_TORCH_INDEX (an extra index,
# e.g. https://download.pytorch.org/whl/cpu) offers 2.13.0+cpu, which pip prefers; a machine whose pip config already
# offers a CPU wheel (the project's CI box: a local wheel folder) needs nothing.
# pip -q prints nothing while it works (round 49's walk: 253 s silent at load 17; round 47's fresh clone sat 12 silent
# minutes at load 30 before the demo's first line): `ticking` says what is coming, then a line every
# $GPUPOOL_SETUP_TICK s (default 30) while it runs, and how long it took.
ticking() {  # ticking WHAT COMMAND...: COMMAND's status
  local what=$1 began rc=0 ticker
  shift
  began=$(date +%s)
  echo "setup: $what (a line every ${GPUPOOL_SETUP_TICK:-30} s while it works)"
  # (sleep's output goes nowhere: a ticker killed mid-sleep leaves no holder of setup's stdout, a reader's pipe;
  # kill -0 $$: a ticker whose script died - Ctrl-C, which a script's background job ignores - stops by itself)
  while sleep "${GPUPOOL_SETUP_TICK:-30}" </dev/null >/dev/null 2>&1 && kill -0 $$ 2>/dev/null; do
    echo "setup: ... $what: $(($(date +%s) - began)) s so far"
  done &
  ticker=$!
  "$@" || rc=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  echo "setup: $what: $([ $rc = 0 ] && echo done || echo "failed (exit $rc)") in $(($(date +%s) - began)) s"
  return $rc
}
ticking "pip: torch==2.13.0 (a fresh venv: minutes)" python3 -m pip install -q --disable-pip-version-check \
  ${GPUPOOL_TORCH_INDEX:+--extra-index-url "$GPUPOOL_TORCH_INDEX"} "torch==2.13.0"
# GPUPOOL_SETUP_EXTRAS: the project's extras to install (default dev: the tests' and checks' tools); the demo asks for
# `demo` alone (flask, for --web): round 54's fresh-clone walk spent 7+ min (load 15) installing dev's linters, type
# checkers, test runners, selenium and scikit-learn (scipy), none of which the demo runs
extras=${GPUPOOL_SETUP_EXTRAS-dev}
ticking "pip: gpupool${extras:+ and its $extras extras}" python3 -m pip install -q --disable-pip-version-check \
  -e ".${extras:+[$extras]}"
echo "setup: building the native pieces into ${XDG_CACHE_HOME:-$HOME/.cache}/gpupool (once: minutes on a fresh machine, seconds after)"
GPUPOOL_NATIVE=0 GPUPOOL_NATIVE_OPS=0 python3 - <<'PY'  # build() below, not the import's own try (one message)
import os, sys
from gpupool.client.torch import native
# The Python client's pieces (its device guard and op path): GPUPOOL_SETUP_SHIM=0 (scripts/demo.sh, which runs the C++
# client) leaves them to that client's first use (round 56's fresh-clone walk: 90 s of its setup at load 13-14)
if os.environ.get("GPUPOOL_SETUP_SHIM", "1") == "0":
    print("setup: the Python client's native device guard and op path: built at its first use (GPUPOOL_SETUP_SHIM=0)")
else:
    try:
        print("setup: native device guard:", native.build())
    except native.BuildError as exc:  # optional: the client keeps torch's Python device guard
        print(f"setup: the native device guard did not build ({exc}); the client keeps torch's Python one",
              file=sys.stderr)
    try:  # the steady path of an eager op in C (client/torch/native_ops.cpp; CPython's headers)
        from gpupool.client.torch import native_ops

        print("setup: native op path:", native_ops.build())
    except native.BuildError as exc:  # optional: the Python dispatcher does every op
        print(f"setup: the native op path did not build ({exc}); the Python dispatcher does every op",
              file=sys.stderr)
try:  # a captured step's guard check in C (client/capture_guard.cpp; CPython's headers; both clients)
    from gpupool.client import capture_guard

    print("setup: capture guard check:", capture_guard.build())
except native.BuildError as exc:  # optional: the guard key is read in Python
    print(f"setup: the capture guard check did not build ({exc}); its Python path is used", file=sys.stderr)
PY
# The daemon's native runner of learned runs (server/native_runner.cpp, g++ and ninja; ~45 s of CPU once, minutes on a
# loaded machine): built now into the per-user cache so that a daemon's zygote finds it built instead of building it
# while sessions wait to attach. Its estimate first, a progress line every 15 s while the compiler runs (round 48's
# fresh clone sat here 2-5 silent minutes), and one line if it cannot build, naming the Python path the daemon takes.
python3 - <<'PY'
import logging, sys, time
from gpupool import buildcache
from gpupool.server import native_runner
logging.basicConfig(level=logging.WARNING, format="setup: %(message)s", stream=sys.stdout, force=True)
logging.getLogger(native_runner.__name__).setLevel(logging.INFO)  # its progress lines
why = native_runner.missing()
if why:
    print(f"setup: native runner: not built ({why}): the daemon runs learned runs in Python (slower eager steps, the same results)")
elif not native_runner.needs_build():
    print("setup: native runner:", "built" if native_runner.load() is not None else "not loaded (the line above says why)")
else:
    print(f"setup: building the daemon's native runner ({buildcache.estimate(native_runner.BUILD_CPU)}; a line every "
          f"{buildcache.PROGRESS_EVERY:.0f} s) into {native_runner.cache_dir()}", flush=True)
    began = time.monotonic()
    if native_runner.load() is not None:
        print(f"setup: native runner: built in {buildcache.duration(time.monotonic() - began)}")
PY
# The C++ client, `gpupool run`'s default client (client/native/native_client.cpp, g++ and ninja, ~30 s of CPU once;
# its estimate, then a line every 15 s while it compiles): built
# now into the per-user cache, so that tests and a first `gpupool run` find it built (without it `gpupool run` falls
# back to the Python client with one line saying why).
TORCH_DEVICE_BACKEND_AUTOLOAD=0 python3 - <<'PY'
import sys
from gpupool.client.native import backend
try:
    print("setup: native client:", backend.build())
except backend.BuildError as exc:  # optional: `gpupool run` then uses the Python client
    print(f"setup: {exc} (gpupool run will use the Python client)", file=sys.stderr)
PY
