"""Each session draws random numbers from its own stream (executor._seeded): the device's default generator holds
the stream of the session that drew last, and is swapped only when another session draws. Sessions of one
process (`--isolation thread`), on one fake GPU or on two (which share the CPU's generator), interleaved, each
get exactly what a local script seeded the same way gets."""

from __future__ import annotations

import torch
from gpupool.server import slices
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession

from gpupool import compact
from gpupool._proto import device_pb2

DROPOUT = "aten::native_dropout.default"


def _dropout(ex: CommandExecutor, s: WorkerSession, x: int, first: bool) -> torch.Tensor:
    out = s.handle_base + 1000 + s.ops
    head = compact.head(1, DROPOUT if first else None, [out, 0])
    args = compact.tensor(x) + compact.encode_value(0.5) + compact.encode_value(True)
    ex.execute(s, device_pb2.Command(eager_op=head + b"\x03" + args + b"\x00"), _no_reply)
    assert s.error is None, s.error
    return s.tensors[out]


def _no_reply(item: object) -> None:
    raise AssertionError("ops are not answered")


def test_interleaved_sessions_each_draw_their_own_seeded_stream() -> None:
    ex = CommandExecutor(slices.SliceLedger())
    devs = [FakeDevice(0, "h", 1 << 30), FakeDevice(1, "h", 1 << 30)]
    sessions = [WorkerSession(f"s{n}", n, devs[n % 2], DeviceMemory(devs[n % 2]), 1 << 28) for n in (1, 2, 3)]
    x = torch.ones(64)
    handles = []
    for s in sessions:
        s.bind(s.handle_base + 1, x.clone())
        handles.append(s.handle_base + 1)
    seeds = {1: 7, 2: 7, 3: None}  # two sessions with the same seed; one never seeded
    for s in sessions:
        if seeds[s.number] is not None:
            ex.execute(s, device_pb2.Command(seed=device_pb2.Seed(seed=seeds[s.number])), _no_reply)
    got: dict[int, list[torch.Tensor]] = {1: [], 2: [], 3: []}
    for k in range(4):
        for s, h in zip(sessions[::-1] if k % 2 else sessions, handles[::-1] if k % 2 else handles, strict=True):
            got[s.number].append(_dropout(ex, s, h, first=k == 0).clone())
        torch.rand(3)  # the process's own draws between ops move no session's stream
    torch.manual_seed(7)
    local = [torch.ops.aten.native_dropout.default(x, 0.5, True)[0] for _ in range(4)]
    for n in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(got[n], local, strict=True)), n
    assert not all(torch.equal(a, b) for a, b in zip(got[3], local, strict=True))
    # Seeding again restarts the stream, also for the session whose stream the generator holds now.
    s1 = sessions[0]
    _dropout(ex, s1, handles[0], first=False)
    ex.execute(s1, device_pb2.Command(seed=device_pb2.Seed(seed=7)), _no_reply)
    assert torch.equal(_dropout(ex, s1, handles[0], first=False), local[0])


def test_a_worker_process_keeps_its_session_stream_in_the_generator() -> None:
    """`exclusive_rng` (a session's own worker process): no state copied per random op, the same numbers, and a
    new seed restarts the stream even while the generator holds it."""
    ex = CommandExecutor(slices.SliceLedger())
    ex.exclusive_rng = True
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    x = torch.ones(64)
    s.bind(s.handle_base + 1, x.clone())
    ex.execute(s, device_pb2.Command(seed=device_pb2.Seed(seed=11)), _no_reply)
    got = [_dropout(ex, s, s.handle_base + 1, first=k == 0).clone() for k in range(3)]
    torch.manual_seed(11)
    local = [torch.ops.aten.native_dropout.default(x, 0.5, True)[0] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(got, local, strict=True))
    ex.execute(s, device_pb2.Command(seed=device_pb2.Seed(seed=11)), _no_reply)
    assert torch.equal(_dropout(ex, s, s.handle_base + 1, first=False), local[0])
