"""Targeted abuse of one `gpupool serve` process: memory bombs, out-of-bounds views, kernels that trust their
inputs, host-touching ops, other sessions' tensors, huge argument lists, floods of frames, a client that never
reads, attach/detach churn and slow-loris connections. Each case checks its status code, and a neighbour
session on the same device verifies its results bit-exact throughout.

The daemon runs with an address-space limit far below its fake GPU's capacity: a bomb that is not refused
before allocating fails with "out of memory" (and fails the test) instead of exhausting the test machine.
"""

from __future__ import annotations

import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from gpupool.client.session import Handle, Session
from gpupool.server import guards
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import (
    DaemonHandle,
    Healthy,
    MiB,
    operator_tls,
    session_usage,
    start_serve_process,
    stop_process,
    tls_channel,
)

from gpupool import errors
from gpupool._proto import device_pb2, device_pb2_grpc, tensor_pb2
from gpupool.tokens import public_session_id

GiB = 1024**3
QUOTA = 64 * MiB
ADDRESS_SPACE = 6 * GiB  # far below the fake GPU's 64 GiB: an unrefused bomb fails instead of swapping the box


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonHandle]:
    import secrets

    key = secrets.token_hex(32).encode()
    key_file = Path(tmp_path_factory.mktemp("abuse")) / "token.key"
    key_file.write_bytes(key + b"\n")
    # Client certificates required: the test's (admin) one sees every session in Status, and the device's totals
    proc, address = start_serve_process(
        key_file, "--fake-gpus", "1", "--fake-gpu-memory", "64GiB", "--tls-client-auth", "require"
    )
    resource.prlimit(proc.pid, resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    yield DaemonHandle(address, key, "test-host", process=proc)
    assert proc.poll() is None, "the daemon died"
    assert stop_process(proc) == 0


@pytest.fixture
def neighbour(served: DaemonHandle) -> Iterator[Healthy]:
    n = Healthy(served.address, served.token(tenant="neighbour", quota_bytes=QUOTA), pause=0.01)
    yield n
    n.check(min_iterations=2)


@pytest.fixture
def bad(served: DaemonHandle, neighbour: Healthy) -> Iterator[Session]:
    with Session.attach(served.address, served.token(tenant="abuser", quota_bytes=QUOTA)) as s:
        yield s


def status(daemon: DaemonHandle) -> device_pb2.StatusReply:
    with tls_channel(daemon.address) as channel:
        return device_pb2_grpc.DeviceStub(channel).Status(device_pb2.StatusRequest(), timeout=10)


def used(daemon: DaemonHandle, s: Session) -> int:
    """Session `s`'s bytes in `daemon`'s Status, the session named in the call's metadata (`session_usage`): it shows
    whether or not the daemon sees an operator's certificate (test_daemon_red34.py's daemons do not)."""
    return session_usage(daemon.address, s).used_bytes


def usable(s: Session) -> None:
    [h] = s.call("aten::mul.Tensor", Handle(s.upload(torch.arange(4.0))), 3)
    assert torch.equal(s.download(h), torch.arange(4.0) * 3)


def rss(daemon: DaemonHandle) -> int:
    assert daemon.process is not None
    for line in Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---- memory bombs: refused from their size, before anything is allocated ----

HUGE = 2**38


def _bombs(s: Session) -> Iterator[tuple[str, list[int]]]:
    small = Handle(s.upload(torch.ones(1024)))
    yield "empty", s.call("aten::empty.memory_format", [HUGE], dtype=torch.float32)
    yield "zeros", s.call("aten::zeros.default", [HUGE])
    yield "ones", s.call("aten::ones.default", [HUGE, 4])
    yield "full", s.call("aten::full.default", [HUGE], 1.5)
    yield "arange", s.call("aten::arange.default", HUGE)
    yield "randperm", s.call("aten::randperm.default", HUGE)
    yield "eye", s.call("aten::eye.default", 2**22)
    [wide] = s.call("aten::expand.default", Handle(s.upload(torch.ones(1))), [2**27])  # a view: allowed
    yield "expand+contiguous", s.call("aten::contiguous.default", wide)
    yield "expand+clone", s.call("aten::clone.default", wide)
    yield "repeat", s.call("aten::repeat.default", small, [2**20])
    yield "cat of views", s.call("aten::cat.default", [small] * 20_000)
    yield "pad", s.call("aten::constant_pad_nd.default", small, [0, HUGE])
    yield "new_empty_strided", s.call("aten::new_empty_strided.default", small, [2**20, 2**20], [2**20, 1])
    index = Handle(s.upload(torch.zeros(2**20, dtype=torch.long)))  # 8 MiB of indices
    rows = Handle(s.upload(torch.ones(1, 4096)))
    yield "index_select", s.call("aten::index_select.default", rows, 0, index)  # 16 GiB out
    yield "histc", s.call("aten::histc.default", small, HUGE)
    # No meta kernel or a data-dependent size: bounded from the real inputs.
    one = Handle(s.upload(torch.tensor([0])))
    yield "one_hot", s.call("aten::one_hot.default", one, 2**32)
    yield "bincount", s.call("aten::bincount.default", Handle(s.upload(torch.tensor([2**33]))))
    yield "repeat_interleave", s.call("aten::repeat_interleave.Tensor", Handle(s.upload(torch.tensor([2**35]))))
    [mask] = s.call("aten::expand.default", Handle(s.upload(torch.tensor([True]))), [2**25])
    yield "nonzero of an expanded view", s.call("aten::nonzero.default", mask)
    yield "masked_select", s.call("aten::masked_select.default", Handle(s.upload(torch.ones(2**12, 1))), mask)


def test_memory_bombs_are_refused_before_allocating(served: DaemonHandle, bad: Session) -> None:
    start_rss = rss(served)
    for name, outs in _bombs(bad):
        with pytest.raises(errors.ResourceExhausted) as info:
            bad.sync()
        message = str(info.value)
        assert "out of memory" not in message and ("requested" in message or "quota" in message), (name, message)
        with pytest.raises(errors.ResourceExhausted):
            bad.download(outs[0])  # the output is poisoned with the same error
    assert used(served, bad) < QUOTA
    assert rss(served) - start_rss < 512 * MiB
    usable(bad)


def test_in_place_resize_of_an_upload_is_refused(served: DaemonHandle, bad: Session) -> None:
    h = Handle(bad.upload(torch.arange(8.0)))
    bad.call("aten::resize_.default", h, [HUGE], outputs=[0])
    with pytest.raises(errors.ResourceExhausted, match="requested"):
        bad.sync()
    assert torch.equal(bad.download(h), torch.arange(8.0))


# ---- views and kernels that would read or write out of bounds ----


def test_out_of_bounds_views_are_refused(bad: Session) -> None:
    h = Handle(bad.upload(torch.arange(4.0)))
    cases = [
        ("aten::as_strided.default", [h, [10**6], [1]]),
        ("aten::as_strided.default", [h, [2], [1], 3]),
        ("aten::_reshape_alias.default", [h, [10**6], [1]]),  # torch itself does not check this one
        ("aten::as_strided_.default", [h, [4], [10**5]]),
        ("aten::view.default", [h, [10**6]]),
    ]
    for name, args in cases:
        [out] = bad.call(name, *args)
        with pytest.raises(errors.InvalidArgument, match="out of bounds|invalid"):
            bad.sync()
        with pytest.raises(errors.InvalidArgument):
            bad.download(out)
    [ok] = bad.call("aten::_reshape_alias.default", h, [2, 2], [2, 1])
    assert torch.equal(bad.download(ok), torch.arange(4.0).view(2, 2))
    assert torch.equal(bad.download(h), torch.arange(4.0))


def test_index_put_impl_is_checked_whatever_its_unsafe_flag(bad: Session) -> None:
    """`_index_put_impl_` (what `index_put_`'s composite kernel calls: the C++ client sends it) runs as
    `index_put_`: in-range indices give local torch's result, out-of-range ones are refused, unsafe or not."""
    # On a real GPU `unsafe=True` lets the CUDA kernel skip its bounds check; CPU kernels check whatever it
    # says, so there only the replacement's presence shows.
    assert guards.replacement(torch.ops.aten._index_put_impl_.default) is not None
    base, values = torch.arange(30.0).view(5, 6), torch.full((2, 6), 0.5)
    index = torch.tensor([0, 3])
    for accumulate in (False, True):
        h = Handle(bad.upload(base))
        bad.call("aten::_index_put_impl_.default", h, [Handle(bad.upload(index))], Handle(bad.upload(values)),
                 accumulate, True, outputs=[0])  # fmt: skip
        expected = base.clone().index_put_((index,), values, accumulate)
        assert torch.equal(bad.download(h), expected)
    for far in (5, -6, 1 << 40):
        h = Handle(bad.upload(base))
        bad.call("aten::_index_put_impl_.default", h, [Handle(bad.upload(torch.tensor([far])))],
                 Handle(bad.upload(values[:1])), True, True, outputs=[0])  # fmt: skip
        with pytest.raises(errors.InvalidArgument, match="out of bounds|index"):
            bad.sync()
        assert torch.equal(bad.download(h), base)


def test_embedding_bags_read_expanded_inputs_as_torch_means_them(served: DaemonHandle, bad: Session) -> None:
    """The embedding bags' CPU kernels walk indices and offsets by raw pointer whatever their strides: an expanded
    (stride 0) view of one index read the worker's memory past its 8 bytes (an out-of-range word came back in
    the error, an in-range one picked a row), expanded offsets segfaulted the worker (round 18). They run on
    contiguous copies now: the bags are what torch computes from the same values, contiguous."""
    weight = torch.arange(20.0).reshape(10, 2)
    w = Handle(bad.upload(weight))
    for indices, offsets in (
        (torch.tensor([3]).expand(4096), torch.tensor([0])),
        (torch.arange(6), torch.tensor([0]).expand(4096)),
    ):
        sent = [
            bad.call("aten::expand.default", Handle(bad.upload(t[:1].clone())), list(t.shape))[0]
            if t.stride(0) == 0
            else bad.upload(t)
            for t in (indices, offsets)
        ]
        for name in ("aten::_embedding_bag.default", "aten::_embedding_bag_forward_only.default"):
            want = getattr(torch.ops.aten, name[6:].split(".")[0])(weight, indices.contiguous(), offsets.contiguous())
            [bags, *_] = bad.call(name, w, Handle(sent[0]), Handle(sent[1]), outputs=4)
            assert torch.equal(bad.download(bags), want[0]), name
    assert served.process is not None and served.process.poll() is None


def test_kernels_that_trust_their_inputs_are_checked(served: DaemonHandle, bad: Session) -> None:
    grad = Handle(bad.upload(torch.ones(2, 3)))
    far = Handle(bad.upload(torch.tensor([10**6, 0])))
    pair = Handle(bad.upload(torch.tensor([0, 1])))
    zeros = Handle(bad.upload(torch.tensor([0, 0])))
    cases: list[tuple[str, list[Any], dict[str, Any]]] = [
        # These corrupted the daemon's heap (double free, munmap_chunk) and aborted it.
        ("aten::_embedding_bag_dense_backward.default", [grad, far, pair, pair, zeros, 2, False, 0, None, -1], {}),
        ("aten::_cummax_helper.default", [grad, grad, far, 0], {}),
        ("aten::embedding_dense_backward.default", [grad, far, 2, -1, False], {}),
        ("aten::to_sparse.default", [grad], {}),
        (
            "aten::_fused_adam_.default",
            [[grad], [grad], [grad], [grad], [], [pair]],
            dict(lr=0.1, beta1=0.9, beta2=0.9, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False),
        ),
        ("aten::repeat_interleave.Tensor", [pair], {"output_size": 10**4}),
    ]
    # torch's CPU fused Adam walks each list's tensors as numel() contiguous elements: an expanded parameter (stride
    # 0, one element of storage) was written 10^5 elements past its storage, a one-element grad read past its own.
    big = Handle(bad.upload(torch.zeros(10**5)))
    [expanded] = bad.call("aten::expand.default", Handle(bad.upload(torch.zeros(1))), [10**5])
    one, step = Handle(bad.upload(torch.ones(1))), Handle(bad.upload(torch.tensor(1.0)))
    adam = dict(beta1=0.9, beta2=0.9, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    cases += [
        ("aten::_fused_adam_.default", [[expanded], [big], [big], [big], [], [step]], dict(lr=0.1, **adam)),
        ("aten::_fused_adamw_.default", [[big], [one], [big], [big], [], [step]], dict(lr=0.1, **adam)),
        ("aten::_fused_adam_.tensor_lr", [[big], [big], [big], [big], [], [step]], dict(lr=big, **adam)),
        ("aten::_fused_adam_.default", [[big], [big], [big], [big], [], [step]],
         dict(lr=0.1, found_inf=Handle(bad.upload(torch.zeros(0))), **adam)),
        # the functional form runs the same kernel on clones of the lists it writes: the grad was read past
        ("aten::_fused_adam.default", [[big], [one], [big], [big], [], [step]], dict(lr=0.1, **adam)),
    ]  # fmt: skip
    for name, args, kwargs in cases:
        bad.call(name, *args, outputs=0, **kwargs)
        with pytest.raises(errors.InvalidArgument):
            bad.sync()
    assert served.process is not None and served.process.poll() is None
    [w] = bad.call("aten::embedding_dense_backward.default", grad, pair, 2, -1, False)  # a valid one still runs
    assert torch.equal(bad.download(w), torch.ones(2, 3))
    p, g, m, v = (Handle(bad.upload(torch.full((3,), x))) for x in (1.0, 0.5, 0.0, 0.0))
    bad.call("aten::_fused_adam_.tensor_lr", [p], [g], [m], [v], [], [step], outputs=0,
             lr=Handle(bad.upload(torch.tensor(0.1))), **adam)  # fmt: skip
    assert torch.allclose(bad.download(p), torch.full((3,), 0.9))  # one Adam step: 1 - lr * sign(grad)
    # Masked-off indices may be anything (it read wherever they pointed): now clamped, as torch decomposes it.
    rows = Handle(bad.upload(torch.arange(3.0)))
    mask = Handle(bad.upload(torch.tensor([True, False])))
    [m] = bad.call("aten::_unsafe_masked_index.default", rows, mask, [far], -1.0)
    assert bad.download(m).tolist() == [2.0, -1.0]


@pytest.mark.parametrize(
    "name, args",
    [
        ("aten::from_file.default", ["/etc/passwd"]),
        ("aten::save.default", ["/tmp/x"]),
        ("aten::_pin_memory.default", ["TENSOR"]),
        ("aten::pin_memory.default", ["TENSOR"]),
        ("aten::record_stream.default", ["TENSOR", 0]),
        ("aten::set.source_Storage", ["TENSOR", "TENSOR"]),
        ("aten::set_.source_Storage_storage_offset", ["TENSOR", "TENSOR", 0, [1], [1]]),
        ("aten::_cufft_set_plan_cache_max_size.default", [0, 1]),
        ("aten::_print.default", ["hello"]),
        ("aten::_share_memory_.default", ["TENSOR"]),
    ],
)
def test_ops_touching_the_host_are_denied(bad: Session, name: str, args: list[Any]) -> None:
    h = Handle(bad.upload(torch.ones(2)))
    bad.call(name, *[h if a == "TENSOR" else a for a in args], outputs=0)
    with pytest.raises(errors.PermissionDenied, match="denied"):
        bad.sync()
    usable(bad)


def test_other_sessions_tensors_are_out_of_reach(served: DaemonHandle, bad: Session) -> None:
    with Session.attach(served.address, served.token(quota_bytes=QUOTA)) as victim:
        theirs = Handle(victim.upload(torch.arange(4.0)))
        victim.sync()
        mine = Handle(bad.upload(torch.ones(4)))
        attempts: list[tuple[str, list[Any], int | list[int]]] = [
            ("aten::add_.Tensor", [theirs, mine], [0]),
            ("aten::copy_.default", [theirs, mine], [0]),
            ("aten::add.out", [mine, mine], [0]),  # out= below
            ("aten::neg.default", [mine], [theirs]),  # binding an output under their handle
        ]
        for name, args, outs in attempts:
            kwargs = {"out": theirs} if name.endswith(".out") else {}
            bad.call(name, *args, outputs=outs, **kwargs)
            with pytest.raises(errors.PermissionDenied):
                bad.sync()
        up = device_pb2.Upload(
            handle=theirs, meta=tensor_pb2.TensorMeta(dtype=1, shape=[4]), data=b"\0" * 16, last=True
        )
        bad._add(device_pb2.Command(upload=up))
        with pytest.raises(errors.PermissionDenied):
            bad.sync()
        assert torch.equal(victim.download(theirs), torch.arange(4.0))


def test_set_and_frees_leave_no_memory_behind(served: DaemonHandle, bad: Session) -> None:
    a = Handle(bad.upload(torch.zeros(1024)))
    b = Handle(bad.upload(torch.ones(4096)))
    bad.call("aten::set_.source_Tensor", a, b, outputs=[0])  # a now shares b's storage; its own is freed
    u = Handle(bad.upload(torch.zeros(8)))
    [c] = bad.call("aten::set_.source_Tensor", u, a)
    assert torch.equal(bad.download(a), torch.ones(4096)) and torch.equal(bad.download(c), torch.ones(4096))
    assert used(served, bad) == 4096 * 4
    bad.free([a, b, c, u])
    bad.sync()
    assert used(served, bad) == 0


def test_a_half_uploaded_tensor_cannot_be_read(bad: Session) -> None:
    h = bad.new_handle()
    meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_UINT8, shape=[8 * MiB])
    bad._add(device_pb2.Command(upload=device_pb2.Upload(handle=h, meta=meta, data=b"\1" * MiB)))
    with pytest.raises(errors.FailedPrecondition, match="still being uploaded"):
        bad.download(h)  # its other 7 MiB were never written: uninitialized daemon memory
    bad.call("aten::sum.default", Handle(h))
    with pytest.raises(errors.FailedPrecondition):
        bad.sync()


# ---- sizes of messages, lists and floods ----


def test_huge_argument_lists(bad: Session) -> None:
    h = Handle(bad.upload(torch.arange(6.0)))
    bad.call("aten::view.default", h, [1] * 1_000_000)
    with pytest.raises(errors.InvalidArgument):
        bad.sync()
    bad.op("aten::add.Tensor", [tensor_pb2.Arg(tensor=h)] * 5000, None, [bad.new_handle()])
    with pytest.raises(errors.InvalidArgument):
        bad.sync()
    bad.op("aten::neg.default", [tensor_pb2.Arg(tensor=h)], None, [bad.new_handle() for _ in range(50_000)])
    with pytest.raises(errors.InvalidArgument, match="output handles"):
        bad.sync()
    [total] = bad.call("aten::cat.default", [h] * 50_000)  # long, but within the quota: it runs
    assert bad.download(total).shape == (300_000,)
    bad.call("aten::cat.default", [h] * 100_000)  # each listed tensor costs host RAM outside the quota
    with pytest.raises(errors.InvalidArgument, match="at most"):
        bad.sync()


def test_host_memory_outside_the_quota_is_bounded(served: DaemonHandle, bad: Session) -> None:
    """Downloading a huge expanded view copied it whole; tensors of a million dimensions kept 16 MB of sizes
    each, and the op-size cache kept their keys: all host RAM that no quota counted."""
    [wide] = bad.call("aten::expand.default", Handle(bad.upload(torch.ones(1))), [2**36])
    with pytest.raises(errors.ResourceExhausted, match="download"):
        bad.download(wide)
    h = Handle(bad.upload(torch.arange(6.0)))
    start = rss(served)
    for i in range(6):
        [v] = bad.call("aten::view.default", h, [1] * (1_000_000 + i) + [6])
        with pytest.raises(errors.InvalidArgument, match="dimensions"):
            bad.download(v)
    assert rss(served) - start < 256 * MiB
    [ok] = bad.call("aten::view.default", h, [1] * 60 + [6])
    assert bad.download(ok).shape == (1,) * 60 + (6,)


def test_millions_of_views_are_refused(served: DaemonHandle, bad: Session) -> None:
    """Views cost no quota, but each is ~600 bytes of host RAM: a 16M-element tensor split into singles made
    the daemon build 16M tensors (10 GB and minutes of the device's time) just to size the op."""
    flags = Handle(bad.upload(torch.zeros(16 * MiB, dtype=torch.bool)))
    start = rss(served)
    for name, args in [
        ("aten::split.Tensor", [flags, 1]),
        ("aten::unbind.int", [flags]),
        ("aten::chunk.default", [flags, 2**40]),
        ("aten::tensor_split.sections", [flags, 10**7]),
        ("aten::split_with_sizes.default", [flags, [1] * 1_000_000]),
    ]:
        bad.call(name, *args, outputs=0)
        with pytest.raises(errors.InvalidArgument, match="at most"):
            bad.sync()
    assert rss(served) - start < 256 * MiB
    [a, b] = bad.call("aten::split.Tensor", flags, 8 * MiB, outputs=2)
    assert bad.download(b).shape == (8 * MiB,)


def _raw_stream(daemon: DaemonHandle, token: str) -> tuple[grpc.Channel, str, Any]:
    channel = tls_channel(daemon.address, options=[("grpc.max_receive_message_length", 64 * MiB)])
    reply = device_pb2_grpc.DeviceStub(channel).Attach(device_pb2.AttachRequest(token=token))
    stream = channel.stream_stream(
        "/gpupool.v1.Device/Stream", request_serializer=None, response_deserializer=device_pb2.ServerFrame.FromString
    )
    return channel, reply.session_id, (reply.handle_base, stream)


def test_ten_thousand_tiny_frames(served: DaemonHandle, neighbour: Healthy) -> None:
    channel, sid, (base, stream) = _raw_stream(served, served.token(quota_bytes=QUOTA))
    with channel:
        x = base + 1
        up = device_pb2.Upload(handle=x, meta=tensor_pb2.TensorMeta(dtype=1, shape=[1]), data=b"\0\0\0\0", last=True)
        frames = [device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()]
        add = device_pb2.Op(name="aten::add_.Tensor", args=[tensor_pb2.Arg(tensor=x), tensor_pb2.Arg(i=1)], outputs=[0])
        one = device_pb2.ClientFrame(commands=[device_pb2.Command(op=add)]).SerializeToString()
        frames += [one] * 10_000 + [b""] * 10_000  # and as many empty frames
        sync = device_pb2.Sync(request_id=1, scalar_handles=[x])
        frames.append(device_pb2.ClientFrame(commands=[device_pb2.Command(sync=sync)]).SerializeToString())
        replies = stream(iter(frames), metadata=(("gpupool-session", sid),), timeout=120)
        first = next(replies)
        assert first.sync.values[0].f == 10_000.0 and not first.sync.HasField("error")


def test_a_client_that_never_reads_is_pushed_back(served: DaemonHandle, neighbour: Healthy) -> None:
    channel, sid, (base, stream) = _raw_stream(served, served.token(quota_bytes=QUOTA))
    with channel:
        x = base + 1
        meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_UINT8, shape=[4 * MiB])
        up = device_pb2.Upload(handle=x, meta=meta, data=b"\7" * (4 * MiB), last=True)
        gets = [device_pb2.Command(get=device_pb2.Get(request_id=i, handle=x)) for i in range(1, 201)]
        sent, release = threading.Event(), threading.Event()

        def frames() -> Iterator[bytes]:
            yield device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()
            for _ in range(10):  # 2000 downloads of 4 MiB: 8 GiB if the daemon buffered them all
                yield device_pb2.ClientFrame(commands=gets).SerializeToString()
            sent.set()
            release.wait(60)

        start = rss(served)
        call = stream(frames(), metadata=(("gpupool-session", sid),), timeout=120)  # never read
        sent.wait(20)
        time.sleep(3)  # time for an unbounded daemon to build gigabytes of replies
        grown = rss(served) - start
        assert grown < 512 * MiB, f"daemon grew by {grown >> 20} MiB for a client that does not read"
        neighbour.check(min_iterations=2)  # the device keeps serving others meanwhile
        first = next(call)  # reading now gets the replies, in order
        assert first.request_id == 1 and first.chunk.meta.shape == [4 * MiB]
        call.cancel()
        release.set()
    deadline = time.monotonic() + 20
    while public_session_id(sid) in {s.session_id for s in status(served).sessions} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert public_session_id(sid) not in {s.session_id for s in status(served).sessions}


def test_attach_detach_churn(served: DaemonHandle, neighbour: Healthy) -> None:
    failures: list[BaseException] = []

    def churn(n: int) -> None:
        try:
            for i in range(n):
                s = Session.attach(served.address, served.token(quota_bytes=QUOTA, tenant=f"churn{i % 3}"))
                h = Handle(s.upload(torch.full((256,), float(i))))
                if i % 2:
                    assert s.download(h)[0] == i
                s.close()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=churn, args=(25,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    deadline = time.monotonic() + 20
    while True:  # the neighbour keeps allocating: compare device and session totals until a quiet moment
        st = status(served)
        others = [s for s in st.sessions if s.tenant != "neighbour"]
        balanced = st.devices[0].used_bytes == sum(s.used_bytes for s in st.sessions)
        if (not others and balanced) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not others
    assert balanced  # every closed session's memory came back to the device


def test_slow_loris_connections(served: DaemonHandle, neighbour: Healthy) -> None:
    host, port = served.address.rsplit(":", 1)
    socks = []
    try:
        for i in range(30):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(b"PRI * HTTP/2.0\r\n"[: 1 + i % 10])  # a preface that never completes
            socks.append(sock)
        idle_channel, sid, (_, stream) = _raw_stream(served, served.token(quota_bytes=QUOTA))
        stop = threading.Event()

        def dribble() -> Iterator[bytes]:
            while not stop.wait(0.5):
                yield b""  # a frame every half second, forever

        call = stream(dribble(), metadata=(("gpupool-session", sid),), timeout=60)
        for sock in socks:
            sock.sendall(b"\0")
        with tls_channel(served.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        with Session.attach(served.address, served.token(quota_bytes=QUOTA)) as s:
            usable(s)
        neighbour.check(min_iterations=3)
        stop.set()
        call.cancel()
        idle_channel.close()
    finally:
        for sock in socks:
            sock.close()


def test_no_session_reads_memory_another_one_freed(served: DaemonHandle, bad: Session) -> None:
    """`empty` and a growing `resize_` handed out the allocator's old contents: another tenant's freed data."""
    with Session.attach(served.address, served.token(quota_bytes=QUOTA)) as victim:
        for n in (4096, 30_000):
            secret = Handle(victim.upload(torch.full((n,), 1234.5)))
            [copy] = victim.call("aten::mul.Tensor", secret, 1.0)
            victim.sync()
            victim.free([secret, copy])
            victim.sync()
            [e] = bad.call("aten::empty.memory_format", [n], dtype=torch.float32)
            [s] = bad.call("aten::new_empty_strided.default", e, [n // 2], [2])
            grown = Handle(bad.upload(torch.ones(1)))
            bad.call("aten::resize_.default", grown, [n], outputs=[0])
            for h in (e, s, grown):
                got = bad.download(h)
                assert not (got == 1234.5).any(), f"{int((got == 1234.5).sum())} of another session's values read"
            assert torch.equal(bad.download(grown)[1:], torch.zeros(n - 1))


def test_malformed_arguments_to_guarded_ops_are_invalid(bad: Session) -> None:
    """Guards that read arguments before torch does must answer INVALID_ARGUMENT, never INTERNAL (fuzz find)."""
    for name in (
        "aten::masked_select.default",
        "aten::bincount.default",
        "aten::split.Tensor",
        "aten::embedding_dense_backward.default",
    ):
        bad.call(name, "not a tensor", outputs=0)
        with pytest.raises(errors.InvalidArgument):
            bad.sync()
        bad.call(name, outputs=0)
        with pytest.raises(errors.InvalidArgument):
            bad.sync()


def test_ints_for_dtype_layout_or_device_are_refused(served: DaemonHandle, bad: Session) -> None:
    """The dispatcher takes dtype/layout/memory_format as ints: `ones([2], dtype=-1)` segfaulted the daemon."""
    h = Handle(bad.upload(torch.ones(2)))
    cases: list[tuple[str, list[Any], dict[str, tensor_pb2.Arg]]] = [
        ("aten::ones.default", [[2]], {"dtype": tensor_pb2.Arg(i=-1)}),
        ("aten::sum.dim_IntList", [h, [0]], {"dtype": tensor_pb2.Arg(i=-1)}),
        ("aten::_to_copy.default", [h], {"dtype": tensor_pb2.Arg(i=1000)}),
        ("aten::empty.memory_format", [[2]], {"layout": tensor_pb2.Arg(i=7)}),
        ("aten::empty.memory_format", [[2]], {"memory_format": tensor_pb2.Arg(i=9)}),
        ("aten::_foreach_powsum.Scalar", [[h], 2, -1], {}),  # a positional dtype
    ]
    for name, args, kwargs in cases:
        bad.op(name, [bad._encode(a) for a in args], kwargs, [bad.new_handle()])
        with pytest.raises(errors.InvalidArgument, match="must be a"):
            bad.sync()
    assert served.process is not None and served.process.poll() is None
    [ok] = bad.call("aten::ones.default", [2], dtype=torch.float64)
    assert bad.download(ok).dtype == torch.float64


def test_foreach_lists_of_different_lengths_are_refused(served: DaemonHandle, bad: Session) -> None:
    """`_foreach_copy_` with a shorter `self` than `src` aborted the daemon; with a longer one it read past
    the end of `src`."""
    a, b = Handle(bad.upload(torch.ones(2))), Handle(bad.upload(torch.zeros(2)))
    for dst, src in (([a], [b, b, b]), ([a, a, a], [b])):
        bad.call("aten::_foreach_copy_.default", dst, src, outputs=0)
        with pytest.raises(errors.InvalidArgument, match="different lengths"):
            bad.sync()
    assert served.process is not None and served.process.poll() is None
    bad.call("aten::_foreach_copy_.default", [a], [b], outputs=0)
    assert torch.equal(bad.download(a), torch.zeros(2))


@pytest.mark.parametrize(
    "name",
    [  # each crashed a process (SIGSEGV or SIGFPE) with small random arguments in a schema-driven hunt
        "aten::_batch_norm_impl_index_backward.default",
        "aten::_ctc_loss_backward.out",
        "aten::_dyn_quant_matmul_4bit.default",
        "aten::_new_zeros_with_same_feature_meta.out",
        "aten::_nnpack_spatial_convolution.default",
        "aten::_remove_batch_dim.default",
        "aten::_reshape_alias_copy.out",
        "aten::_thnn_differentiable_gru_cell_backward.default",
    ],
)
def test_kernels_found_crashing_are_not_served(bad: Session, name: str) -> None:
    bad.call(name, Handle(bad.upload(torch.ones(2))), outputs=0)
    with pytest.raises(errors.InvalidArgument, match="not supported"):
        bad.sync()


def test_fractional_max_pool_backward_indices_are_checked(served: DaemonHandle, bad: Session) -> None:
    """Its CPU kernel scatters through `indices` unchecked: out-of-range ones segfaulted the daemon."""
    grad = Handle(bad.upload(torch.ones(1, 1, 2, 2)))
    image = Handle(bad.upload(torch.zeros(1, 1, 4, 4)))
    for indices, output_size in (
        (torch.full((1, 1, 2, 2), 10**6), [2, 2]),
        (torch.full((1, 1, 2, 2), -5), [2, 2]),
        (torch.zeros(1, 1, 2, 2, dtype=torch.long), [3, 3]),
    ):
        bad.call(
            "aten::fractional_max_pool2d_backward.default",
            grad,
            image,
            [2, 2],
            output_size,
            Handle(bad.upload(indices)),
        )
        with pytest.raises(errors.InvalidArgument):
            bad.sync()
    assert served.process is not None and served.process.poll() is None
    idx = torch.tensor([[[[0, 3], [12, 15]]]])
    [g] = bad.call("aten::fractional_max_pool2d_backward.default", grad, image, [2, 2], [2, 2], Handle(bad.upload(idx)))
    expected = torch.ops.aten.fractional_max_pool2d_backward(
        torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 4, 4), [2, 2], [2, 2], idx
    )
    assert torch.equal(bad.download(g), expected)


def test_out_ops_that_grow_their_output_keep_their_results(bad: Session) -> None:
    """Zeroing the bytes a resize adds must not touch out= ops, which grow their output and then write it."""
    [out] = bad.call("aten::empty.memory_format", [0], dtype=torch.int64)
    bad.call("aten::arange.start_out", 0, 6, outputs=[0], out=out)
    assert bad.download(out).tolist() == [0, 1, 2, 3, 4, 5]


def test_unread_replies_are_bounded_for_the_whole_host(daemon_factory: Any) -> None:
    """Each non-reading client parks ~4 MiB (its own limit); the host's limit (10 MiB) ends the one that would
    take the host past it with RESOURCE_EXHAUSTED, while the parked ones and a reading neighbour carry on."""
    from support import Healthy

    d = daemon_factory(  # (operator_tls: Status shows the test every session)
        fake_gpu_memory=256 * MiB, outbox_bytes=4 * MiB, max_unread_bytes=10 * MiB, tls=operator_tls()
    )
    neighbour = Healthy(d.address, d.token(tenant="neighbour", quota_bytes=16 * MiB))
    hogs = []

    def hog(tenant: str) -> tuple[grpc.Channel, str, Any]:
        channel, sid, (base, stream) = _raw_stream(d, d.token(tenant=tenant, quota_bytes=16 * MiB))
        x = base + 1
        meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_UINT8, shape=[4 * MiB])
        up = device_pb2.Upload(handle=x, meta=meta, data=b"\7" * (4 * MiB), last=True)
        gets = [device_pb2.Command(get=device_pb2.Get(request_id=i, handle=x)) for i in range(1, 21)]
        frames = [device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()]
        frames.append(device_pb2.ClientFrame(commands=gets).SerializeToString())
        release = threading.Event()
        hogs.append(release)

        def gen() -> Iterator[bytes]:
            yield from frames
            release.wait(60)

        call = stream(gen(), metadata=(("gpupool-session", sid),), timeout=120)  # not read (yet)
        return channel, sid, call

    def unread_sessions() -> set[str]:
        return {s.session_id for s in status(d).sessions}

    first, second = hog("hog-a"), hog("hog-b")
    held: list[int] = []
    deadline = time.monotonic() + 20
    while d.running.daemon.session_list() and time.monotonic() < deadline:
        held = [s.outbox_bytes for s in d.running.daemon.session_list() if s.tenant.startswith("hog")]
        if len(held) == 2 and min(held) >= 4 * MiB:
            break
        time.sleep(0.1)
    assert len(held) == 2 and min(held) >= 4 * MiB, held  # both parked at their own limit, within the host's
    third = hog("hog-c")
    with pytest.raises(grpc.RpcError) as info:
        next(third[2])  # its replies were dropped: the stream ends with the status at once
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-unread-bytes" in info.value.details() and "10485760" in info.value.details()
    assert public_session_id(third[1]) not in unread_sessions()
    neighbour.check()  # a session that reads its replies is never the one
    for _channel, sid, call in (first, second):  # the parked ones keep their replies, in order
        assert public_session_id(sid) in unread_sessions()
        reply = next(call)
        assert reply.request_id == 1 and reply.chunk.meta.shape == [4 * MiB]
        call.cancel()
    for release in hogs:
        release.set()
    for channel, _, _ in (first, second, third):
        channel.close()


def _backward_cases(s: Session) -> Iterator[tuple[str, list[Any], dict[str, Any]]]:
    """Round 32's backward overloads with arguments their CPU kernels trust (found by fuzzing them directly: each
    case segfaulted, corrupted the heap, or read heap bytes past its grad_output into the result)."""

    def up(t: torch.Tensor) -> Handle:
        return Handle(s.upload(t))

    def expanded(shape: list[int]) -> Handle:
        [h] = s.call("aten::expand.default", up(torch.ones(1)), shape)
        return Handle(h)

    # adaptive average pooling's backward walks grad_output's planes into grad_input's (input's shape): more
    # planes in grad_output wrote past grad_input (SIGSEGV, "free(): corrupted unsorted chunks").
    for op, dims in (("aten::_adaptive_avg_pool2d_backward", 2), ("aten::_adaptive_avg_pool3d_backward", 3)):
        small, big = [1, 1] + [2] * dims, [1, 64] + [4] * dims
        yield f"{op}.default", [up(torch.ones(big)), up(torch.ones(small))], {}
        yield f"{op}.default", [up(torch.ones([64, 1] + [4] * dims)), up(torch.ones(small))], {}
        yield f"{op}.default", [up(torch.ones([1, 1] + [4] * dims)), up(torch.ones(big))], {}
    # the antialiased backward walked 1/scale input pixels per output pixel: 1e-9 held the thread for 40 s
    yield "aten::_upsample_bilinear2d_aa_backward.default", [up(torch.ones(1, 1, 8, 8)), [8, 8], [1, 1, 8, 8],
                                                             False, 1e-12, None], {}  # fmt: skip
    # grid_sampler backwards read grad_output at grid's positions: a smaller grad_output was read past its end
    # (heap bytes in grad_input); an infinite grid with reflection padding indexed anywhere (SIGSEGV).
    grid2, grid3 = torch.zeros(1, 16, 16, 2), torch.zeros(1, 8, 8, 8, 3)
    yield "aten::grid_sampler_2d_backward.default", [up(torch.ones(1, 1, 1, 1)), up(torch.ones(1, 1, 8, 8)),
                                                     up(grid2), 0, 0, False, [True, True]], {}  # fmt: skip
    yield "aten::grid_sampler_3d_backward.default", [up(torch.ones(1, 1, 1, 1, 1)), up(torch.ones(1, 1, 4, 4, 4)),
                                                     up(grid3), 0, 0, False, [True, True]], {}  # fmt: skip
    for value, align in ((float("inf"), False), (float("nan"), False), (float("inf"), True)):
        yield "aten::grid_sampler_2d_backward.default", [up(torch.ones(1, 1, 4, 4)), up(torch.ones(1, 1, 8, 8)),
                                                         up(torch.full((1, 4, 4, 2), value)), 0, 2, align,
                                                         [True, True]], {}  # fmt: skip
    # out= forms with an expanded (stride 0) grad_input: the kernel wrote its whole result through one element.
    yield "aten::avg_pool3d_backward.grad_input", [up(torch.ones(1, 1, 4, 4, 4)), up(torch.ones(1, 1, 8, 8, 8)),
                                                   [2, 2, 2], [2, 2, 2], [0, 0, 0], False, True, None], \
        {"grad_input": expanded([1, 1, 8, 8, 8])}  # fmt: skip
    yield "aten::replication_pad2d_backward.grad_input", [up(torch.ones(1, 1, 6, 6)), up(torch.ones(1, 1, 4, 4)),
                                                          [1, 1, 1, 1]], \
        {"grad_input": expanded([1, 1, 4, 4])}  # fmt: skip
    yield "aten::avg_pool3d.out", [up(torch.ones(1, 1, 8, 8, 8)), [2, 2, 2], [2, 2, 2], [0, 0, 0], False, True,
                                   None], {"out": expanded([1, 1, 4, 4, 4])}  # fmt: skip
    yield "aten::upsample_bicubic2d_backward.grad_input", [up(torch.ones(1, 1, 16, 16)), [16, 16], [1, 1, 8, 8],
                                                           False, None, None], \
        {"grad_input": expanded([1, 1, 8, 8])}  # fmt: skip


def test_backward_kernels_that_trust_their_arguments_are_checked(served: DaemonHandle, bad: Session) -> None:
    for name, args, kwargs in list(_backward_cases(bad)):
        bad.call(name, *args, outputs=0 if "grad_input" in kwargs or "out" in kwargs else 1, **kwargs)
        with pytest.raises((errors.InvalidArgument, errors.PermissionDenied)):
            bad.sync()
        assert served.process is not None and served.process.poll() is None, name
    usable(bad)
    # what autograd sends still runs, with torch's results
    g, x = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 7, 7)
    [r] = bad.call("aten::_adaptive_avg_pool2d_backward.default", Handle(bad.upload(g)), Handle(bad.upload(x)))
    assert torch.equal(bad.download(r), torch.ops.aten._adaptive_avg_pool2d_backward(g, x))
    grid = torch.rand(2, 5, 5, 2) * 2 - 1
    want = torch.ops.aten.grid_sampler_2d_backward(torch.ones(2, 3, 5, 5), x, grid, 0, 2, False, [True, True])
    got = bad.call("aten::grid_sampler_2d_backward.default", Handle(bad.upload(torch.ones(2, 3, 5, 5))),
                   Handle(bad.upload(x)), Handle(bad.upload(grid)), 0, 2, False, [True, True], outputs=2)  # fmt: skip
    for h, w in zip(got, want, strict=True):
        assert torch.equal(bad.download(h), w)
    image = torch.randn(1, 2, 9, 7)  # interpolate's own scales pass: out = floor(in * scale)
    small = torch.nn.functional.interpolate(image, scale_factor=(0.37, 0.61), mode="bilinear", antialias=True)
    g, sizes = torch.ones_like(small), (list(small.shape[2:]), list(image.shape), False, 0.37, 0.61)
    [r] = bad.call("aten::_upsample_bilinear2d_aa_backward.default", Handle(bad.upload(g)), *sizes)
    assert torch.equal(bad.download(r), torch.ops.aten._upsample_bilinear2d_aa_backward(g, *sizes))


def test_weight_norm_kernels_get_one_norm_per_slice(served: DaemonHandle, bad: Session) -> None:
    """weight_norm's fused CPU kernel reads g (and the backward's saved norms) at each of v's rows or columns
    unchecked: a 1-element g beside a 4-row v read 3 floats past g's storage (round 40, when `_weight_norm_interface`
    joined the allowlist for `nn.utils.weight_norm`). Such calls are refused; an expanded g is read as torch means it
    (a contiguous copy), and what autograd sends gives torch's results."""

    def up(t: torch.Tensor) -> Handle:
        return Handle(bad.upload(t))

    v, g = torch.randn(4, 3), torch.rand(4, 1) + 0.5
    w, norms = torch.ops.aten._weight_norm_interface(v, g, 0)
    grad = torch.randn(4, 3)
    forward, backward = "aten::_weight_norm_interface.default", "aten::_weight_norm_interface_backward.default"
    for name, args in (
        (forward, [up(v), up(torch.ones(1)), 0]),
        (forward, [up(v), up(torch.ones(3, 1)), 0]),  # the last dim's count for dim 0
        (forward, [up(v), up(torch.ones(4, 1)), 1]),
        (backward, [up(grad), up(v), up(g), up(torch.ones(1)), 0]),  # saved norms of one row
        (backward, [up(torch.ones(1, 1)), up(v), up(g), up(norms), 0]),  # a grad_w smaller than v
    ):
        bad.call(name, *args, outputs=2)
        with pytest.raises(errors.InvalidArgument, match="does not fit v"):
            bad.sync()
        assert served.process is not None and served.process.poll() is None, name
    usable(bad)
    [e] = bad.call("aten::expand.default", up(g[:1]), [4, 1])
    # an expanded g: read through its strides (locally torch's kernel reads g[:1]'s storage as 4 values: g's rows)
    got = bad.call(forward, up(v), Handle(e), 0, outputs=2)
    expanded = g[:1].expand(4, 1).contiguous()
    for h, want in zip(got, torch.ops.aten._weight_norm_interface(v, expanded, 0), strict=True):
        assert torch.equal(bad.download(h), want)
    for h, want in zip(bad.call(forward, up(v), up(g), 0, outputs=2), (w, norms), strict=True):
        assert torch.equal(bad.download(h), want)
    got = bad.call(backward, up(grad), up(v), up(g), up(norms), 0, outputs=2)
    for h, want in zip(got, torch.ops.aten._weight_norm_interface_backward(grad, v, g, norms, 0), strict=True):
        assert torch.equal(bad.download(h), want)


def test_weight_norm_kernels_refuse_an_empty_slice_count(served: DaemonHandle, bad: Session) -> None:
    """weight_norm's fused CPU kernel divides v's element count by its size along `dim` (rows for dim 0, columns for
    the last) in int64: a v with no rows or no columns (`[0, 3]`, `[3, 0]`, `[0]`) raised SIGFPE and killed the
    session's worker (round 40 review). Such calls are refused; a v with rows of no elements (`[4, 0]` for dim 0)
    divides by 4 and still runs, with torch's results."""

    def up(t: torch.Tensor) -> Handle:
        return Handle(bad.upload(t))

    forward, backward = "aten::_weight_norm_interface.default", "aten::_weight_norm_interface_backward.default"
    for shape, dim in (([0, 3], 0), ([3, 0], 1), ([0], 0), ([3, 2, 0], 2)):
        v, n = torch.zeros(shape), shape[dim]
        g = torch.ones(n)
        for name, args in ((forward, [up(v), up(g), dim]), (backward, [up(v), up(v), up(g), up(g), dim])):
            bad.call(name, *args, outputs=2)
            with pytest.raises(errors.InvalidArgument, match="no slice along dim"):
                bad.sync()
            assert served.process is not None and served.process.poll() is None, (name, shape)
            usable(bad)
    v, g = torch.zeros(4, 0), torch.ones(4, 1)
    for h, want in zip(
        bad.call(forward, up(v), up(g), 0, outputs=2), torch.ops.aten._weight_norm_interface(v, g, 0), strict=True
    ):
        assert torch.equal(bad.download(h), want)
