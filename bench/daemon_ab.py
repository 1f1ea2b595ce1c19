"""The daemon's cost per eager op, this checkout's daemon against another checkout's, with the same client.

`launch_bound.py --against DIR` shows the daemon's CPU per op and the step time of both daemons side by side, but
CPU time moves by tens of percent between runs of the same code on a shared 2-core box. This counts instead:
each side's daemon (`gpupool serve --fake-gpus 1`, one torch thread) runs under callgrind with its
instrumentation off, and the launch-bound eager worker of this checkout (Adam, one torch thread, the batch
uploaded every step) switches it on in the daemon's whole process tree -- the front, the zygote and the
session's worker -- for its timed blocks only, then has each process dump its counts. The result is exact and
does not depend on the load: the instructions the daemon spends per aten op, its kernels included (the same
kernels on both sides), and, per process, where they went (front = the daemon process: gRPC, the stream
reader, the device thread; worker = the session's worker process).

Both daemons run with slices bounded by their commands only, not by the 5 ms budget (valgrind slows a slice
~50x, and natively a frame's slice ends well within it), with `--seccomp off` (valgrind's own system calls are
not the worker's) and, as root, `--worker-user keep` (callgrind_control must reach the worker, which must write
its counts); the sandbox is set up once per session, so it does not change the per-op figures. The client runs
ahead of the slowed daemon, so its frames queue and the device's thread takes two at a time (64 commands), where
natively the stream reader mostly runs each frame as it comes: the front's count is that of the queued path.

`--mode captured` runs the step as one RunGraph (gpupool.torch.capture, Adam with capturable=True) and counts per
step: the front, the worker, and apart from the worker the instructions inside its TorchScript graph's call
(`kernels`: the kernels, the interpreter's dispatch of them and its argument stack); `outside` is the worker less
those -- the fixed cost of a step on the worker. `--with-client` runs each side's own client under callgrind too
(its python, its gpupool) and counts it over the same steps, all its threads (gRPC's and the hold timer's
included); `all outside` = client + front + worker outside the kernels: a captured step's fixed cost, the figure
of record for issue 8's captured target (launch_bound.steady_for_callgrind keeps its frames and waits as native).

`--mode native` runs launch_bound's `native` worker instead (the C++ client of `gpupool run --native-client`), per
op as eager. `BENCH_DAEMON_FLAGS` adds flags to both daemons (`"--bulk-listen 127.0.0.1:0"`: frames on the side
socket, as `gpupool up` runs a daemon). With `BENCH_CG_THREADS=1` callgrind writes a dump a thread
(`--separate-threads=yes`) and the front is split by thread: `grpc`, gRPC's threads (those with 5 % or more of their own
instructions in its C core, cygrpc: its pollers and handler threads), whose counts grow with the run's wall
time under valgrind, not only with its ops (round 43); `own`, the daemon's own Python threads (the side socket's
reader, the device's thread that runs the queued slices, the accept loop, timers). Until round 46 the busiest thread
was shown as `reader`: on the classifier (40 min under valgrind) that was a gRPC thread, not the frames' reader.
A copy counts about one instruction a byte under callgrind (glibc's memcpy of more than a few KiB is `rep movsb`,
counted an instruction an iteration; natively it moves tens of bytes a cycle): read a front's memcpy as bytes moved.

Eager and native runs also split the worker (round 44, a line below each side's): `outside runner` (the slice's loop
around the C++ runner), `runner own` (`Ctx::run` less the ops it calls), `call_op` (the ops called as themselves:
the dispatcher and the kernels) and `call_py` (the ops a Python function runs: a fake GPU's dropout composition and
the fused attention's compositions, whose Python and kernels are both in it; the encoder's "74k in the runner" of
round 43 was ~60k of these and ~13k of the runner's own) and, since round 45, `call_cpp` (the same compositions run
in C++ by the runner: the attention's eager calls with dropout, a fake GPU's dropout; their kernels and glue).

    nice python bench/daemon_ab.py --against /work/main                      # ~3 min per side and model
    BENCH_CG_THREADS=1 BENCH_DAEMON_FLAGS="--bulk-listen 127.0.0.1:0" nice python bench/daemon_ab.py --against DIR \
        --mode native --models tiny-mlp,encoder --profile /tmp/cg
    nice python bench/daemon_ab.py --against /work/main --models tiny-mlp,encoder --profile /tmp/cg
    nice python bench/daemon_ab.py --against /work/main --mode captured --with-client   # ~5 min per side
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cgtools  # noqa: E402


def _tree(pid: int) -> list[int]:
    """The process and its descendants alive now."""
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                out += _tree(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _control(pids: list[int], *flags: str) -> None:
    for pid in pids:
        cgtools.control(*flags, pid=pid)


def _client(argv: list[str]) -> int:
    """The worker, with the daemon's callgrind switched on from its first timed block to its end (and the client's
    own, with --counted: it runs under callgrind too)."""
    import launch_bound as lb

    counted = "--counted" in argv
    args = lb.worker_args([a for a in argv if a != "--counted"])
    pids: list[int] = []
    marks: list[int] = []

    def first_block(pid: int) -> float:  # called at every block's start and end: the first call starts counting
        if not pids:
            if args.mode == "native":
                from over_kernels import native_ops

                marks.append(native_ops())
            pids.extend(_tree(pid))
            _control(pids, "--zero", "--instr=on")
            if counted:
                _control([os.getpid()], "--instr=on")
        return 0.0

    lb.steady_for_callgrind(args.mode)
    lb._tree_cpu = first_block
    from gpupool.client.session import Session

    # a valgrind-slowed zygote forks and starts the session's worker in tens of seconds on a loaded box: past
    # Attach's 10 s (round 43: the encoder's Attach timed out at load 19)
    attach = Session.attach.__func__  # type: ignore[attr-defined]
    Session.attach = classmethod(lambda cls, *a, timeout=10.0, **kw: attach(cls, *a, timeout=max(timeout, 600.0), **kw))  # type: ignore[method-assign,assignment]
    out = lb.worker(args)
    if args.mode == "native":  # the C++ client's ops at the counted blocks' start and end (bench/over_kernels.py)
        from over_kernels import native_ops

        out["marks"] = [marks[0], native_ops()]
    if counted:
        _control([os.getpid()], "--instr=off")
    _control(pids, "--instr=off", "--dump=ab")
    steps = args.blocks * args.steps
    print(json.dumps({"ops": out["commands_per_step"] * steps, "steps": steps, "pids": pids, **out}))
    return 0


SLICE_SECONDS = 30.0  # under valgrind a 32-op slice takes ~50x its 1-2 ms: no time budget may cut it short


def _serve(argv: list[str]) -> int:
    """`gpupool serve ARGV` (of whichever checkout `import gpupool` finds) with slices bounded by commands only:
    natively a frame's slice ends well within its 5 ms budget; under valgrind it would end after a command or
    two, and the rest of it would be copied, sent and parsed again for every command (not what runs natively)."""
    from gpupool.server import daemon, zygote

    if os.environ.get("BENCH_RECORD_FRAMES"):  # bench/over_kernels.py --measure instr: the batches the readers queue
        from over_kernels import record_frames

        record_frames(os.environ["BENCH_RECORD_FRAMES"])

    # under valgrind the zygote's start (importing torch, building nothing) is ~50x slower: on a loaded box past
    # the daemon's 120 s
    wait_ready = zygote.Zygote.wait_ready
    zygote.Zygote.wait_ready = lambda self, timeout=900.0, **kw: wait_ready(self, max(timeout, 900.0), **kw)  # type: ignore
    start = daemon.Daemon.start

    def patched(self: Any) -> None:
        for w in self.workers:
            w.slice_seconds = SLICE_SECONDS
        start(self)

    daemon.Daemon.start = patched  # type: ignore[method-assign]
    from gpupool import cli

    return int(cli.main(["serve", *argv]))


def _start(
    python: str, cwd: str, key_file: str, core: int, out_dir: Path, record: Path | None = None
) -> tuple[subprocess.Popen[str], str]:
    from train_overhead import start_listening

    exe = subprocess.check_output([python, "-c", "import sys; print(sys.executable)"], text=True, cwd=cwd).strip()
    threads = ["--separate-threads=yes"] if os.environ.get("BENCH_CG_THREADS") else []
    cmd = ["taskset", "-c", str(core), *cgtools.valgrind(f"{out_dir}/cg.%p", "--trace-children=yes", *threads), exe,
           str(HERE / "daemon_ab.py"), "--serve",
           "--listen", "127.0.0.1:0",
           "--metrics-listen", "0", "--fake-gpus", "1", "--fake-gpu-memory", "16GiB", "--token-public-keys", key_file,
           "--host-id", "bench", "--seccomp", "off", "--worker-user", "keep"]  # fmt: skip
    cmd += os.environ.get("BENCH_DAEMON_FLAGS", "").split()  # e.g. "--bulk-listen 127.0.0.1:0": frames on the socket
    env = {"BENCH_RECORD_FRAMES": str(record)} if record is not None else None
    return start_listening(cmd, cwd, "gpupool serve under valgrind", env)


def _total(dump: Path) -> int:
    lines = dump.read_text(errors="replace").splitlines()
    totals = [line for line in lines if line.startswith(("totals:", "summary:"))]
    return int(totals[-1].split()[1]) if totals else 0


# Where a captured step's kernels run in the worker: TorchScript's call of the graph's function (the kernels, the
# interpreter's dispatch of them and its argument stack); everything else in the worker is per-step bookkeeping.
KERNELS = "torch::jit::GraphFunction::run("


# The eager worker's runner apart (round 44): the C++ runner's call (`Ctx::run`), inside it the ops called as
# themselves (`call_op`: the dispatcher and the kernels) and the ops run by a Python function (`call_py`: a fake GPU's
# dropout composition, the fused attention's compositions on every device: their Python and their kernels); since
# round 45 the same compositions run in C++ (`call_cpp`: native_runner.cpp `attn::run`, `dropout::run`, their kernels
# and their glue; absent from older runners: 0)
RUNNER = {"runner": "(anonymous namespace)::Ctx::run(", "call_op": "(anonymous namespace)::call_op(",
          "call_py": "(anonymous namespace)::call_py(", "attn": "(anonymous namespace)::attn::run(",
          "dropout": "(anonymous namespace)::dropout::run("}  # fmt: skip


def _inclusive(dump: Path, *symbols: str) -> list[int]:
    """Inclusive instructions of the functions whose name holds each of `symbols` in one dump (0 if none ran)."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", "--auto=no", str(dump)],
                         capture_output=True, text=True, check=False).stdout  # fmt: skip
    best = [0] * len(symbols)
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) != 3:
            continue
        for j, symbol in enumerate(symbols):
            if symbol in parts[2]:
                best[j] = max(best[j], int(parts[0].replace(",", "")))
    return best


def _counts(out_dir: Path, pids: list[int], daemon_pid: int) -> dict[str, int]:
    """Instructions of the dumps the client asked for (cg.PID.N; the one at exit is cg.PID): the daemon process
    (front) and its descendants (zygote, session worker), and the worker's inside the TorchScript call."""
    front = rest = kernels = own = grpc = 0
    runner = dict.fromkeys(RUNNER, 0)
    for pid in pids:
        for dump in out_dir.glob(f"cg.{pid}.*"):
            n = _total(dump)
            if pid == daemon_pid:
                front += n
                if "-" in dump.name and n:  # BENCH_CG_THREADS: a dump a thread (`_grpc_thread`)
                    if _grpc_thread(dump):
                        grpc += n
                    else:
                        own += n
            else:
                rest += n
                if n:
                    kernels_of, *of_runner = _inclusive(dump, KERNELS, *RUNNER.values())
                    kernels += kernels_of
                    for key, got in zip(RUNNER, of_runner, strict=True):
                        runner[key] += got
    threads = {"grpc": grpc, "own": own} if own or grpc else {}
    return {"front": front, "worker": rest, "kernels": kernels, **threads, **runner}


# A front thread that runs gRPC's C core (its Cython module, where its own instructions lie for a share of them at
# least GRPC_SHARE): gRPC's pollers and the stream's handler threads. The others are the daemon's own Python
# threads: the side socket's reader, the device's thread, the timers.
GRPC_CORE = "cygrpc"
GRPC_SHARE = 0.05


def _grpc_thread(dump: Path) -> bool:
    """Whether one thread's dump of the front is one of gRPC's threads (`GRPC_CORE`)."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", "--auto=no", str(dump)],
                         capture_output=True, text=True, check=False).stdout  # fmt: skip
    total = core = 0
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) != 3 or not parts[1].startswith("(") or "PROGRAM TOTALS" in parts[2]:
            continue
        n = int(parts[0].replace(",", ""))
        total += n
        core += n if GRPC_CORE in parts[2] else 0
    return bool(total) and core >= GRPC_SHARE * total


def _side(name: str, python: str, cwd: str, model: str, a: argparse.Namespace, key_file: str, token: Any,
          tmp: str, record: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """One side's counts per op (eager) or per step (captured): front, worker, kernels (the worker's
    instructions inside the TorchScript graph's call, captured only) and client (with --with-client). `record`:
    the daemon records the batches its readers queue there, and the result holds the client's op `marks` and
    `steps` (native mode: bench/over_kernels.py)."""
    out_dir = Path(a.profile or tmp) / f"{name}.{model}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    proc, address = _start(python, cwd, key_file, a.daemon_core, out_dir, record)
    try:
        flags = ["--model", model, "--mode", a.mode, "--steps", str(a.steps), "--blocks", str(a.blocks),
                 "--warmup", str(a.warmup), "--address", address, "--token", token(),
                 "--daemon-pid", str(proc.pid), "--adam", a.adam]  # fmt: skip
        client = [sys.executable, str(HERE / "daemon_ab.py"), "--client", *flags]
        if a.with_client:  # the side's own client (its python, its gpupool), counted by callgrind too
            exe = subprocess.check_output([python, "-c", "import sys; print(sys.executable)"], text=True).strip()
            client = [*cgtools.valgrind(f"{out_dir}/client"), exe, str(HERE / "daemon_ab.py"), "--client", *flags,
                      "--counted"]  # fmt: skip
        cmd = ["taskset", "-c", str(a.client_core), *client]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                             cwd=cwd if a.with_client else str(HERE.parent))  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"{name} {model} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        for _ in range(100):  # the dumps are written asynchronously by each process
            counts = _counts(out_dir, r["pids"], r["pids"][0])
            if counts["front"] and counts["worker"]:
                break
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    if a.with_client:
        counts["client"] = _total(out_dir / "client")
    per = r["steps"] if a.mode == "captured" else r["ops"]
    res: dict[str, Any] = {k: v / per for k, v in counts.items()}
    res["ops"] = r.get("graph_ops", 0) if a.mode == "captured" else 1
    if "marks" in r:
        res.update(marks=r["marks"], steps=r["steps"])
    return res


def _parts(mode: str, client: bool, threads: bool = False) -> list[str]:
    parts = ["front", "worker"] + (["outside", "kernels"] if mode == "captured" else []) + ["total"]
    parts = (["grpc", "own"] if threads else []) + parts
    return parts + (["client", "all outside"] if client and mode == "captured" else ["client"] if client else [])


def _line(r: dict[str, float], mode: str) -> str:
    """One side's figures; captured: per step, `outside` = the worker outside its TorchScript call, `all outside`
    = client + front + worker outside the kernels (the step's fixed cost)."""
    r["total"] = r["front"] + r["worker"]
    if mode != "captured" and r.get("runner"):  # the worker's eager split: outside the runner, the runner's own,
        # the ops called as themselves, the ops run by a Python function (their Python and their kernels)
        r["outside runner"] = r["worker"] - r["runner"]
        r["call_cpp"] = r.get("attn", 0.0) + r.get("dropout", 0.0)
        r["runner own"] = r["runner"] - r["call_op"] - r["call_py"] - r["call_cpp"]
    if mode == "captured":
        r["outside"] = r["worker"] - r["kernels"]
        if "client" in r:
            r["all outside"] = r["client"] + r["front"] + r["outside"]
    unit = f"instructions per step ({r['ops']:.0f} ops)" if mode == "captured" else "instructions per op"
    line = "  ".join(f"{k} {r[k] / 1e3:8.1f}k" for k in _parts(mode, "client" in r, "own" in r)) + f"  {unit}"
    if "runner own" in r:
        line += "\n" + " " * 17 + "worker: " + "  ".join(f"{k} {r[k] / 1e3:.1f}k" for k in SPLIT)
    return line


# the worker's eager split (`_line`): `call_py`, the ops a Python function runs (their Python and their kernels);
# `call_cpp`, the same compositions run in C++ (round 45)
SPLIT = ("outside runner", "runner own", "call_op", "call_py", "call_cpp")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:  # the daemon under valgrind: no torch, rich or bench helpers imported here
        return _serve(argv[1:])
    import launch_bound as lb
    from train_overhead import bench_daemons

    if argv[:1] == ["--client"]:
        return _client(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", metavar="DIR", required=True, help="the other checkout (the baseline)")
    p.add_argument("--against-python", default="", help="its python (default: DIR/.venv/bin/python)")
    p.add_argument("--models", default="tiny-mlp", help="comma-separated: " + ",".join(lb.MODELS))
    p.add_argument("--mode", choices=("eager", "captured", "native"), default="eager",
                   help="captured: the step as one RunGraph (gpupool.torch.capture); counts per step, with the "
                   "worker's TorchScript call (kernels) apart")  # fmt: skip
    p.add_argument("--with-client", action="store_true", help="run each side's own client under callgrind too and "
                   "count it (default: this checkout's client, not counted)")  # fmt: skip
    p.add_argument("--adam", choices=lb.ADAMS, default="capturable", help="launch_bound's --adam (fused needs a "
                   "daemon with gpupool/metas.py on both sides: --against this checkout)")  # fmt: skip
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--warmup", type=int, default=0, help="steps before counting (default: 4 eager; 7 captured: "
                   "one eager, two recorded, one plain replay, the TorchScript trace, and two more)")  # fmt: skip
    p.add_argument("--daemon-core", type=int, default=1)
    p.add_argument("--client-core", type=int, default=0)
    p.add_argument("--profile", default="", help="keep callgrind's files in this folder (SIDE.MODEL/cg.PID.N) for "
                   "`callgrind_annotate --inclusive=yes`")  # fmt: skip
    p.add_argument("--only", choices=("base", "this"), default="", help="count one side only (no ratios)")
    a = p.parse_args(argv)
    a.warmup = a.warmup or (7 if a.mode == "captured" else 4)
    if shutil.which("valgrind") is None:
        p.error("needs valgrind (apt-get install valgrind)")
    base_python = a.against_python or str(Path(a.against) / ".venv" / "bin" / "python")
    sides = [("base", base_python, a.against), ("this", sys.executable, str(HERE.parent))]
    sides = [side for side in sides if a.only in ("", side[0])]
    print(f"load average {os.getloadavg()[0]:.1f} (counts do not depend on it)", flush=True)
    res: dict[tuple[str, str], dict[str, float]] = {}
    # bench_daemons for its loopback PKI and token key only (no daemon of its own)
    # (a worker that outlives its daemon may still write its dump there while the folder goes: not an error)
    with bench_daemons(a.daemon_core, ()) as daemons, tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        key_file = str(daemons.key_file)
        for model in a.models.split(","):
            for name, python, cwd in sides:
                r = res[(model, name)] = _side(name, python, cwd, model, a, key_file, daemons.token, tmp)
                print(f"{model:>10} {name:>4}: " + _line(r, a.mode), flush=True)
    for model in a.models.split(",") if not a.only else ():
        base, this = res[(model, "base")], res[(model, "this")]
        parts = _parts(a.mode, a.with_client, "own" in base and "own" in this)
        parts += [k for k in SPLIT if k in base and k in this]
        ratios = ", ".join(f"{k} {this[k] / base[k]:.3f}" for k in parts if base[k])
        print(f"{model:>10}: this/base {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
