"""Fuzzing a live `gpupool serve` process with random and mutated ClientFrames (hypothesis, bounded).

Each example attaches a fresh session, uploads a few small tensors, then sends generated frames: ops of
random names (common, denied, unknown, other namespaces, or any aten overload) with random arguments (huge
and negative ints, NaN/inf, wrong kinds, long lists, handles of other sessions / never created / 0 /
2^64-1), random upload chunk sequences, Get/Free/Seed/Sync and empty commands with junk, and raw garbage or truncated
frames. The oracle: every error carries a status a client can act on (never INTERNAL or UNKNOWN), a
malformed frame ends only its own stream, and throughout a neighbour session on the same device computes a
fixed result bit-exact. At the end the daemon is alive and SERVING, Status works, and the device's memory
accounting holds only the neighbour's bytes.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import queue
import resource
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    ACTIONABLE,
    DaemonHandle,
    Healthy,
    MiB,
    start_serve_process,
    stop_process,
    stream_errors,
    tls_channel,
    wait_only_tenants,
)

from gpupool import wire
from gpupool._proto import device_pb2, device_pb2_grpc, tensor_pb2

GiB = 1024**3
QUOTA = 32 * MiB
EXPECTED = ACTIONABLE  # a status the client can act on
FINAL_SYNC = 2**63 + 12345
# 150 keeps the test near 30 s here; GPUPOOL_FUZZ_EXAMPLES=2000 GPUPOOL_FUZZ_RANDOM=1 for a deeper, fresh hunt.
EXAMPLES = int(os.environ.get("GPUPOOL_FUZZ_EXAMPLES", "150"))
DERANDOMIZE = not os.environ.get("GPUPOOL_FUZZ_RANDOM")
OTHER = 1 << 32  # the neighbour attaches first: session 1, so its handles are "another session's"

ALL_ATEN = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("aten::"))
COMMON = [
    "aten::add.Tensor",
    "aten::add_.Tensor",
    "aten::mul.Tensor",
    "aten::mm.default",
    "aten::sum.dim_IntList",
    "aten::view.default",
    "aten::expand.default",
    "aten::as_strided.default",
    "aten::_reshape_alias.default",
    "aten::cat.default",
    "aten::index_select.default",
    "aten::index.Tensor",
    "aten::index_put_.default",
    "aten::empty.memory_format",
    "aten::empty_strided.default",
    "aten::zeros.default",
    "aten::full.default",
    "aten::arange.start_step",
    "aten::resize_.default",
    "aten::set_.source_Tensor",
    "aten::copy_.default",
    "aten::clone.default",
    "aten::nonzero.default",
    "aten::masked_select.default",
    "aten::bincount.default",
    "aten::one_hot.default",
    "aten::repeat_interleave.Tensor",
    "aten::unique_dim.default",
    "aten::embedding.default",
    "aten::embedding_dense_backward.default",
    "aten::_embedding_bag.default",
    "aten::bernoulli.p",
    "aten::native_dropout.default",
    "aten::_local_scalar_dense.default",
    "aten::scatter.src",
    "aten::gather.default",
    "aten::_foreach_add.List",
]
DENIED = ["aten::from_file.default", "aten::save", "aten::_print.default", "aten::set_.source_Storage", "prim::device"]
UNKNOWN = ["aten::nope.default", "aten::ADD", "aten::__class__", "quantized::add", "os::system", "", "aten::"]

INTS = st.one_of(
    st.integers(-4, 8),
    st.sampled_from([-(2**63), 2**63 - 1, 2**31, 2**40, -1, 10**6]),
    st.integers(-(2**63), 2**63 - 1),
)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -0.0]))


# The strategies are built once per (base, other), not on every draw: hypothesis validates a new strategy object
# (its emptiness, recursion) at its first draw, which cost about as much as the drawing (half the example generation's
# CPU); the same strategies drawn in the same order draw alike.
@functools.cache
def _handle_choices(base: int, other: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([base + 1, base + 2, base + 3, base + 4]),  # uploaded by the prefix
        st.sampled_from([0, 2**64 - 1, base, base + 999_999, other + 1, other]),
        st.integers(0, 2**64 - 1),
    )


@st.composite
def handles(draw: Any, base: int, other: int) -> int:
    return draw(_handle_choices(base, other))


_handles = functools.cache(handles)


@functools.cache
def args(base: int, other: int) -> st.SearchStrategy[tensor_pb2.Arg]:
    h = _handles(base, other)
    A = tensor_pb2.Arg
    return st.one_of(
        st.builds(lambda: A(none=tensor_pb2.NoneArg())),
        INTS.map(lambda v: A(i=v)),
        FLOATS.map(lambda v: A(f=v)),
        st.booleans().map(lambda v: A(b=v)),
        st.tuples(FLOATS, FLOATS).map(lambda c: A(c=tensor_pb2.Complex(real=c[0], imag=c[1]))),
        st.one_of(st.sampled_from(["mean", "sum", "floor", "none"]), st.text(max_size=300)).map(lambda v: A(s=v)),
        st.integers(-2, 20).map(lambda v: A(dtype=v)),  # type: ignore[arg-type]
        st.tuples(
            st.sampled_from(["gpupool", "cpu", "cuda", "meta", "", "x" * 50]), st.integers(-(2**31), 2**31 - 1)
        ).map(lambda d: A(device=tensor_pb2.DeviceRef(type=d[0], index=d[1]))),
        st.integers(-1, 5).map(lambda v: A(layout=v)),  # type: ignore[arg-type]
        st.integers(-1, 8).map(lambda v: A(memory_format=v)),  # type: ignore[arg-type]
        st.one_of(st.lists(INTS, max_size=8), st.just([1] * 100_000)).map(
            lambda v: A(ints=tensor_pb2.IntList(values=v))
        ),
        st.lists(FLOATS, max_size=8).map(lambda v: A(floats=tensor_pb2.FloatList(values=v))),
        st.lists(st.booleans(), max_size=8).map(lambda v: A(bools=tensor_pb2.BoolList(values=v))),
        h.map(lambda v: A(tensor=v)),
        st.one_of(st.lists(h, max_size=6), st.just([base + 1] * 5000)).map(
            lambda v: A(tensors=tensor_pb2.TensorList(handles=v))
        ),
        st.tuples(st.integers(-1, 14), st.lists(st.integers(-3, 2**40), max_size=4), st.binary(max_size=64)).map(
            lambda t: A(inline=tensor_pb2.InlineTensor(dtype=t[0], shape=t[1], data=t[2]))  # type: ignore[arg-type]
        ),
    )


class _CommandParts:
    """The strategies `commands` draws from, built once per (base, other) (`_parts`)."""

    def __init__(self, base: int, other: int) -> None:
        h = _handles(base, other)
        a = args(base, other)
        self.h = h
        self.kind = st.sampled_from(["op"] * 6 + ["upload", "upload", "get", "free", "seed", "sync", "empty"])
        self.name = st.one_of(st.sampled_from(COMMON), st.sampled_from(ALL_ATEN), st.sampled_from(DENIED + UNKNOWN))
        self.overload = st.sampled_from(["default", "Tensor", "out", "Scalar"])
        self.op_args = st.lists(a, max_size=6)
        self.op_outputs = st.lists(st.one_of(st.integers(base + 5, base + 12), h), max_size=3)
        self.op_kwargs = st.dictionaries(st.sampled_from(["dtype", "out", "device", "dim", "x"]), a, max_size=2)
        self.up_handle = st.one_of(st.integers(base + 5, base + 8), h)
        self.up_offset = st.sampled_from([0, 0, 4, 16, 2**40, 2**64 - 1])
        self.up_data = st.one_of(st.binary(max_size=64), st.just(b"\0" * (4 * MiB + 1)))
        self.boolean = st.booleans()
        self.up_dtype = st.integers(-1, 14)
        self.up_shape = st.lists(st.one_of(st.integers(-2, 16), st.sampled_from([2**40, 2**62])), max_size=4)
        self.request_id = st.integers(1, 2**62)
        self.free_handles = st.lists(h, max_size=5)
        self.seed = st.integers(0, 2**64 - 1)
        self.sync_handles = st.lists(h, max_size=3)


_parts = functools.cache(_CommandParts)
_ALL_ATEN = frozenset(ALL_ATEN)  # `name in ALL_ATEN`, without a scan of thousands of names per drawn op


@st.composite
def commands(draw: Any, base: int, other: int) -> device_pb2.Command:
    p = _parts(base, other)
    kind = draw(p.kind)
    if kind == "op":
        name = draw(p.name)
        if name in _ALL_ATEN and "." not in name:
            name += "." + draw(p.overload)
        op = device_pb2.Op(name=name, args=draw(p.op_args), outputs=draw(p.op_outputs))
        for key, value in draw(p.op_kwargs).items():
            op.kwargs[key].CopyFrom(value)
        return device_pb2.Command(op=op)
    if kind == "upload":
        up = device_pb2.Upload(
            handle=draw(p.up_handle), offset=draw(p.up_offset), data=draw(p.up_data), last=draw(p.boolean)
        )
        if draw(p.boolean):
            up.meta.CopyFrom(
                tensor_pb2.TensorMeta(dtype=draw(p.up_dtype), shape=draw(p.up_shape))  # type: ignore[arg-type]
            )
        return device_pb2.Command(upload=up)
    if kind == "get":
        return device_pb2.Command(get=device_pb2.Get(request_id=draw(p.request_id), handle=draw(p.h)))
    if kind == "free":
        return device_pb2.Command(free=device_pb2.Free(handles=draw(p.free_handles)))
    if kind == "seed":
        return device_pb2.Command(seed=device_pb2.Seed(seed=draw(p.seed)))
    if kind == "sync":
        return device_pb2.Command(
            sync=device_pb2.Sync(request_id=draw(p.request_id), scalar_handles=draw(p.sync_handles))
        )
    return device_pb2.Command()  # an empty command (the in-stream Refresh, field 7, is gone)


SYM = 0x5EED << 32  # frames are drawn for this handle base, then moved to the session's real one


@st.composite
def frames(draw: Any) -> tuple[list[device_pb2.Command], str, int, int, bytes]:
    """Commands of one frame (for handle base SYM) and how to mangle its bytes."""
    cmds = draw(_FRAME_COMMANDS)
    mutation = draw(_MUTATIONS)
    return cmds, mutation, draw(_WHERE), draw(_XOR), draw(_JUNK)


# built once (see `_CommandParts`)
_FRAME_COMMANDS = st.lists(commands(SYM, OTHER), max_size=8)
_MUTATIONS = st.sampled_from(["none"] * 5 + ["truncate", "flip", "garbage", "append"])
_WHERE, _XOR, _JUNK = st.integers(0, 2**20), st.integers(1, 255), st.binary(max_size=200)


def _move(h: int, base: int) -> int:
    return h - SYM + base if SYM <= h < SYM + (1 << 32) else h


def frame_bytes(plan: tuple[list[device_pb2.Command], str, int, int, bytes], base: int) -> bytes:
    cmds, mutation, where, xor, junk = plan
    frame = device_pb2.ClientFrame()
    for drawn in cmds:
        c = frame.commands.add()
        c.CopyFrom(drawn)
        kind = c.WhichOneof("cmd")
        if kind == "op":
            for a in list(c.op.args) + list(c.op.kwargs.values()):
                if a.WhichOneof("value") == "tensor":
                    a.tensor = _move(a.tensor, base)
                elif a.WhichOneof("value") == "tensors":
                    a.tensors.handles[:] = [_move(h, base) for h in a.tensors.handles]
            c.op.outputs[:] = [_move(h, base) for h in c.op.outputs]
        elif kind in ("upload", "get"):
            msg = getattr(c, kind)
            msg.handle = _move(msg.handle, base)
        elif kind == "free":
            c.free.handles[:] = [_move(h, base) for h in c.free.handles]
        elif kind == "sync":
            c.sync.scalar_handles[:] = [_move(h, base) for h in c.sync.scalar_handles]
    raw = frame.SerializeToString()
    if mutation == "truncate" and raw:
        return raw[: where % len(raw)]
    if mutation == "flip" and raw:
        i = where % len(raw)
        return raw[:i] + bytes([raw[i] ^ xor]) + raw[i + 1 :]
    if mutation == "garbage":
        return junk
    if mutation == "append":
        return raw + (junk or b"\xff")
    return raw


# ---- the daemon, a neighbour, and one fuzzed session per example ----


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonHandle]:
    key = secrets.token_hex(32).encode()
    key_file = Path(tmp_path_factory.mktemp("fuzz")) / "token.key"
    key_file.write_bytes(key + b"\n")
    # Client certificates required: the test's (admin) one sees every session in Status (`wait_only_tenants`)
    proc, address = start_serve_process(
        key_file, "--fake-gpus", "1", "--fake-gpu-memory", "64GiB", "--tls-client-auth", "require"
    )
    # Far below the fake GPU: an allocation that escapes the quota checks fails instead of swapping the box.
    resource.prlimit(proc.pid, resource.RLIMIT_AS, (6 * GiB, 6 * GiB))
    yield DaemonHandle(address, key, "test-host", process=proc)
    assert stop_process(proc) == 0


def _prefix(base: int) -> bytes:
    """Four small tensors the fuzzed commands can use: float [4,4], int64 [4], bool [4], float scalar."""
    values = [
        torch.arange(16.0).view(4, 4),
        torch.arange(4),
        torch.tensor([True, False, True, True]),
        torch.tensor(2.5),
    ]
    cmds = []
    for i, t in enumerate(values, start=1):
        meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(t.dtype), shape=list(t.shape))
        up = device_pb2.Upload(handle=base + i, meta=meta, data=wire.tensor_to_bytes(t), last=True)
        cmds.append(device_pb2.Command(upload=up))
    return device_pb2.ClientFrame(commands=cmds).SerializeToString()


def run_session(daemon: DaemonHandle, stub: Any, channel: grpc.Channel, base: int, frames: list[bytes]) -> list[str]:
    """Attach, send the prefix, the fuzzed frames and a final sync; return every error code seen."""
    reply = stub.Attach(device_pb2.AttachRequest(token=daemon.token(quota_bytes=QUOTA)), timeout=10)
    assert reply.handle_base == base, "the frames were drawn for another session's handles"
    done = threading.Event()
    sync = device_pb2.Command(sync=device_pb2.Sync(request_id=FINAL_SYNC))

    def requests() -> Iterator[bytes]:
        yield _prefix(reply.handle_base)
        for i, raw in enumerate(frames, start=1):
            yield raw
            # Each frame's first error comes back at this sync (a sync reports only the first since the last).
            yield device_pb2.ClientFrame(
                commands=[device_pb2.Command(sync=device_pb2.Sync(request_id=i))]
            ).SerializeToString()
        yield device_pb2.ClientFrame(commands=[sync]).SerializeToString()
        done.wait(30)

    try:
        codes, _ = stream_errors(channel, reply.session_id, requests(), FINAL_SYNC, 60)
    finally:
        done.set()
    stub.Detach(device_pb2.DetachRequest(session_id=reply.session_id), timeout=10)
    return codes


@pytest.mark.slow
def test_fuzzed_frames_harm_nothing(served: DaemonHandle) -> None:
    neighbour = Healthy(served.address, served.token(tenant="neighbour", quota_bytes=QUOTA))
    channel = tls_channel(served.address, options=[("grpc.max_receive_message_length", 64 * MiB)])
    stub = device_pb2_grpc.DeviceStub(channel)
    seen: queue.SimpleQueue[str] = queue.SimpleQueue()
    probe = stub.Attach(device_pb2.AttachRequest(token=served.token(quota_bytes=QUOTA)), timeout=10)
    base = probe.handle_base  # sessions get consecutive numbers: guess the next ones' bases
    stub.Detach(device_pb2.DetachRequest(session_id=probe.session_id))
    counter = iter(range(1, 10**6))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,  # a loaded 2-core box; the whole test is bounded by max_examples
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=DERANDOMIZE,
    )
    @given(st.lists(frames(), min_size=1, max_size=4))
    def fuzz(plans: list[Any]) -> None:
        guess = base + (next(counter) << 32)  # the next session's handle base (one attach per example)
        codes = run_session(served, stub, channel, guess, [frame_bytes(p, guess) for p in plans])
        for code in codes:
            seen.put(code)
            assert code.startswith("stream:") or code in EXPECTED, code
        assert served.process is not None and served.process.poll() is None, "the daemon died"

    try:
        fuzz()
        assert served.process is not None and served.process.poll() is None, "the daemon died"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert neighbour.iterations > 0 and not neighbour.failures, neighbour.failures
        wait_only_tenants(stub, {"neighbour"})  # closed sessions hold nothing: the device's bytes are the neighbour's
    finally:
        neighbour.close()
        channel.close()
    assert not neighbour.failures, neighbour.failures
    counts = collections.Counter()
    while not seen.empty():
        counts[seen.get()] += 1
    print("error codes seen:", dict(counts))
    codes = set(counts)
    # The fuzz reached real checks: argument errors, other sessions' handles, and streams ended by bad bytes.
    assert {"INVALID_ARGUMENT", "PERMISSION_DENIED", "stream:INVALID_ARGUMENT"} <= codes, codes
