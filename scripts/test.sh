#!/usr/bin/env bash
# Set up (idempotent) and run every check CI runs: generated code is fresh, ruff, mypy, import contracts, and the
# test suite (its bytecode written once beforehand, beside the checks: __pycache__/, git-ignored). Each step says
# what it runs before it starts: the suite takes about 30 min on 2 cores (mypy 2-3 min), and until round 55 nothing
# said so. Arguments go to pytest: `bash scripts/test.sh tests/unit` checks everything but runs only tests/unit.
# --help / -h: print this header (what the script does, its options) and exit, running nothing (round 48).
if [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  exit 0
fi
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "test.sh: $*"; }
bash scripts/setup.sh
tmp=$(mktemp -d); warm=""; trap '[ -z "$warm" ] || kill "$warm" 2>/dev/null; rm -rf "$tmp"' EXIT
# Bytecode written once, beside the checks below: a `--collect-only` of the same tests, allowed to write .pyc files
# (__pycache__/, git-ignored), imports every test module and what it imports. Each pytest-xdist worker collects the
# whole suite, and with PYTHONDONTWRITEBYTECODE=1 (this box's environment) each compiled every module from source and
# pytest rewrote the asserts of all 272 test files again (504 s at load 20 in round 50); so did every `gpupool serve`,
# zygote and script the tests start, for the product's modules. The run itself still writes nothing: Python and
# pytest read a .pyc whose source's mtime and size match, else compile the source as before. At load 14-16 the two
# workers' collection took 55 s (14 CPU s) after a 100 s warm-up, which overlaps mypy (142 s), against 193 s (33 CPU
# s) on the base (BENCHMARKS.md "Round 51, suite51").
env -u PYTHONDONTWRITEBYTECODE python3 -m pytest -q -p no:cacheprovider --collect-only "$@" >"$tmp/warm.log" 2>&1 &
warm=$!
# (its output, protoc's "Writing mypy to gpupool/v1/..." lines of each file, shown only where it fails: round 53)
say "generated code: gpupool/_proto as scripts/gen_proto.sh makes it"
bash scripts/gen_proto.sh "$tmp/_proto" >"$tmp/gen_proto.log" 2>&1 || { cat "$tmp/gen_proto.log" >&2; exit 1; }
diff -r -x __pycache__ "$tmp/_proto" gpupool/_proto || { echo "gpupool/_proto is stale: run scripts/gen_proto.sh" >&2; exit 1; }
say "ruff check ."
python3 -m ruff check .
say "mypy gpupool server scheduler client (2-3 min on 2 cores)"
python3 -m mypy gpupool server scheduler client
say "import contracts: scripts/lint_imports.sh"
bash scripts/lint_imports.sh  # .importlinter: the programs never import each other; client/torch is layered
# --durations=30: every log ends with the 30 slowest setups, calls and teardowns (the suite should stay under ~30 min),
# then (tests/conftest.py, round 54) the 30 test files with the most summed seconds and each worker's busy total.
# Pytest-xdist workers, a test file each at a time (--dist loadfile: a module's fixtures are set up once, as in one
# process). Much of the suite waits (children starting, daemons answering, timeouts): on two cores it took 11-18 min
# this way against 34 min in one process (BENCHMARKS.md, "Round 26, suite26"). GPUPOOL_TEST_WORKERS=0: one process.
# --no-loadscope-reorder (pytest-xdist 3.8): the workers take the files in tests/conftest.py's order, the modules with
# a slow test first and the many short ones evening out the end. By default xdist sorts the files by their number of
# tests instead, which put the long modules of one or two tests (the sentiment example, the fresh-clone demo, the
# three ranks, op_db, the fuzzers) among the last 70 of 267 files, where one taken late runs alone (round 50).
# tests/conftest.py `SHARED_WORK_UNITS` (round 55): test files that use another's cached runs are that file's unit
# (one worker makes each run once).
# Three workers since round 56 (the CPU idle a quarter of a 2-worker run waiting on children and daemons): the whole
# CI green at -n 3 in 1231.7 s (round 55) and 1254.3 s (round 56) against 1453.5-1538.7 s at -n 2, each test ~27 %
# longer, the slowest phase 78.8 s (the timeout is 300 s); BENCHMARKS.md "Round 56, lead: -n 3 the default".
workers=${GPUPOOL_TEST_WORKERS:-3}
wait "$warm" || true  # (a collection error is the run's to report)
warm=""
say "pytest ${*:-(the whole suite: about 21 min on 2 cores, a dot a test, the 30 slowest phases at the end)}"
python3 -m pytest -q -p no:cacheprovider --durations=30 -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
