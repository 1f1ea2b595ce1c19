"""What a step's input bytes cost the daemon's CPU (issue 8: the stock MLP's 512 KB batch), kernels left out.

A client (the shim, `gpupool.torch`) sends one CPU input per step to a live TLS daemon (one fake GPU, one torch
thread, pinned to its own core) and runs a trivial step on it: `x.reshape(-1)[:16].sum()` (a few ops whose cost
does not grow with the input). Two ways:

- `eager`: `x.to(device)` (an Upload command) and the step's ops, eagerly;
- `captured`: the step under `gpupool.torch.capture`: one RunGraph per step, the input inside it by value
  (`RunGraph.input_data`) up to capture.BY_VALUE_BYTES (256 KiB), above that an Upload before the RunGraph.

The session's frames travel on its side socket by default (`--carriers side`: the daemon with a side port,
`--bulk-listen`, as `gpupool up` and bench/real_gpu.sh run it; the worker checks that its session's frames went
there), or on its gRPC stream (`stream`: no side port); `--carriers side,stream` runs both, in turn. The daemons
run each session in its own worker process (`--isolations process`, the default) or in a thread of the daemon
(`thread`); `--isolations process,thread` runs both, in turn (with --against, DIR's daemon runs the same one).

Per input size (--sizes, bytes of float32; the smallest is the baseline), each run a fresh client process pinned to
the other core: blocks of steps ending in one `.item()`, the daemon's CPU over the block (its front, zygote and the
session's worker: /proc, clock ticks, so blocks are long) per step, the median block counting; then per MB over the
smallest size's figure: what each MB of input costs the daemon. Runs alternate (every size and mode once a round)
and each figure is the median over --rounds. With --against DIR the same client also runs against DIR's daemon
(its .venv/bin/python), alternating which goes first, and the table prints both and their ratios (wall time and
the daemon's CPU); with --against-client as well, the base rows' client is DIR's (run by its python), for an A/B
of a client change (client/session.py's send queue, round 37).

`--in-process` instead times only the daemon's own handling of such a step's frame, without gRPC, TLS or the
kernels, in one process of each checkout (this tree's python and, with --against, DIR's, alternating): for the
`side` carrier the side reader's read of the frame's record off a socket (`BulkLink.recv_frame` over a Unix socket
pair fed by a thread: no TLS), then the reader's check of the frame (`split_frame`, then protobuf -- of the frame
without the batch's bytes where the checkout has `bulk.strip_uploads`), the front's copy of its spans into a buffer
like the worker's shared one (a join, or `worker._copy_parts` where the checkout has it) and the worker's slice
(`slices.run_commands` with a real executor and session on a fake GPU). The frame (`--modes`): `eager`, the batch's
Upload and 37 small commands (16-float Uploads, as many as the stock MLP's eager ops); `captured`, one RunGraph of a
graph of the bench's step (`x[:16].sum()`), the batch in it by value (keep --sizes at most 256 KiB there: larger
batches travel as an Upload). `--tls`: the side reader's socket is TLS as the side port makes it (the checkout's
`tls.SocketServerTls` context, a throwaway loopback PKI) over loopback TCP, its records sent by a thread with a
client's context: the reader's CPU then holds OpenSSL's reads and decryption too (round 37: read-ahead).
Thread CPU time per step, the median of --rounds runs of --steps steps.

    nice python bench/input_bytes.py                                  # ~2 min
    nice python bench/input_bytes.py --in-process --against /work/wt/base
    nice python bench/input_bytes.py --carriers side,stream --modes captured --sizes 64,262144,524288 --against DIR
    nice python bench/input_bytes.py --in-process --modes captured --sizes 64,65536,262144 --against /work/wt/base
    nice python bench/input_bytes.py --in-process --tls --modes captured --sizes 64,65536,524288 --against DIR
    nice python bench/input_bytes.py --against /work/wt/base --rounds 3
    nice python bench/input_bytes.py --modes captured --carriers side,stream --against /work/wt/base --against-client
    nice python bench/input_bytes.py --sizes 64,65536,524288,4194304 --modes captured
    nice python bench/input_bytes.py --modes captured --isolations process,thread --against /work/wt/base --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from train_overhead import add_worker_flags, bench_daemons, run_worker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch_bound import _tree_cpu  # noqa: E402

MODES = ("eager", "captured")
SIZES = "64,65536,524288,4194304"


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    from gpupool.client.torch import runtime

    import gpupool.torch as gt

    device = gt.attach(args.address, args.token)
    rt = runtime.get(device.index)
    assert rt is not None
    n = max(1, args.size // 4)
    batches = [torch.randn(n, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def step(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)[:16].sum()

    run: Any
    if args.mode == "captured":
        run = gt.capture(step)
    else:

        def run(x: torch.Tensor) -> torch.Tensor:
            return step(x.to(device))

    expect = [float(b[:16].sum()) for b in batches]
    for i in range(8):  # warm-up (capture records in these); every result checked: the bytes arrived whole
        got = float(run(batches[i % 4]).item())
        assert abs(got - expect[i % 4]) <= 1e-4 * max(1.0, abs(expect[i % 4])), (got, expect[i % 4])
    blocks, daemon, client = [], [], []
    for _ in range(args.blocks):
        d0 = _tree_cpu(args.daemon_pid)
        c0 = time.process_time()
        t = time.perf_counter()
        out = None
        for i in range(args.steps):
            out = run(batches[i % 4])
        assert out is not None
        out.item()
        blocks.append((time.perf_counter() - t) / args.steps)
        daemon.append((_tree_cpu(args.daemon_pid) - d0) / args.steps)
        client.append((time.process_time() - c0) / args.steps)
    return {
        "side": rt.session._carrier is not None,  # the session's frames went on its side socket
        "step_s": statistics.median(blocks),
        "daemon_s": statistics.median(daemon),
        "client_s": statistics.median(client),
    }


def in_process(args: argparse.Namespace) -> dict[str, Any]:
    """One checkout's daemon-side handling of a step's frame (see the module's docstring), thread CPU per step."""
    torch.set_num_threads(1)
    from gpupool.server import bulk, slices, worker
    from gpupool.server.devices import FakeDevice
    from gpupool.server.executor import CommandExecutor
    from gpupool.server.sessions import DeviceMemory, WorkerSession

    from gpupool import wire
    from gpupool._proto import device_pb2, tensor_pb2

    dev = FakeDevice(0, "h", 1 << 34)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 32)
    ex = CommandExecutor(slices.SliceLedger())
    n = max(1, args.size // 4)
    x = torch.randn(n)
    small = torch.ones(16)

    def upload(h: int, t: torch.Tensor) -> device_pb2.Command:
        meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(t.dtype), shape=list(t.shape))
        return device_pb2.Command(
            upload=device_pb2.Upload(handle=h, meta=meta, data=wire.tensor_to_bytes(t), last=True)
        )

    handles = [s.handle_base + 1 + k for k in range(38)]
    if args.mode == "captured":
        # a graph of the bench's step (x[:16].sum()), defined once; a step: one RunGraph, the batch by value
        define = device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(x)], outputs=[3], ops=[
            device_pb2.Op(name="aten::slice.Tensor", outputs=[2], args=[tensor_pb2.Arg(tensor=1)] + [
                tensor_pb2.Arg(i=v) for v in (0, 0, 16)]),
            device_pb2.Op(name="aten::sum", outputs=[3], args=[tensor_pb2.Arg(tensor=2)])])  # fmt: skip
        ex.execute(s, device_pb2.Command(define_graph=define), lambda _: None)
        assert s.error is None, s.error
        run = device_pb2.RunGraph(graph_id=1, inputs=[0], outputs=[handles[0]], input_data=[wire.tensor_to_bytes(x)])
        cmds = [device_pb2.Command(run_graph=run)]
        expect = x[:16].sum()
    else:
        cmds = [upload(handles[0], x)] + [upload(h, small) for h in handles[1:]]
        expect = x
    frame = device_pb2.ClientFrame(commands=cmds).SerializeToString()
    free = device_pb2.Command(free=device_pb2.Free(handles=handles[: len(cmds)]))
    shared = memoryview(bytearray(len(frame) + 4096))
    strip = getattr(bulk, "strip_uploads", None)
    copy_parts = getattr(worker, "_copy_parts", None)
    read = _side_reader(frame, args.steps + 20, args.tls) if args.carrier == "side" else None

    def step() -> tuple[int, int]:
        t0 = time.thread_time_ns()
        raw = frame if read is None else read()
        commands = slices.split_frame(raw, 4096)
        got = strip(commands) if strip is not None and len(raw) >= bulk.STRIP_MIN else None
        device_pb2.ClientFrame.FromString(raw if got is None else got[0])
        parts = [span for _, span in commands]
        if copy_parts is not None and max(map(len, parts)) >= worker.BIG_PART:
            copy_parts(shared, parts)
        else:
            shared[: len(raw)] = b"".join(parts)
        t1 = time.thread_time_ns()
        req = slices.SliceRequest(device_free=1 << 34, reply_room=1 << 20, budget=10.0, payload=shared[: len(raw)])
        res = slices.run_commands(s, ex.execute, ex.ledger, req, dev.timed)
        t2 = time.thread_time_ns()
        assert res.executed == len(cmds) and s.error is None, s.error
        assert torch.equal(s.tensors[handles[0]], expect)  # the bytes arrived whole
        ex.execute(s, free, lambda _: None)  # the batch's handles given back, as a training loop's client does
        return t1 - t0, t2 - t1

    for _ in range(20):
        step()
    fronts, workers = [], []
    for _ in range(args.steps):
        f, w = step()
        fronts.append(f)
        workers.append(w)
    return {"front_s": statistics.median(fronts) / 1e9, "worker_s": statistics.median(workers) / 1e9}


def _side_reader(frame: bytes, count: int, secure: bool = False) -> Any:
    """A session's frames socket as the daemon's reader has it (`bulkside.BulkLink` over a non-blocking socket, here
    a Unix socket pair without TLS: what the checkout does with a frame's bytes, not the kernel's or OpenSSL's
    copies; `secure`: a loopback TCP connection with the side port's TLS), fed `count` records of `frame` by a
    thread of its own (its CPU is not the reader's); returns the reader's `recv_frame`."""
    import socket
    import threading

    from gpupool.server import bulkside

    from gpupool import protocol

    if secure:
        ours, theirs = _tls_pair()
    else:
        ours, theirs = socket.socketpair()
    ours.setblocking(False)
    link = bulkside.BulkLink(ours, 1, frames=True)
    record = protocol.frame_record(frame)
    threading.Thread(target=lambda: [theirs.sendall(record) for _ in range(count)], daemon=True).start()

    def read() -> Any:
        got = link.recv_frame(64 << 20)
        assert got is not None and len(got) == len(frame), (got, len(frame), theirs)  # (the feeder's end kept open:
        return got  # closed with the session's tickets unread, a TLS client's end resets the connection)

    return read


def _tls_pair() -> tuple[Any, Any]:
    """A TLS connection over loopback TCP: (the daemon's end, with the checkout's side-port context
    `tls.SocketServerTls`; the client's end), certificates from a throwaway loopback PKI."""
    import socket
    import ssl
    import tempfile
    import threading

    from gpupool import pki, tls

    env = pki.loopback_env(Path(tempfile.mkdtemp(prefix="gpupool-bench-pki-")))
    cfg = tls.TlsConfig(cert=env["GPUPOOL_TLS_CERT"], key=env["GPUPOOL_TLS_KEY"], ca=env["GPUPOOL_TLS_CA"])
    server_ctx = tls.SocketServerTls(cfg).context()
    client_ctx = ssl.create_default_context(cafile=env["GPUPOOL_TLS_CA"])
    listener = socket.create_server(("127.0.0.1", 0))
    theirs_raw = socket.create_connection(listener.getsockname())
    ours_raw, _ = listener.accept()
    listener.close()
    for s in (ours_raw, theirs_raw):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the side port and the client set it
    ours = server_ctx.wrap_socket(ours_raw, server_side=True, do_handshake_on_connect=False)
    theirs = client_ctx.wrap_socket(theirs_raw, server_hostname="localhost", do_handshake_on_connect=False)
    shake = threading.Thread(target=theirs.do_handshake)
    shake.start()
    ours.do_handshake()
    shake.join()
    return ours, theirs


def main_in_process(args: argparse.Namespace, sizes: list[int], pythons: list[tuple[str, str]]) -> int:
    results: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    load0 = os.getloadavg()[0]
    modes, carriers = args.modes.split(","), args.carriers.split(",")
    for k in range(args.rounds):
        for carrier in carriers:
            for mode in modes:
                for size in sizes:
                    for which, python in pythons if k % 2 == 0 else pythons[::-1]:
                        cmd = ["taskset", "-c", str(args.daemon_core), python, __file__, "--worker", "--in-process",
                               "--mode", mode, "--size", str(size), "--steps", str(args.steps),
                               "--carrier", carrier] + (["--tls"] if args.tls else [])  # fmt: skip
                        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=str(
                            Path(python).parent.parent.parent), env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
                        got = json.loads(out.stdout.strip().splitlines()[-1])
                        results.setdefault((carrier, mode, size, which), []).append(got)
    tls_words = "the side reader over TLS" if args.tls else "no TLS"
    table = Table(title=f"the daemon's own handling of a step's frame (no gRPC, {tls_words}, no kernels): thread CPU "
                  "us per step, medians over rounds of each run's median step")  # fmt: skip
    for col in ("carrier", "mode", "input bytes", "daemon", "reader (read, check, copy)", "worker slice", "total",
                "total/base"):  # fmt: skip
        table.add_column(col, justify="right")
    fields = ("front_s", "worker_s")
    for carrier in carriers:
        for mode in modes:
            for size in sizes:
                for which, _ in pythons:
                    m = {f: statistics.median(r[f] for r in results[(carrier, mode, size, which)]) for f in fields}
                    total = m["front_s"] + m["worker_s"]
                    ratio = ""
                    if which == "this" and len(pythons) > 1:
                        b = {f: statistics.median(r[f] for r in results[(carrier, mode, size, "base")]) for f in fields}
                        ratio = f"{total / (b['front_s'] + b['worker_s']):.2f}"
                    table.add_row(carrier, mode, str(size), which, f"{m['front_s'] * 1e6:.1f}",
                                  f"{m['worker_s'] * 1e6:.1f}", f"{total * 1e6:.1f}", ratio)  # fmt: skip
    Console(width=160).print(table)
    print(f"load average (1 min): {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    return 0


def _carrier_flags(carrier: str) -> str:
    """BENCH_DAEMON_FLAGS for a carrier: `side` adds a side port (`--bulk-listen`, as `gpupool up` runs a daemon: the
    session's frames on its side socket), `stream` takes any away (frames on the gRPC stream); other flags kept."""
    flags = os.environ.get("BENCH_DAEMON_FLAGS", "").split()
    while "--bulk-listen" in flags:
        at = flags.index("--bulk-listen")
        del flags[at : at + 2]
    if carrier == "side":
        flags += ["--bulk-listen", "127.0.0.1:0"]
    return " ".join(flags)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=SIZES, help="comma-separated input bytes (float32); the first is the baseline")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ",".join(MODES))
    p.add_argument("--carriers", default="side", help="comma-separated: side (the session's frames on its side "
                   "socket, as `gpupool up` runs a daemon), stream (on its gRPC stream: no side port)")  # fmt: skip
    p.add_argument("--isolations", default="process", help="comma-separated: process (each session in its own "
                   "worker, the default), thread (--isolation thread)")  # fmt: skip
    p.add_argument("--steps", type=int, default=300, help="steps per timed block (the daemon's CPU is in ticks)")
    p.add_argument("--blocks", type=int, default=3, help="timed blocks (the median counts)")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs; the median of each figure over them")
    p.add_argument("--against", metavar="DIR", default="", help="also run everything against DIR's daemon")
    p.add_argument("--against-python", default="", help="the python of --against (default: DIR/.venv/bin/python)")
    p.add_argument("--against-client", action="store_true", help="the base rows' client is DIR's too (run by its "
                   "python: its checkout's client), for an A/B of a client change; by default this tree's client "
                   "runs against both daemons")  # fmt: skip
    p.add_argument("--in-process", action="store_true", help="time the daemon's own handling of a step's frame "
                   "in-process, without gRPC, TLS or kernels (see above)")  # fmt: skip
    add_worker_flags(p)
    p.add_argument("--tls", action="store_true", help="with --in-process: the side reader's socket speaks TLS as "
                   "the side port's does (its OpenSSL reads and decryption counted)")  # fmt: skip
    p.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--carrier", default="side", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(in_process(args) if args.in_process else worker(args)))
        return 0
    if not set(args.carriers.split(",")) <= {"side", "stream"}:
        p.error(f"--carriers: side, stream (got {args.carriers})")
    if not set(args.isolations.split(",")) <= {"process", "thread"}:
        p.error(f"--isolations: process, thread (got {args.isolations})")

    sizes = [int(s) for s in args.sizes.split(",")]
    if args.in_process:
        pythons = [("this", sys.executable)]
        if args.against:
            pythons.append(("base", args.against_python or str(Path(args.against) / ".venv" / "bin" / "python")))
        return main_in_process(args, sizes, pythons)
    modes, carriers = args.modes.split(","), args.carriers.split(",")
    load0 = os.getloadavg()[0]
    against = None
    if args.against:
        against = (args.against, args.against_python or str(Path(args.against) / ".venv" / "bin" / "python"))
    isolations = args.isolations.split(",")
    results: dict[tuple[str, str, str, int, str], list[dict[str, Any]]] = {}
    for carrier in carriers:
        os.environ["BENCH_DAEMON_FLAGS"] = _carrier_flags(carrier)
        for iso in isolations:
            daemons_of = [iso, "base"] if against else [iso]
            with bench_daemons(args.daemon_core, (iso,), against=against, against_isolation=iso) as daemons:
                for k in range(args.rounds):
                    for mode in modes:
                        for size in sizes:
                            for which in daemons_of if k % 2 == 0 else daemons_of[::-1]:
                                argv_w = ["--mode", mode, "--size", str(size), "--steps", str(args.steps),
                                          "--blocks", str(args.blocks)]  # fmt: skip
                                py = against[1] if against and args.against_client and which == "base" else ""
                                r = run_worker(__file__, args.client_core, f"{mode}/{size}/{iso}/{which}", argv_w, py,
                                               **daemons.remote(which))  # fmt: skip
                                # the session's frames went where the carrier says (a side port that failed: the
                                # stream)
                                assert r["side"] == (carrier == "side"), (carrier, r)
                                key = (carrier, iso, mode, size, "base" if which == "base" else "this")
                                results.setdefault(key, []).append(r)
    table = Table(title="a step's input bytes: the daemon's CPU per step (medians over rounds; per MB: over the "
                  f"{sizes[0]}-byte input's)")  # fmt: skip
    for col in ("carrier", "isolation", "mode", "input bytes", "daemon", "ms/step", "client us/step",
                "daemon us/step", "daemon us/MB"):  # fmt: skip
        table.add_column(col, justify="right")
    if against:
        table.add_column("this/base CPU", justify="right")
        table.add_column("this/base ms", justify="right")
    med: dict[tuple[str, str, str, int, str], dict[str, float]] = {
        key: {f: statistics.median(r[f] for r in rs) for f in ("step_s", "daemon_s", "client_s")}
        for key, rs in results.items()
    }
    for carrier in carriers:
        for iso in isolations:
            for mode in modes:
                for size in sizes:
                    for which in ["this", "base"] if against else ["this"]:
                        m, base = med[(carrier, iso, mode, size, which)], med[(carrier, iso, mode, sizes[0], which)]
                        extra = m["daemon_s"] - base["daemon_s"]
                        per_mb = f"{extra / (size - sizes[0]) * 2**20 * 1e6:.0f}" if size != sizes[0] else ""
                        row = [carrier, iso, mode, str(size), which, f"{m['step_s'] * 1e3:.3f}",
                               f"{m['client_s'] * 1e6:.0f}", f"{m['daemon_s'] * 1e6:.0f}", per_mb]  # fmt: skip
                        if against:
                            other = med[(carrier, iso, mode, size, "base")]
                            mine = which == "this"
                            row.append(f"{m['daemon_s'] / other['daemon_s']:.2f}" if mine and other["daemon_s"] else "")
                            row.append(f"{m['step_s'] / other['step_s']:.2f}" if mine and other["step_s"] else "")
                        table.add_row(*row)
    Console(width=160).print(table)
    print(f"load average (1 min): {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
