"""Host memory a session can make a daemon hold without device bytes (round 35, quota35): RSS growth of a real
`gpupool serve` (its whole process tree: daemon, zygote, session workers) per captured graph op, per graph, per
handle (views of one storage: ~0 quota bytes each), and after the session ends.

    nice -n 5 .venv/bin/python bench/host_memory.py --isolation thread --ops 10000 --graphs 3
    nice -n 5 .venv/bin/python bench/host_memory.py --isolation process --against /work/wt/base \\
        --against-python /work/wt/base/.venv/bin/python

Each graph is a chain of `aten::neg` over one 4-element input (red34's), or with `--width`, of `_foreach_neg` over
that many slots; it runs 3 times (the third run traces it to TorchScript on a fake GPU) before the next is defined.
A graph of a hundredth of the ops is defined and run first, and kept, so that what a session's first graph costs
once is not counted per op. A definition the daemon refuses is reported as such.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_wire import loopback_keys, start_daemon, stop_all  # noqa: E402

MiB = 1024**2


def own_rss(pid: int) -> int:
    """RSS of `pid` alone (the daemon process, without its zygote and session workers), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_rss(pid: int) -> int:
    """RSS of `pid` and all its descendants, in bytes."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(p.name))
    total, todo = 0, [pid]
    while todo:
        q = todo.pop()
        todo += children.get(q, [])
        try:
            for line in Path(f"/proc/{q}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def chain(graph_id: int, ops: int, width: int = 0) -> Any:
    """A chain of `ops` ops over one 4-element input: `neg`, or with `width`, `_foreach_neg` over `width` slots
    (the input unbound into them first: one op more)."""
    import torch

    from gpupool import wire
    from gpupool._proto import device_pb2, tensor_pb2

    if width:
        x = torch.ones(width)
        body = [device_pb2.Op(name="aten::unbind.int", args=[tensor_pb2.Arg(tensor=1)], outputs=range(2, width + 2))]
        for i in range(ops):
            first = 2 + i * width
            refs = tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=range(first, first + width)))
            body.append(
                device_pb2.Op(
                    name="aten::_foreach_neg.default", args=[refs], outputs=range(first + width, first + 2 * width)
                )
            )
        last = 1 + (ops + 1) * width
        return device_pb2.DefineGraph(
            graph_id=graph_id, inputs=1, input_meta=[wire.meta_to_proto(x)], ops=body, outputs=[last]
        )
    body = [
        device_pb2.Op(name="aten::neg.default", args=[tensor_pb2.Arg(tensor=i + 1)], outputs=[i + 2])
        for i in range(ops)
    ]
    x = torch.ones(4)
    return device_pb2.DefineGraph(
        graph_id=graph_id, inputs=1, input_meta=[wire.meta_to_proto(x)], ops=body, outputs=[ops + 1]
    )


def measure(
    address: str, key: bytes, rss: Any, ops: int, graphs: int, handles: int, name: str, width: int = 0
) -> dict[str, Any]:
    import torch
    from gpupool.client.session import Session

    from gpupool import tokens
    from gpupool.errors import GpupoolError

    claims = tokens.TokenClaims(f"{name}-lease", "bench", 0, 64 * MiB, 1.0, time.time() + 3600, name)
    out: dict[str, Any] = {}
    with Session.attach(address, tokens.mint(key, claims)) as s:
        x = s.upload(torch.ones(width or 4))
        s.sync()

        def define_and_run(g: int, n: int) -> None:
            s.define_graph(chain(g, n, width))
            s.sync()
            for _ in range(3):
                y = s.new_handle()
                s.run_graph(g, [x], [y])
                s.sync()
                s.free([y])
            s.sync()

        # a small graph of the same ops first, kept: what the first graph costs once (TorchScript, the allocator's
        # arenas) is not counted per op
        define_and_run(1000, max(1, ops // 100))
        time.sleep(0.5)
        base = rss()
        defined = 0
        for g in range(1, graphs + 1):
            t0 = time.perf_counter()
            try:
                define_and_run(g, ops)
            except GpupoolError as exc:
                out["refused"] = f"graph {g}: {exc.code.name}: {exc.message[:160]}"
                break
            defined += 1
            print(f"  {name}: graph {g} defined and run 3 times in {time.perf_counter() - t0:.1f} s", flush=True)
        grown = rss() - base
        out["graphs"] = defined
        out["graph_MiB"] = grown / MiB
        out["bytes_per_op"] = grown / max(1, defined * ops)
        if width:
            out["bytes_per_ref"] = grown / max(1, defined * ops * width * 2)
        for g in range(1, defined + 1):
            s.drop_graph(g)
        s.sync()
        out["after_drop_MiB"] = (rss() - base) / MiB
        for g in range(1, defined + 1):  # the same graphs again: reused memory, or more?
            s.define_graph(chain(g, ops, width))
            s.sync()
            s.drop_graph(g)
            s.sync()
        out["redefined_MiB"] = (rss() - base) / MiB
        if handles:
            before = rss()
            made, refused = split_views(s, s.upload(torch.zeros(min(handles, 65536))), handles)
            if refused:
                out["handles_refused"] = refused
            out["handles"] = made
            out["bytes_per_handle"] = (rss() - before) / max(1, made)
    time.sleep(1.0)
    out["after_close_MiB"] = (rss() - base) / MiB
    return out


# ---- round 36 (quota36): the other ways a client makes a daemon hold host memory, one probe each ----


def _attach(address: str, key: bytes, name: str) -> Any:
    from gpupool.client.session import Session

    from gpupool import tokens

    claims = tokens.TokenClaims(f"{name}-lease", "bench", 0, 64 * MiB, 1.0, time.time() + 3600, name)
    return Session.attach(address, tokens.mint(key, claims))


def split_views(s: Any, big: int, handles: int) -> tuple[int, str]:
    """Up to `handles` handles of views of tensor `big` (65,536 elements along its first dimension: `split` into
    65,536 views a call); returns how many were made and why the daemon refused more ("" if it did not)."""
    from gpupool.errors import GpupoolError

    made = 0
    try:
        while made < handles:
            n = min(65536, handles - made)
            s.call("aten::split.Tensor", big, 1, outputs=n)
            s.sync()
            made += n
    except GpupoolError as exc:
        return made, f"{exc.code.name}: {exc.message[:160]}"
    return made, ""


def probe_views(address: str, key: bytes, rss: Any, handles: int, dims: int) -> dict[str, Any]:
    """Handles of `dims`-dimensional views of one storage (`split` into 65,536 views a call): ~0 quota bytes each,
    their sizes and strides in host memory; until `--max-handles` refuses."""
    import torch

    out: dict[str, Any] = {}
    with _attach(address, key, "views") as s:
        big = s.upload(torch.zeros([65536] + [1] * (dims - 1)))
        s.sync()
        time.sleep(0.3)
        before = rss()
        made, refused = split_views(s, big, handles)
        if refused:
            out["refused"] = refused
        out["handles"] = made
        out["MiB"] = (rss() - before) / MiB
        out["bytes_per_handle"] = (rss() - before) / max(1, made)
    return out


def probe_graph_slots(address: str, key: bytes, rss: Any, graphs: int, inputs: int) -> dict[str, Any]:
    """Graphs of one op and `inputs` inputs of 4 dimensions each (~9 bytes an input on the wire): what the slots of
    a small graph hold (until round 36 outside the estimate), up to a session's 32 graphs."""
    import torch

    from gpupool import wire
    from gpupool._proto import device_pb2, tensor_pb2
    from gpupool.errors import GpupoolError

    out: dict[str, Any] = {}
    meta = wire.meta_to_proto(torch.ones(1, 1, 1, 4))
    with _attach(address, key, "slots") as s:
        s.upload(torch.ones(4))
        s.sync()
        time.sleep(0.3)
        before, defined = rss(), 0
        for g in range(1, graphs + 1):
            op = device_pb2.Op(name="aten::neg.default", args=[tensor_pb2.Arg(tensor=1)], outputs=[inputs + 1])
            msg = device_pb2.DefineGraph(
                graph_id=g, inputs=inputs, input_meta=[meta] * inputs, ops=[op], outputs=[inputs + 1]
            )
            t0 = time.perf_counter()
            try:
                s.define_graph(msg)
                s.sync()
            except GpupoolError as exc:
                out["refused"] = f"graph {g}: {exc.code.name}: {exc.message[:120]}"
                break
            defined += 1
            print(
                f"  slots: graph {g} ({msg.ByteSize()} bytes) defined in {time.perf_counter() - t0:.1f} s", flush=True
            )
        out["graphs"] = defined
        out["MiB"] = (rss() - before) / MiB
        out["bytes_per_input"] = (rss() - before) / max(1, defined * inputs)
    return out


def probe_queued(address: str, key: bytes, rss: Any, frames: int, daemon_rss: Any) -> dict[str, Any]:
    """A raw stream that asks for twenty 4 MiB downloads and reads nothing (its session parks at its unread-reply
    limit), then sends `frames` frames of 4 MiB uploads that cannot run: what the daemon holds of replies never
    read and of commands queued behind them (the fair queue's 64 MiB a session, then gRPC's window)."""
    import threading

    from gpupool import tls, tokens
    from gpupool._proto import device_pb2, device_pb2_grpc, tensor_pb2

    out: dict[str, Any] = {}
    claims = tokens.TokenClaims("queued-lease", "bench", 0, 64 * MiB, 1.0, time.time() + 3600, "queued")
    channel = tls.channel(address, [("grpc.max_receive_message_length", 64 * MiB)])
    reply = device_pb2_grpc.DeviceStub(channel).Attach(device_pb2.AttachRequest(token=tokens.mint(key, claims)))
    x = reply.handle_base + 1
    meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_UINT8, shape=[4 * MiB])
    up = device_pb2.Upload(handle=x, meta=meta, data=b"\7" * (4 * MiB), last=True)
    gets = [device_pb2.Command(get=device_pb2.Get(request_id=i, handle=x)) for i in range(1, 21)]
    sent = [0]
    release = threading.Event()
    before, before_daemon = rss(), daemon_rss()

    def gen() -> Any:
        yield device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()
        yield device_pb2.ClientFrame(commands=gets).SerializeToString()
        for i in range(frames):  # uploads of a handle that cannot run while the session is parked
            more = device_pb2.Upload(handle=x + 1 + i, meta=meta, data=b"\1" * (4 * MiB), last=True)
            yield device_pb2.ClientFrame(commands=[device_pb2.Command(upload=more)]).SerializeToString()
            sent[0] += 1
        release.wait(120)

    stream = channel.stream_stream("/gpupool.v1.Device/Stream", None, device_pb2.ServerFrame.FromString)
    call = stream(gen(), metadata=(("gpupool-session", reply.session_id),), timeout=300)
    last, still = -1, 0
    while still < 6:  # until the client could hand nothing more for 3 s
        time.sleep(0.5)
        still = still + 1 if sent[0] == last else 0
        last = sent[0]
    out["frames_taken"] = sent[0]
    out["MiB"] = (rss() - before) / MiB
    out["daemon_process_MiB"] = (daemon_rss() - before_daemon) / MiB
    call.cancel()
    release.set()
    channel.close()
    return out


def _drain(call: Any) -> None:
    try:
        for _ in call:
            pass
    except Exception:  # noqa: S110 - the probe cancels its streams at the end
        pass


def probe_busy(address: str, key: bytes, rss: Any, frames: int, daemon_rss: Any, sessions: int) -> dict[str, Any]:
    """Round 37 (quota37): `sessions` raw streams of one tenant that each keep their device busy (a frame of slow
    matmuls, ~1 GMAC each, into one handle) and send `frames` frames of 4 MiB uploads behind them, reading their
    replies (no session parks): what the daemon holds of commands queued behind work that runs (until round 37,
    the fair queue's 64 MiB a session whatever the host's total; a collective waiting for its peers is one such
    wait)."""
    import threading

    from gpupool import tls, tokens
    from gpupool._proto import device_pb2, device_pb2_grpc, tensor_pb2

    out: dict[str, Any] = {}
    meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_UINT8, shape=[4 * MiB])
    a_meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[256, 4096])
    sent = [0] * sessions
    release = threading.Event()
    channels, calls = [], []
    before, before_daemon = rss(), daemon_rss()

    def gen(i: int, base: int) -> Any:
        a, y = base + 1, base + 2
        data = b"\0" * (256 * 4096 * 4)
        yield device_pb2.ClientFrame(
            commands=[device_pb2.Command(upload=device_pb2.Upload(handle=a, meta=a_meta, data=data, last=True))]
        ).SerializeToString()
        mm = device_pb2.Op(
            name="aten::mm.default",
            args=[tensor_pb2.Arg(tensor=a), tensor_pb2.Arg(tensor=a + 1000)],
            outputs=[y],
        )
        t = device_pb2.Op(name="aten::t.default", args=[tensor_pb2.Arg(tensor=a)], outputs=[a + 1000])
        yield device_pb2.ClientFrame(
            commands=[device_pb2.Command(op=t)] + [device_pb2.Command(op=mm)] * 400
        ).SerializeToString()
        for k in range(frames):  # behind the matmuls: they run, slowly
            up = device_pb2.Upload(handle=base + 2000 + k, meta=meta, data=b"\1" * (4 * MiB), last=True)
            yield device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()
            sent[i] += 1
        release.wait(120)

    for i in range(sessions):
        claims = tokens.TokenClaims(f"busy-{i}", "bench", 0, 128 * MiB, 1.0, time.time() + 3600, "busy")
        channel = tls.channel(address, [("grpc.max_receive_message_length", 64 * MiB)])
        reply = device_pb2_grpc.DeviceStub(channel).Attach(device_pb2.AttachRequest(token=tokens.mint(key, claims)))
        stream = channel.stream_stream("/gpupool.v1.Device/Stream", None, device_pb2.ServerFrame.FromString)
        call = stream(gen(i, reply.handle_base), metadata=(("gpupool-session", reply.session_id),), timeout=300)
        threading.Thread(target=_drain, args=(call,), daemon=True).start()  # read every reply: none parks
        channels.append(channel)
        calls.append(call)
    last, still = -1, 0
    while still < 6:  # until the clients could hand nothing more for 3 s
        time.sleep(0.5)
        still = still + 1 if sum(sent) == last else 0
        last = sum(sent)
    out["frames_taken"] = sum(sent)
    out["MiB"] = (rss() - before) / MiB
    out["daemon_process_MiB"] = (daemon_rss() - before_daemon) / MiB
    for call in calls:
        call.cancel()
    release.set()
    for channel in channels:
        channel.close()
    return out


# ---- round 37 (quota37): what one session's learned records hold (server/templates.py, runs.py, verdicts) ----


def _learned_record(kind: str, x: int, k: int, out: int) -> bytes:
    """Record `k` of a kind, each of its own length (a template of its own) and ~0.5 MiB: "ints" `tensor_split`
    at 65,535 - k indices (no verdict cached for it), "tensors" `_foreach_neg` of `x` 65,535 - k times and "views"
    of 16,384 - k one-element views of `x` (both run: their verdicts cached, keyed by each element's meta), "bools"
    `view` with 8 lists of 65,535 - k bools (fails its checks: the template alone stays)."""
    from gpupool import compact

    if kind == "ints":
        args = [compact.tensor(x), compact.encode_value(list(range(10**6, 10**6 + 65535 - k)))]
    elif kind == "tensors":
        args = [compact.tensors([x] * (65535 - k))]
    elif kind == "views":
        el = compact.view(x, [1], [1], 0)
        args = [compact.tensors_with_views([el] * (16384 - k))]
    else:
        args = [compact.tensor(x), compact.TAG_U16.pack(compact.BOOLS, 65535 - k) + bytes(65535 - k)] * 8
    return compact.head(0, None, [out]) + compact.U8.pack(len(args)) + b"".join(args) + compact.U8.pack(0)


_LEARNED_OPS = {
    "ints": "aten::tensor_split.indices",
    "tensors": "aten::_foreach_neg.default",
    "views": "aten::_foreach_neg.default",
    "bools": "aten::view.default",
}


def probe_learned(address: str, key: bytes, rss: Any, records: int, kind: str) -> dict[str, Any]:
    """`records` eager records of one `kind` (`_learned_record`), each sent twice (a template hit the second time,
    which a learned run needs), their outputs freed: the daemon's growth per record and per byte of the wire."""
    import torch

    from gpupool import compact
    from gpupool.errors import GpupoolError

    out: dict[str, Any] = {}
    errors = 0
    with _attach(address, key, f"learned-{kind}") as s:
        x = s.upload(torch.ones(4))
        first = compact.head(0, _LEARNED_OPS[kind], [0]) + compact.U8.pack(1) + compact.tensor(x) + b"\0"
        s.eager_op(first)
        try:
            s.sync()
        except GpupoolError:
            pass
        time.sleep(0.3)
        before, wire_bytes = rss(), 0
        for k in range(records):
            for _ in range(2):
                o = s.new_handle()
                rec = _learned_record(kind, x, k, o)
                wire_bytes += len(rec)
                s.eager_op(rec)
                try:
                    s.sync()
                except GpupoolError as exc:
                    errors += 1
                    out["error"] = f"{exc.code.name}: {exc.message[:100]}"
                s.free([o])
        s.sync()
        grown = rss() - before
        out["records"] = records
        out["wire_MiB"] = wire_bytes / MiB
        out["MiB"] = grown / MiB
        out["bytes_per_record"] = grown / max(1, records)
        out["per_wire_byte"] = grown / max(1, wire_bytes / 2)  # each record's bytes, once
        out["failed"] = errors
    return out


# ---- round 38 (gmem38): --max-graph-memory's estimate against what a definition really grows ----


def _status_row(address: str, session_id: str) -> Any:
    from gpupool import protocol, tls
    from gpupool._proto import device_pb2, device_pb2_grpc
    from gpupool.tokens import public_session_id

    with tls.channel(address) as ch:  # naming the session: Status shows a caller the sessions it holds
        md = ((protocol.SESSION_METADATA, session_id),)
        reply = device_pb2_grpc.DeviceStub(ch).Status(device_pb2.StatusRequest(), timeout=30, metadata=md)
    return next(u for u in reply.sessions if u.session_id == public_session_id(session_id))


def _hwm_rss(pid: int) -> tuple[int, int]:
    """VmHWM (the peak) and VmRSS of `pid`, in bytes."""
    got = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            got[line[:5]] = int(line.split()[1]) * 1024
    return got["VmHWM"], got["VmRSS"]


def shaped(graph_id: int, shape: str, n: int, dims: int, x: int) -> tuple[Any, list[int]]:
    """A graph of `shape` (its size `n`) and the handles a run takes (`x`: a one-element float handle of `dims`
    dimensions): "neg" a chain of n `neg`; "tocopy" of n `_to_copy` (six arguments left to their defaults);
    "arange" n `arange.start_step` (seven arguments, no tensor read) summed into a chain; "wide" n inputs and 4n
    persistent tensors (at most 4,096 and 16,384), each `x`; "inline" n `add` of a 64 KiB inline tensor in a chain;
    "foreach" n `_foreach_neg` of 1,000 slots."""
    import torch

    from gpupool import wire
    from gpupool._proto import device_pb2, tensor_pb2

    T = tensor_pb2  # noqa: N806
    meta = wire.meta_to_proto(torch.ones([1] * dims))
    ops: list[Any] = []
    inputs, persistent = 1, []
    if shape in ("neg", "tocopy"):  # `_to_copy` of its tensor alone: six arguments left to their defaults
        name = "aten::neg.default" if shape == "neg" else "aten::_to_copy.default"
        ops = [device_pb2.Op(name=name, args=[T.Arg(tensor=i + 1)], outputs=[i + 2]) for i in range(n)]
    elif shape == "arange":
        for i in range(n):
            kw = {"dtype": T.Arg(dtype=T.DTYPE_FLOAT32), "layout": T.Arg(layout=T.LAYOUT_STRIDED),
                  "device": T.Arg(device=T.DeviceRef(type="gpupool")), "pin_memory": T.Arg(b=False)}  # fmt: skip
            args = [T.Arg(f=0.5 + i), T.Arg(f=2.5 + i), T.Arg(f=1.0)]
            ops.append(device_pb2.Op(name="aten::arange.start_step", args=args, kwargs=kw, outputs=[2 * i + 2]))
            ops.append(
                device_pb2.Op(
                    name="aten::add.Tensor",
                    args=[T.Arg(tensor=2 * i + 1), T.Arg(tensor=2 * i + 2)],
                    outputs=[2 * i + 3],
                )
            )
        meta = wire.meta_to_proto(torch.ones(2))
    elif shape == "inline":
        data = T.InlineTensor(dtype=T.DTYPE_FLOAT32, shape=[16384], data=bytes(65536))
        ops = [device_pb2.Op(name="aten::add.Tensor", args=[T.Arg(tensor=i + 1), T.Arg(inline=data)], outputs=[i + 2])
               for i in range(n)]  # fmt: skip
        meta = wire.meta_to_proto(torch.ones(16384))
    elif shape == "foreach":
        body = chain(graph_id, n, 1000)
        return body, [0]
    elif shape == "wide":
        inputs, persistent = min(n, 4096), [x] * min(4 * n, 16384)
        ops = [device_pb2.Op(name="aten::neg.default", args=[T.Arg(tensor=1)], outputs=[inputs + len(persistent) + 1])]
    last = ops[-1].outputs[-1]
    msg = device_pb2.DefineGraph(graph_id=graph_id, inputs=inputs, input_meta=[meta] * inputs, ops=ops,
                                 outputs=[last], persistent=persistent)  # fmt: skip
    return msg, [x] * inputs


def probe_estimate(address: str, key: bytes, shape: str, n: int, dims: int, daemon_pid: int) -> dict[str, Any]:
    """One graph of `shape` (`shaped`) defined and run three times (the second traces it under process isolation)
    in a session that defined and ran a small one of the same shape first: the growth of the process that holds it
    (the session's worker, or the daemon under `--isolation thread`), its peak (VmHWM) and what it holds after,
    against the estimate --max-graph-memory counts (Status graph_bytes)."""
    import torch
    from gpupool.client.session import Session

    from gpupool import tokens

    claims = tokens.TokenClaims(f"est-{shape}", "bench", 0, 256 * MiB, 1.0, time.time() + 3600, "est")
    out: dict[str, Any] = {}
    with Session.attach(address, tokens.mint(key, claims)) as s:
        sizes = {"arange": [2], "foreach": [1000], "inline": [16384]}.get(shape, [1] * dims)
        x = s.upload(torch.ones(sizes))
        s.sync()

        def define_and_run(g: int, size: int) -> None:
            msg, ins = shaped(g, shape, size, dims, x)
            if shape == "foreach":
                ins = [x]
            s.define_graph(msg)
            s.sync()
            for _ in range(3):
                y = s.new_handle()
                s.run_graph(g, ins, [y])
                s.sync()
                s.free([y])
            s.sync()

        small = max(1, n // 100)
        define_and_run(1000, small)
        pid = _status_row(address, s.session_id).worker_pid or daemon_pid
        time.sleep(0.3)
        est0 = _status_row(address, s.session_id).graph_bytes
        hwm0, rss0 = _hwm_rss(pid)
        t0 = time.perf_counter()
        define_and_run(1, n)
        out["seconds"] = time.perf_counter() - t0
        hwm1, rss1 = _hwm_rss(pid)
        est = _status_row(address, s.session_id).graph_bytes - est0
        out["estimate_MiB"] = est / MiB
        out["peak_MiB"] = (hwm1 - max(hwm0, rss0)) / MiB
        out["held_MiB"] = (rss1 - rss0) / MiB
        out["peak_per_estimate"] = (hwm1 - max(hwm0, rss0)) / max(1, est)
        out["held_per_estimate"] = (rss1 - rss0) / max(1, est)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isolation", default="thread", choices=["thread", "process"])
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--graphs", type=int, default=3)
    parser.add_argument("--handles", type=int, default=200_000)
    parser.add_argument("--width", type=int, default=0, help="_foreach_neg over this many slots per op (0: neg)")
    parser.add_argument("--against", metavar="DIR", default="", help="another checkout (its daemon) to measure too")
    parser.add_argument("--against-python", default=sys.executable, help="the python that imports DIR's gpupool")
    parser.add_argument("--serve-args", default="", help="more `gpupool serve` flags for this tree's daemon")
    parser.add_argument(
        "--probe",
        default="graphs",
        choices=[
            "graphs",
            "views",
            "graph-slots",
            "queued",
            "busy",
            "ints",
            "tensors",
            "views-list",
            "bools",
            "estimate",
        ],
        help="graphs: captured graphs and handles (round 35); views: handles of --dims-dimensional views; "
        "graph-slots: --graphs graphs of one op and --inputs inputs; queued: replies never read and 4 MiB uploads "
        "queued behind them (--frames); busy: --sessions sessions of one tenant, each 4 MiB uploads (--frames) "
        "queued behind slow matmuls; ints, tensors, views-list, bools: --records eager records of that kind, "
        "each its own template (round 37); estimate: one graph of --shape (size --ops, --dims dimensions an input), "
        "its process's growth against --max-graph-memory's estimate (round 38)",
    )
    parser.add_argument("--shape", default="neg", choices=["neg", "tocopy", "arange", "wide", "inline", "foreach"])
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--inputs", type=int, default=200_000)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--records", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = loopback_keys(tmp)
        trees = [("this", sys.executable, None, args.serve_args.split())]
        if args.against:
            trees.insert(0, ("other", args.against_python, args.against, []))
        for name, python, cwd, extra in trees:
            proc, address = start_daemon(key_file, "--isolation", args.isolation, *extra, python=python, cwd=cwd)
            try:
                rss = lambda p=proc.pid: tree_rss(p)  # noqa: E731
                if args.probe == "views":
                    got = probe_views(address, key, rss, args.handles, args.dims)
                elif args.probe == "graph-slots":
                    got = probe_graph_slots(address, key, rss, args.graphs, args.inputs)
                elif args.probe == "queued":
                    got = probe_queued(address, key, rss, args.frames, lambda p=proc.pid: own_rss(p))
                elif args.probe in ("ints", "tensors", "views-list", "bools"):
                    kind = "views" if args.probe == "views-list" else args.probe
                    got = probe_learned(address, key, rss, args.records, kind)
                elif args.probe == "estimate":
                    got = probe_estimate(address, key, args.shape, args.ops, args.dims, proc.pid)
                elif args.probe == "busy":
                    got = probe_busy(address, key, rss, args.frames, lambda p=proc.pid: own_rss(p), args.sessions)
                else:
                    got = measure(address, key, rss, args.ops, args.graphs, args.handles, name, args.width)
            finally:
                stop_all([proc])
            print(f"{name} ({args.isolation}): " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                                             for k, v in got.items()), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
