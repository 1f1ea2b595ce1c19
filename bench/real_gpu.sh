#!/usr/bin/env bash
# The real-GPU checks in one call, for a host with an NVIDIA GPU and this checkout installed
# (`pip install --no-deps --no-build-isolation -e .` where the project's dependencies are already there).
# Each stage has its own time limit and its own log under $OUT (default ./real_gpu_out), so one that fails or
# runs long leaves the others' results:
#   info      the GPU, torch, the compiler
#   tests     the tests that run only on a CUDA device (CUDA graphs, the worker's memory cap, the slice timer's
#             run-ahead, pinned staging, the native runner below autograd, index guards, eager attention dropout)
#   tiny      launch_bound --gpu: tiny MLP and encoders, local CUDA vs the pool (shim eager, captured)
#   native    the same through the C++ client (its first build included)
#   big       the stock MLP and the sentiment CNN, local CUDA vs the pool
#   overlap   the sentiment CNN at batch 400 (GPU-bound) and the stock MLP, eager: slices running ahead of the GPU
#             (round 31) against the same tree with every slice waiting (GPUPOOL_RUN_AHEAD=0), side by side
#   cudagraph the transformer classifier, local CUDA vs the pool; then, for every stage's captured steps, which became
#             CUDA graphs (dropout, embeddings: server/graph_cuda.py) and whether their losses equal the eager ones
#             through the same daemon from the same seed ("captured vs eager" lines)
# The daemon's log of each launch_bound run is kept (graphs captured as CUDA graphs or not, errors).
# STAGES (default: all, in this order: info tests tiny overlap cudagraph big native) names the stages to run, e.g.
# `STAGES="info tests tiny" bash bench/real_gpu.sh`: device time is short, the most telling stages come first. On a fresh
# machine the first daemon start builds the shim's native ops and the runner (tiny: ~150 s in all), native the C++ client.
set -u
STAGES=" ${STAGES:-info tests tiny overlap cudagraph big native} "
OUT=${OUT:-real_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 secs=$2
    shift 2
    case "$STAGES" in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name ($(date -u +%T), limit ${secs}s)"
    local t0=$SECONDS
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - t0))s"
    tail -n "${TAIL:-25}" "$OUT/$name.log"
}
stage info 60 bash -c 'nvidia-smi -L; nproc; python3 -V; g++ --version | head -1; python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0))"'
stage tests "${T_TESTS:-150}" python3 -m pytest -q -p no:cacheprovider -rs tests/unit/test_graph_cuda.py \
    tests/unit/test_server_worker_gpu_cap.py tests/unit/test_server_slice_timer.py tests/unit/test_staging_cuda.py \
    tests/unit/test_server_runs.py::test_below_autograd_on_a_cuda_session \
    tests/unit/test_server_guards.py::test_bounds_on_a_gpu_read_the_host_once \
    tests/unit/test_server_attention_saved.py::test_an_eager_call_with_dropout_on_a_gpu_keeps_its_scores_and_never_waits_for_the_device
# The daemons run as `gpupool up` starts them, with the side port (a session's frames on one TLS socket instead of
# gRPC messages: the front's per-frame Python is gRPC's); BENCH_DAEMON_FLAGS= (empty) measures the gRPC stream instead.
# (Rounds 29 and 31 measured without it: their eager figures paid gRPC's receive path per frame.)
export BENCH_DAEMON_FLAGS="${BENCH_DAEMON_FLAGS---bulk-listen 127.0.0.1:0}"
LB="python3 bench/launch_bound.py --gpu --rounds 1 --steps 50 --blocks 3"
BENCH_DAEMON_LOG=$OUT/tiny.daemon.log stage tiny "${T_TINY:-200}" $LB --models tiny-mlp,encoder-nodrop,encoder --modes local,eager,captured
BENCH_DAEMON_LOG=$OUT/overlap.daemon.log stage overlap "${T_OVERLAP:-150}" $LB --models cnn-big,mlp --modes local,eager --against . --against-python python3 --against-env GPUPOOL_RUN_AHEAD=0
BENCH_DAEMON_LOG=$OUT/cudagraph.daemon.log stage cudagraph "${T_CUDAGRAPH:-150}" $LB --models classifier --modes local,eager,captured
BENCH_DAEMON_LOG=$OUT/big.daemon.log stage big "${T_BIG:-120}" $LB --models mlp,cnn --modes local,eager,captured
BENCH_DAEMON_LOG=$OUT/native.daemon.log stage native "${T_NATIVE:-260}" $LB --models tiny-mlp,encoder-nodrop,encoder --modes local,native,native-captured
# CUDA graphs of every stage above (tiny: encoders, big: the CNN, cudagraph: the classifier): captured ones draw
# what eager draws from the same seed (~1e-6 is capturable Adam's rounding; a different dropout stream is 1e-2 and up)
grep -h "captured vs eager\|native-captured vs native" "$OUT"/*.log
# one line per graph and daemon log: captured as a CUDA graph, or why it stays eager
grep -o "graph [0-9]* captured as a CUDA graph.*\|graph [0-9]* stays eager on CUDA.*" "$OUT"/*.daemon.log | sort | uniq -c
grep -h -i "cuda graph\|stays eager\|error\|traceback" "$OUT"/*.daemon.log | sort | uniq -c | sort -rn | head -20
