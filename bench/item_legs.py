"""Where a lone `.item()`'s round trip goes, leg by leg, in a live TLS daemon (one fake GPU, loopback), beside a
lone Sync and a bare gRPC stream ping-pong (bench/daemon_wire.py's floor server) measured in the same blocks.

The daemon's process notes the moments a frame passes (CLOCK_MONOTONIC, the client's clock too) through a
`sitecustomize` put on its PYTHONPATH for the run, which wraps five functions of the daemon's front and changes
nothing else: `protocol.lone_sync` (the stream's reader has the frame: its first call on each), `ProcessRunner.run`
(the slice's hand-off to the session's worker process and its result back), `FrontSession.send` (the reply is in
the session's outbox), `service._serialize_frame` (the stream's writer took the reply and gRPC serializes it)
and `FairQueue.done` (the reader is done with the slice). So an `.item()` reads as:

    to reader      client's call -> the reader has the frame (client gRPC, TLS, the daemon's gRPC threads, the wake-up)
    to worker      the reader's split, checks, fair queue, slice request
    worker         the worker process's round trip: two wake-ups and the worker's Python (the Sync, the result)
    to outbox      the result decoded and mirrored (ledger, memory), the reply queued
    to writer      the stream writer's wake-up and the GIL (the reader -> writer hop)
    to client      gRPC's send, the client's receive (TLS, its gRPC threads) and its call's return
    (reader busy)  beside them: the reply queued -> the reader done with the slice (`FairQueue.done`, back to
                   gRPC's receive next), and whether that came after the client's next call began (late)

Medians of each leg over the run (each leg's median: they need not add up to the total's), then each leg's 90th
percentile. With --against DIR the
other checkout's daemon (run by --against-python) is measured in the same alternating blocks; with --against-client
DIR instead the other checkout's client (its client/session.py, as bench/sync_client.py loads it) on this tree's
daemon, a session of each.

`--carrier side` runs the daemon as `gpupool up` does (`--bulk-listen`: the session's frames and replies on the side
socket; the reply is written by the thread that queued it, `FrontSession._write_now`, so no "to writer" leg).
`--kinds` picks what a call is: `sync` (a lone Sync), `item` (`.item()` of an uploaded scalar), `step` (a captured
step whose graph is one tiny op, `neg` of a scalar, and its `.item()`, as the shim sends them: RunGraph and Sync in
one frame) and `native-step` (the same step as the C++ client sends it: the RunGraph entry it encoded, handed over
with the `.item()`, client/native/backend.py `sync_scalar`). `--wakeups` also counts, around each block, the
voluntary context switches (a thread that blocked and was woken) of every thread of the client's process, the
daemon's and its workers', per call, how many threads woke at least once every two calls, and each part's CPU time
a call (/proc/PID/task/TID/schedstat: kernel time included, so a wake-up's cost shows).

`--worker-instr N` counts instead (callgrind, exact on a loaded box) the instructions of the worker's own part of an
`.item()`, in-process: N slices of one Sync of a float scalar through the worker loop's body without its socket
(the request decoded from the shared buffer, `_SessionState.run`, the result written back), this tree's and, with
--against, the other checkout's (this file run by --against-python in DIR/bench, importing DIR's gpupool).

    python bench/item_legs.py [--items 2000] [--against /work/wt/base --against-python /work/wt/base/.venv/bin/python]
    python bench/item_legs.py --carrier side --kinds sync,item,step,native-step --wakeups --against-client /work/wt/base
    python bench/item_legs.py --worker-instr 2000 [--against DIR --against-python DIR/.venv/bin/python]
"""

from __future__ import annotations

import argparse
import bisect
import inspect
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import daemon_wire  # noqa: E402 - the daemon starter and the floor server live there

BLOCK = 50
SITECUSTOMIZE = """
import os, sys
if os.environ.get("GPUPOOL_ITEM_LEGS") and "serve" in sys.orig_argv:
    import json, signal, time
    from gpupool import protocol
    from gpupool.server import daemon as _daemon, front as _front, worker as _worker
    _now, _marks = time.perf_counter_ns, []
    def _wrap(owner, name, kind, after=False):
        inner = getattr(owner, name)
        def wrapped(*args, **kwargs):
            if not after:
                _marks.append((kind, _now()))
            out = inner(*args, **kwargs)
            if after:
                _marks.append((kind, _now()))
            return out
        setattr(owner, name, wrapped)
    _wrap(protocol, "lone_sync", "reader")
    _run = _worker.ProcessRunner.run
    def _timed_run(self, *args, **kwargs):
        _marks.append(("run", _now()))
        try:
            return _run(self, *args, **kwargs)
        finally:
            _marks.append(("ran", _now()))
    _worker.ProcessRunner.run = _timed_run
    _wrap(_front.FrontSession, "send", "queued")
    from gpupool.server import service as _service
    _wrap(_service, "_serialize_frame", "writer")
    from gpupool.server import fairqueue as _fairqueue
    _wrap(_fairqueue.FairQueue, "done", "free", after=True)
    def _dump(signum, frame):
        with open(os.environ["GPUPOOL_ITEM_LEGS"] + ".tmp", "w") as f:
            json.dump(_marks, f)
        os.replace(os.environ["GPUPOOL_ITEM_LEGS"] + ".tmp", os.environ["GPUPOOL_ITEM_LEGS"])
    signal.signal(signal.SIGUSR1, _dump)
"""
ITEM_LEGS = (
    ("to reader", "t0", "reader"),
    ("to worker", "reader", "run"),
    ("worker", "run", "ran"),
    ("to outbox", "ran", "queued"),
    ("to writer", "queued", "writer"),
    ("to client", "writer", "t1"),
)
SYNC_LEGS = (("to reader", "t0", "reader"), ("to outbox", "reader", "queued"), *ITEM_LEGS[4:])
KINDS = ("sync", "item", "step", "native-step")


def legs_of(kind: str, carrier: str) -> tuple[tuple[str, str, str], ...]:
    """The legs of a call of `kind`: on the side socket the reply goes from the outbox's `send` to the client (its
    reader writes it, `FrontSession._write_now`: no writer's hop)."""
    legs = SYNC_LEGS if kind == "sync" else ITEM_LEGS
    if carrier == "side":
        legs = (*legs[:-2], ("to client", "queued", "t1"))
    return legs


def _step_graph(session: Any, graph_id: int) -> None:
    """A captured step of one tiny op: `neg` of a float scalar (the graph's one input), its result the output."""
    import torch

    from gpupool import wire
    from gpupool._proto import device_pb2, tensor_pb2

    meta = wire.meta_to_proto(torch.ones(()))
    op = device_pb2.Op(name="aten::neg.default", args=[tensor_pb2.Arg(tensor=1)], outputs=[2])
    session.define_graph(device_pb2.DefineGraph(graph_id=graph_id, inputs=1, input_meta=[meta], ops=[op], outputs=[2]))


def _stepper(session: Any, kind: str, graph_id: int, scalar: int) -> Any:
    """One call of `kind` on `session` (of either tree's client)."""
    if kind == "sync":
        return lambda: session.sync()
    if kind == "item":
        return lambda: session.sync([scalar])
    out = session.new_handle()
    if kind == "step":

        def step() -> Any:
            session.run_graph(graph_id, [scalar], [out])
            return session.sync([out])

        return step
    from gpupool import protocol
    from gpupool._proto import device_pb2

    run = device_pb2.Command(run_graph=device_pb2.RunGraph(graph_id=graph_id, inputs=[scalar], outputs=[out]))
    raw = run.SerializeToString()
    entry = protocol.FRAME_COMMANDS_TAG + protocol.varint(len(raw)) + raw
    if "commands" in inspect.signature(session.sync).parameters:  # client/native/backend.py sync_scalar, each tree's
        return lambda: session.sync([out], entry)

    def native_step() -> Any:
        session.send_commands(entry)
        return session.sync([out])

    return native_step


def _pids(daemon: int) -> dict[str, list[int]]:
    """The client (this process), the daemon's front and its other processes (the zygote, the sessions' workers)."""
    from daemon_syscalls import _children

    below = [c for z in _children(daemon) for c in [z, *_children(z)]]
    return {"client": [os.getpid()], "front": [daemon], "worker": below}


def _switches(pids: dict[str, list[int]]) -> dict[str, dict[int, tuple[int, int]]]:
    from daemon_syscalls import switches

    return {part: {t: (v, ns) for t, (v, _, ns) in switches(ps).items()} for part, ps in pids.items()}


def _woke(
    before: dict[str, dict[int, tuple[int, int]]], after: dict[str, dict[int, tuple[int, int]]], calls: int
) -> dict[str, float]:
    """Per call: each part's voluntary context switches, its threads that woke at least every second call, and its
    threads' CPU time (us, the scheduler's count: kernel time included)."""
    out: dict[str, float] = {}
    for part, now in after.items():
        deltas = [v - before[part][t][0] for t, (v, _) in now.items() if t in before[part]]
        out[part] = sum(deltas) / calls
        out[part + " threads"] = sum(d * 2 >= calls for d in deltas)
        out[part + " cpu"] = (
            sum(ns - before[part][t][1] for t, (_, ns) in now.items() if t in before[part]) / calls / 1e3
        )
    return out


def _marks(proc: subprocess.Popen[str], path: Path) -> dict[str, list[int]]:
    """The daemon's marks by kind, each sorted (it writes them on SIGUSR1)."""
    path.unlink(missing_ok=True)
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon wrote no marks (is the sitecustomize on its path?)")
        time.sleep(0.05)
    by_kind: dict[str, list[int]] = {}
    for kind, t in json.loads(path.read_text()):
        by_kind.setdefault(kind, []).append(t)
    return {k: sorted(v) for k, v in by_kind.items()}


def _legs(
    calls: list[tuple[int, int]], marks: dict[str, list[int]], legs: tuple[tuple[str, str, str], ...], busy: bool
) -> Any:
    """Each leg's median (us) over the calls: each mark is the first of its kind after the one before it in the
    chain (the first after the call began), all of them before the next call began; calls with a mark missing are
    left out. `busy`: also the reader's time from the reply queued to `FairQueue.done` (a slice's end)."""
    out: dict[str, list[float]] = {name: [] for name, _, _ in legs}
    out["total"], out["(reader busy)"] = [], []
    late = 0
    for k, (t0, t1) in enumerate(calls):
        end = calls[k + 1][0] if k + 1 < len(calls) else t1 + 10**9
        at = {"t0": t0, "t1": t1}
        for _, a, b in legs:
            if b in at:
                continue
            times = marks.get(b, [])
            i = bisect.bisect_left(times, at.get(a, end))
            if i < len(times) and times[i] < end:
                at[b] = times[i]
        if not all(a in at and b in at for _, a, b in legs):
            continue
        for name, a, b in legs:
            out[name].append((at[b] - at[a]) / 1e3)
        out["total"].append((t1 - t0) / 1e3)
        free = marks.get("free", [])
        i = bisect.bisect_left(free, at["queued"])
        if busy and i < len(free):
            out["(reader busy)"].append((free[i] - at["queued"]) / 1e3)
            late += free[i] > end
    rows = {name: (statistics.median(v) if v else float("nan"), len(v), _p90(v)) for name, v in out.items()}
    rows["(late)"] = (late / max(1, len(out["(reader busy)"])) * 100, late, float("nan"))
    return rows


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else float("nan")


def _worker_replay(n: int, instr: bool) -> dict[str, Any]:
    """`n` `.item()` slices through a session's worker state in this process, as the worker loop runs them."""
    import mmap

    import cgtools
    import torch
    from gpupool.server import slices, worker

    from gpupool._proto import device_pb2, tensor_pb2

    torch.set_grad_enabled(False)  # as worker_main
    device = {"index": 0, "uuid": "u", "model": "fake", "memory_bytes": 1 << 30, "fake": True}
    state = worker._SessionState(worker.WorkerSpec("s", 1, device, 1 << 30, 1000, 0, 0, 1, "", False))
    h = (1 << 32) + 1
    meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[])
    up = device_pb2.Upload(handle=h, meta=meta, data=torch.tensor(0.5).numpy().tobytes(), last=True)
    frame = device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()
    state.run(slices.SliceRequest(1 << 30, 1 << 24, 1.0, frame))
    shared = memoryview(mmap.mmap(-1, worker.SHARED_BYTES))
    data = shared[worker.DATA_AT : worker.SLOTS_AT]
    frames = []
    for i in range(n + 100):
        sync = device_pb2.Sync(request_id=i + 1, scalar_handles=[h])
        frames.append(device_pb2.ClientFrame(commands=[device_pb2.Command(sync=sync)]).SerializeToString())
    req = slices.SliceRequest(1 << 30, 1 << 24, 0.005, b"")
    heads = {len(f): slices.shared_request(req, len(f))[4:] for f in frames}  # what the daemon sends (no length word)

    def one(frame: bytes) -> None:
        data[: len(frame)] = frame
        r = slices.decode_request(heads[len(frame)], data)
        assert r is not None
        result = state.run(r)
        assert slices.write_result(result, data) > 0 and len(result.replies) == 1

    for frame in frames[:100]:
        one(frame)
    if instr:
        cgtools.control("--instr=on")
    start = time.thread_time()
    for frame in frames[100:]:
        one(frame)
    took = time.thread_time() - start
    if instr:
        cgtools.control("--dump=worker", "--instr=off")
    return {"slices": n, "cpu": took / n}


def _worker_instructions(python: str, where: Path, n: int, tmp: str) -> float:
    """Instructions per `.item()` slice of the worker code that `python` imports (run in `where`)."""
    import cgtools

    out_file = Path(tmp) / "worker.out"
    for old in Path(tmp).glob("worker.out*"):
        old.unlink()
    exe = subprocess.check_output([python, "-c", "import sys; print(sys.executable)"], text=True).strip()
    cmd = [*cgtools.valgrind(out_file), exe, str(HERE / "item_legs.py"), "--worker-replay", str(n), "--instr"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=where)
    dumps = [p for p in Path(tmp).glob("worker.out.*") if "worker" in p.read_text().split("desc: Trigger:", 1)[1][:200]]
    totals = [line for line in dumps[0].read_text().splitlines() if line.startswith(("totals:", "summary:"))]
    return int(totals[-1].split()[1]) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=2000, help="`.item()`s per daemon (and as many lone Syncs)")
    p.add_argument("--against", default="", help="another checkout, measured in the same blocks")
    p.add_argument("--against-python", default=sys.executable)
    p.add_argument("--against-client", default="", metavar="DIR", help="another checkout's client, on this daemon")
    p.add_argument("--carrier", choices=("stream", "side"), default="stream", help="side: the daemon's --bulk-listen")
    p.add_argument("--kinds", default="item,sync", help="comma-separated, of " + ",".join(KINDS))
    p.add_argument("--wakeups", action="store_true", help="count each part's thread wake-ups per call")
    p.add_argument("--worker-instr", type=int, metavar="N", help="count the worker's instructions of N `.item()`s")
    p.add_argument("--worker-replay", type=int, help=argparse.SUPPRESS)
    p.add_argument("--instr", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_replay:
        print(json.dumps(_worker_replay(args.worker_replay, args.instr)))
        return 0
    if args.worker_instr:
        trees = {"this": (sys.executable, HERE)}
        if args.against:
            trees["other"] = (args.against_python, Path(args.against) / "bench")
        with tempfile.TemporaryDirectory() as tmp:
            counts = {name: _worker_instructions(*tree, args.worker_instr, tmp) for name, tree in trees.items()}
        for name, count in counts.items():
            print(f"worker, an .item() slice ({name}): {count / 1e3:.1f} k instructions")
        if args.against:
            print(f"worker: this / the other's per .item(): {counts['this'] / counts['other']:.3f}")
        return 0
    import torch
    from gpupool.client.session import Session

    from gpupool import tokens

    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        p.error(f"--kinds: comma-separated, of {','.join(KINDS)}")
    if args.against and args.against_client:
        p.error("--against (another daemon) or --against-client (another client), not both")
    extra = ("--bulk-listen", "127.0.0.1:0") if args.carrier == "side" else ()
    # rows: (name, its daemon, its client's Session class)
    rows: list[tuple[str, str, Any]] = [("this", "this", Session)]
    if args.against:
        rows.append(("other", "other", Session))
    elif args.against_client:
        from sync_client import _other_session_class

        rows.append(("other client", "this", _other_session_class(args.against_client)))
    names = [name for name, _, _ in rows]
    daemons = sorted({d for _, d, _ in rows}, key=["this", "other"].index)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        key, key_file = daemon_wire.loopback_keys(tmp, tls=True)
        procs: dict[str, subprocess.Popen[str]] = {}
        files = {name: Path(tmp) / f"marks-{name}.json" for name in daemons}
        path_before = os.environ.get("PYTHONPATH", "")
        try:
            for name in daemons:
                os.environ["GPUPOOL_ITEM_LEGS"] = str(files[name])
                os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(site), path_before) if x)
                if name == "this":
                    procs[name], address = daemon_wire.start_daemon(key_file, *extra)
                else:
                    procs[name], address = daemon_wire.start_daemon(
                        key_file, *extra, python=args.against_python, cwd=args.against
                    )
                procs[name].address = address  # type: ignore[attr-defined]
        finally:
            os.environ.pop("GPUPOOL_ITEM_LEGS", None)
            os.environ["PYTHONPATH"] = path_before
        floor, (_, _, _, grpc_tls_port) = daemon_wire.start_floor()
        calls: dict[str, dict[str, list[tuple[int, int]]]] = {n: {k: [] for k in kinds} for n in names}
        woke: dict[str, dict[str, list[dict[str, float]]]] = {n: {k: [] for k in kinds} for n in names}
        inline: dict[str, int] = {}
        pings: list[float] = []
        load0 = os.getloadavg()[0]
        try:
            sessions, steps = {}, {}
            for name, daemon, cls in rows:
                claims = tokens.TokenClaims(f"{name}-legs", "bench", 0, 0, 1.0, time.time() + 3600, "bench")
                s = sessions[name] = cls.attach(procs[daemon].address, tokens.mint(key, claims))  # type: ignore[attr-defined]
                scalar = s.upload(torch.ones(()))
                _step_graph(s, 1)
                steps[name] = {kind: _stepper(s, kind, 1, scalar) for kind in kinds}
                for kind in kinds:
                    for _ in range(100):  # warm: the first slices, learned nothing but caches
                        steps[name][kind]()
            ping, close_floor = daemon_wire._stream_ping(int(grpc_tls_port), True)
            ping()
            pids = {d: _pids(procs[d].pid) for d in daemons}
            clock = time.perf_counter_ns
            for block in range(max(1, args.items // BLOCK)):
                for _ in range(BLOCK):
                    t0 = clock()
                    ping()
                    pings.append((clock() - t0) / 1e3)
                for name, daemon, _ in rows if block % 2 == 0 else reversed(rows):
                    for kind in kinds:
                        call, out = steps[name][kind], calls[name][kind]
                        before = _switches(pids[daemon]) if args.wakeups else None
                        for _ in range(BLOCK):
                            t0 = clock()
                            call()
                            out.append((t0, clock()))
                        if before is not None:
                            woke[name][kind].append(_woke(before, _switches(pids[daemon]), BLOCK))
            marks = {name: _marks(procs[name], files[name]) for name in daemons}
            for name, session in sessions.items():
                inline[name] = getattr(session, "frames_inline", -1)
                session.close()
            close_floor()
        finally:
            daemon_wire.stop(procs.values(), floor)
    load1 = os.getloadavg()[0]
    floor_p50 = statistics.median(pings)
    floor_p90 = statistics.quantiles(pings, n=10)[-1]
    print(f"\ncalls by leg (us, medians; carrier {args.carrier}, load {load0:.1f} -> {load1:.1f})")
    print(f"bare TLS gRPC stream ping-pong p50 {floor_p50:.0f} us, p90 {floor_p90:.0f}, in the same blocks")
    print("frames written from the calling thread: " + ", ".join(f"{n} {k}" for n, k in inline.items()))
    for kind in kinds:
        legs = legs_of(kind, args.carrier)
        by_row = {name: calls[name][kind] for name in names}
        daemon_of = {name: daemon for name, daemon, _ in rows}
        table = {name: _legs(by_row[name], marks[daemon_of[name]], legs, kind != "sync") for name in names}
        label = {"item": ".item()", "sync": "lone Sync", "step": "tiny step", "native-step": "tiny step, C++ way"}
        print(f"\n{label[kind]:<14}" + "".join(f"{n:>14}" for n in names))
        extra_rows = ["(reader busy)", "(late)"] if kind != "sync" else []
        for leg in [*(name for name, _, _ in legs), "total", *extra_rows]:
            print(f"  {leg:<12}" + "".join(f"{table[n][leg][0]:>14.1f}" for n in names))
        if extra_rows:
            print("  (late: % of calls that began before the reader was done with the one before)")
        print("  p90s:")
        for leg in [*(name for name, _, _ in legs), "total"]:
            print(f"  {leg:<12}" + "".join(f"{table[n][leg][2]:>14.1f}" for n in names))
        print("  / ping-pong " + "".join(f"{table[n]['total'][0] / floor_p50:>14.2f}" for n in names))
        print("  (calls)     " + "".join(f"{table[n]['total'][1]:>14}" for n in names))
        if args.wakeups:
            parts = ["client", "front", "worker"]
            for part in [*parts, *(x + " threads" for x in parts), *(x + " cpu" for x in parts)]:
                what = {"threads": "woke (>= 1/2 calls)", "cpu": "CPU us/call"}.get(part.split()[-1], "wake-ups/call")
                cells = "".join(f"{statistics.median(b[part] for b in woke[n][kind]):>14.2f}" for n in names)
                print(f"  {part:<15}{what:<20}" + cells)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
