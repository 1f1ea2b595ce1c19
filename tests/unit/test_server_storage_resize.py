"""server/storage_resize.py on a session of each device kind, through `CommandExecutor.execute`: the count of the
session's and the device's bytes across 0/n cycles, handles resized away refused by the eager path and back with
their storage, its regrown bytes zeroed -- on a fake GPU here, and on a CUDA device (`UntypedStorage.resize_` there is
the caching allocator's `resize_bytes_cuda`, the zeroing a CUDA `zero_`). No GPU was lent when this was written: the
`cuda` case skips here and has never run (bench/real_gpu.sh's `tests` stage runs it)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.server import slices
from gpupool.server.devices import CudaDevice, Device, FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession

from gpupool._proto import device_pb2, tensor_pb2

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BASE = 1 << 32  # session 1's handles
X, V, OUT, W = BASE + 1, BASE + 2, BASE + 3, BASE + 4


def _session(dev: Device) -> tuple[CommandExecutor, WorkerSession]:
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 24)
    return CommandExecutor(slices.SliceLedger()), s


def _run(ex: CommandExecutor, s: WorkerSession, cmd: device_pb2.Command) -> None:
    replies: list[Any] = []
    ex.execute(s, cmd, replies.append)


def _resize(h: int, n: int) -> device_pb2.Command:
    return device_pb2.Command(resize_storage=device_pb2.ResizeStorage(handle=h, nbytes=n))


def _neg(src: int, out: int) -> device_pb2.Command:
    op = device_pb2.Op(name="aten::neg.default", args=[tensor_pb2.Arg(tensor=src)], outputs=[out])
    return device_pb2.Command(op=op)


@pytest.mark.parametrize("kind", ["fake", pytest.param("cuda", marks=cuda)])
def test_cycles_keep_the_count_and_zero_what_comes_back(kind: str) -> None:
    dev: Device = FakeDevice(0, "h", 1 << 30) if kind == "fake" else CudaDevice(0)
    ex, s = _session(dev)
    on = dev.torch_device
    s.bind(X, torch.arange(256.0, device=on))
    s.bind(V, s.tensors[X][16:32])  # a view: the same storage, counted once
    assert s.used == s.memory.used == 1024
    for cycle in range(3):
        if cycle == 2:  # a handle made on the storage since its last resize goes with the others (no stale list)
            s.bind(W, s.tensors[X][:4])
        _run(ex, s, _resize(X, 0))
        assert s.used == s.memory.used == 0 and s.error is None
        assert X not in s.tensors and V not in s.tensors and W not in s.tensors
        _run(ex, s, _neg(V, OUT))  # a resized-away handle: refused, never read
        assert s.error is not None and "resized to 0 bytes" in s.error.message
        s.error = None
        _run(ex, s, _resize(V, 1024))
        assert s.error is None and s.used == s.memory.used == 1024
        assert torch.equal(s.tensors[X].cpu(), torch.zeros(256))  # the allocator's old bytes never show
        assert s.tensors[V].untyped_storage()._cdata == s.tensors[X].untyped_storage()._cdata
        s.tensors[X].fill_(5.0)
    _run(ex, s, _neg(V, OUT))
    assert s.error is None and torch.equal(s.tensors[OUT].cpu(), torch.full((16,), -5.0))
    s.free([X, V, OUT, W])
    assert s.used == s.memory.used == 0


def test_a_failed_ops_outputs_hold_no_resized_away_storage() -> None:
    """Round 37 (fin37): an op that failed on a resized-away handle poisoned its output (and recorded the session's
    error) with the handle's own entry, its tensor too: the storage then lived on under a handle neither the
    session's count nor the resize index saw. The copies hold nothing; the count keeps what the index holds."""
    dev = FakeDevice(0, "h", 1 << 30)
    ex, s = _session(dev)
    s.bind(X, torch.ones(1024))
    s.bind(W, s.tensors[X][:0])  # an empty view: stays live at 0 bytes
    _run(ex, s, _resize(X, 0))
    _run(ex, s, _neg(X, OUT))
    assert s.error is not None and "resized to 0 bytes" in s.error.message
    assert getattr(s.error, "tensor", None) is None and getattr(s.poisoned[OUT], "tensor", None) is None
    s.error = None
    _run(ex, s, _resize(W, 1024))  # through the empty view, to a size X does not fit: X stays resized away
    assert s.error is None and s.used == 1024
    s.free([W])
    assert s.used == 1024  # X still holds the storage: counted
    _run(ex, s, _resize(X, 4096))
    assert s.error is None and s.used == 4096 and torch.equal(s.tensors[X], torch.zeros(1024))
    s.free([X, OUT])
    assert s.used == s.memory.used == 0
