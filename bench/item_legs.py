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

Medians of each leg over the run (each leg's median: they need not add up to the total's). With --against DIR the
other checkout's daemon (run by --against-python) is measured in the same alternating blocks.

`--worker-instr N` counts instead (callgrind, exact on a loaded box) the instructions of the worker's own part of an
`.item()`, in-process: N slices of one Sync of a float scalar through the worker loop's body without its socket
(the request decoded from the shared buffer, `_SessionState.run`, the result written back), this tree's and, with
--against, the other checkout's (this file run by --against-python in DIR/bench, importing DIR's gpupool).

    python bench/item_legs.py [--items 2000] [--against /work/wt/base --against-python /work/wt/base/.venv/bin/python]
    python bench/item_legs.py --worker-instr 2000 [--against DIR --against-python DIR/.venv/bin/python]
"""

from __future__ import annotations

import argparse
import bisect
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
    rows = {name: (statistics.median(v) if v else float("nan"), len(v)) for name, v in out.items()}
    rows["(late)"] = (late / max(1, len(out["(reader busy)"])) * 100, late)
    return rows


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

    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        key, key_file = daemon_wire.loopback_keys(tmp, tls=True)
        names = ["this", *(["other"] if args.against else [])]
        procs: dict[str, subprocess.Popen[str]] = {}
        files = {name: Path(tmp) / f"marks-{name}.json" for name in names}
        path_before = os.environ.get("PYTHONPATH", "")
        try:
            for name in names:
                os.environ["GPUPOOL_ITEM_LEGS"] = str(files[name])
                os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(site), path_before) if x)
                if name == "this":
                    procs[name], address = daemon_wire.start_daemon(key_file)
                else:
                    procs[name], address = daemon_wire.start_daemon(
                        key_file, python=args.against_python, cwd=args.against
                    )
                procs[name].address = address  # type: ignore[attr-defined]
        finally:
            os.environ.pop("GPUPOOL_ITEM_LEGS", None)
            os.environ["PYTHONPATH"] = path_before
        floor, (_, _, _, grpc_tls_port) = daemon_wire.start_floor()
        calls: dict[str, dict[str, list[tuple[int, int]]]] = {n: {"sync": [], "item": []} for n in names}
        pings: list[float] = []
        load0 = os.getloadavg()[0]
        try:
            sessions, scalars = {}, {}
            for name in names:
                claims = tokens.TokenClaims(f"{name}-legs", "bench", 0, 0, 1.0, time.time() + 3600, "bench")
                sessions[name] = Session.attach(procs[name].address, tokens.mint(key, claims))  # type: ignore[attr-defined]
                scalars[name] = [sessions[name].upload(torch.ones(()))]
                for _ in range(100):  # warm: the first slices, learned nothing but caches
                    sessions[name].sync(scalars[name])
            ping, close_floor = daemon_wire._stream_ping(int(grpc_tls_port), True)
            ping()
            clock = time.perf_counter_ns
            for block in range(max(1, args.items // BLOCK)):
                for _ in range(BLOCK):
                    t0 = clock()
                    ping()
                    pings.append((clock() - t0) / 1e3)
                for name in names if block % 2 == 0 else reversed(names):
                    for kind, handles in (("sync", []), ("item", scalars[name])):
                        out = calls[name][kind]
                        for _ in range(BLOCK):
                            t0 = clock()
                            sessions[name].sync(handles)
                            out.append((t0, clock()))
            marks = {name: _marks(procs[name], files[name]) for name in names}
            for session in sessions.values():
                session.close()
            close_floor()
        finally:
            daemon_wire.stop(procs.values(), floor)
    load1 = os.getloadavg()[0]
    floor_p50 = statistics.median(pings)
    print(f"\n.item() and lone Sync round trips by leg (us, medians; load {load0:.1f} -> {load1:.1f})")
    print(f"bare TLS gRPC stream ping-pong p50: {floor_p50:.0f} us, in the same blocks")
    for kind, legs in (("item", ITEM_LEGS), ("sync", SYNC_LEGS)):
        rows = {name: _legs(calls[name][kind], marks[name], legs, kind == "item") for name in names}
        print(f"\n{'.item()' if kind == 'item' else 'lone Sync'}" + "".join(f"{n:>12}" for n in names))
        extra = ["(reader busy)", "(late)"] if kind == "item" else []
        for leg in [*(name for name, _, _ in legs), "total", *extra]:
            print(f"  {leg:<12}" + "".join(f"{rows[n][leg][0]:>12.1f}" for n in names))
        if extra:
            print("  (late: % of calls that began before the reader was done with the one before)")
        print("  / ping-pong " + "".join(f"{rows[n]['total'][0] / floor_p50:>12.2f}" for n in names))
        print("  (calls)     " + "".join(f"{rows[n]['total'][1]:>12}" for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
