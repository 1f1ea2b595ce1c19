"""A `Free` command in the native runner (native_runner.cpp `free_handles`, called by `CommandExecutor.execute`) must
do exactly what `WorkerSession.free` does: the same handles unbound, failed handles forgotten, another session's
handle or the reserved one refused at the same point with the same error, storages shared by several handles freed
with their last, the bytes freed counted off the session and the device also when a handle raised, uploads in
progress forgotten. Each case runs the same command on two identical sessions: one through the executor with the
runner, one through `WorkerSession.free`, and compares everything."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.server import slices
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, Poison, WorkerSession
from grpc import StatusCode

from gpupool._proto import device_pb2
from gpupool.errors import GpupoolError

NUMBER = 5
BASE = NUMBER << 32
FOREIGN = ((NUMBER + 1) << 32) + 7


@pytest.fixture
def mod(native_runner_module: Any) -> Any:
    return native_runner_module


def _session() -> WorkerSession:
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("f", NUMBER, dev, DeviceMemory(dev), 1 << 24)
    torch.manual_seed(0)
    base = torch.randn(64)
    for j in range(1, 9):
        s.bind(BASE + j, torch.randn(j + 3))
    s.bind(BASE + 20, base)  # three handles on one storage
    s.bind(BASE + 21, base[8:])
    s.bind(BASE + 22, base.view(8, 8))
    s.poisoned[BASE + 30] = Poison(StatusCode.INTERNAL, "aten::mm", "boom")
    s.bind(BASE + 40, torch.empty(16))
    s.uploads[BASE + 40] = 8  # half uploaded
    s.memory.used = s.used + 1000  # other sessions' bytes too
    return s


def _state(s: WorkerSession) -> tuple[Any, ...]:
    return (sorted(s.tensors), sorted(s.poisoned), dict(s._keys), {k: list(v) for k, v in s._storages.items()},
            s.used, s.memory.used, dict(s.uploads))  # fmt: skip


def _keyed(s: WorkerSession) -> tuple[Any, ...]:
    """`_state` with storage ids replaced by the handles on them (two sessions' storages differ)."""
    keys, storages = s._keys, s._storages
    names = {k: min(h for h, key in keys.items() if key == k) for k in storages}
    return (sorted(s.tensors), sorted(s.poisoned), {h: names[k] for h, k in keys.items()},
            {names[k]: list(v) for k, v in storages.items()}, s.used, s.memory.used, dict(s.uploads))  # fmt: skip


CASES = {
    "plain": [BASE + 1, BASE + 2],
    "unknown own handles and twice the same": [BASE + 3, BASE + 99, BASE + 3, BASE + 1234567],
    "a shared storage, freed with its last handle": [BASE + 20, BASE + 22, BASE + 4, BASE + 21],
    "a shared storage, not all of its handles": [BASE + 21, BASE + 20],
    "a failed handle": [BASE + 30, BASE + 5, BASE + 30],
    "an upload in progress": [BASE + 40, BASE + 6],
    "another session's handle midway": [BASE + 1, BASE + 20, BASE + 21, BASE + 22, FOREIGN, BASE + 2],
    "the reserved handle midway": [BASE + 7, BASE, BASE + 8],
    "handle 0 and the largest": [BASE + 8, 0, (1 << 64) - 1],
    "nothing": [],
    "everything": [*range(BASE, BASE + 50), FOREIGN],
}


@pytest.mark.parametrize("name", CASES)
def test_a_free_in_cpp_does_what_worker_session_free_does(mod: Any, name: str) -> None:
    handles = CASES[name]
    ex = CommandExecutor(slices.SliceLedger())
    assert ex.native is mod
    a, b = _session(), _session()
    assert _keyed(a) == _keyed(b)
    replies: list[Any] = []
    cmd = device_pb2.Command(free=device_pb2.Free(handles=handles))
    calls = []
    real = mod.free
    ex.native = type("Spy", (), {"free": staticmethod(lambda *x: calls.append(1) or real(*x))})()
    ex.execute(a, cmd, replies.append)
    assert calls, "the native free did not run"
    err_a = a.error
    try:
        b.free(list(handles))
        err_b = None
    except Exception as exc:  # as `execute` records it
        err_b = exc
    assert _keyed(a) == _keyed(b)
    assert (err_b is not None) == bool({FOREIGN, BASE, 0, (1 << 64) - 1} & set(handles))
    if err_b is None:
        assert err_a is None
    else:
        assert err_a is not None
        assert isinstance(err_b, GpupoolError)
        want = Poison.of(err_b, err_a.op)
        assert (err_a.code, err_a.message) == (want.code, want.message)


def test_a_free_message_it_does_not_read_is_left_to_python(mod: Any) -> None:
    s = _session()
    before = _state(s)
    bad = [
        b"\x0a\x05\x01\x02",  # a packed field longer than the message
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f",  # a varint past 64 bits
        b"\x08",  # a truncated varint
        b"\x10\x01",  # another field
        b"\x0a\x01\x80",  # a varint cut by its field's end
    ]
    for msg in bad:
        assert mod.free(s, msg) is False
        assert _state(s) == before
    assert mod.free(s, b"") is True
    assert mod.free(s, device_pb2.Free(handles=[BASE + 1]).SerializeToString()) is True
    assert BASE + 1 not in s.tensors


def test_a_session_that_overrides_free_keeps_its_own(mod: Any) -> None:
    freed: list[list[int]] = []

    class Own(WorkerSession):
        def free(self, handles: list[int]) -> None:
            freed.append(handles)
            super().free(handles)

    dev = FakeDevice(0, "h", 1 << 30)
    s = Own("f", NUMBER, dev, DeviceMemory(dev), 1 << 24)
    s.bind(BASE + 1, torch.ones(3))
    CommandExecutor(slices.SliceLedger()).execute(s, device_pb2.Command(free=device_pb2.Free(handles=[BASE + 1])),
                                                  lambda r: None)  # fmt: skip
    assert freed == [[BASE + 1]] and not s.tensors
