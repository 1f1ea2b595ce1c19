"""The daemon's side of a round trip: the fast Sync's liveness probe (server/worker.py) and the reply path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from gpupool.server import worker


def _wait_quiet(fd: int) -> None:
    deadline = time.monotonic() + 10
    while not worker._quiet_stat(fd):
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSEGV"])
def test_a_held_stat_file_follows_its_process_to_the_end(sig: str) -> None:
    """ProcessRunner.idle reads the worker's /proc stat file through one fd held open: each read is fresh (a
    stopped, then woken, then killed process reads as such), and once the process is reaped the fd fails with
    OSError (idle() then says no) instead of reading whichever process reuses the pid."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fd = os.open(f"/proc/{p.pid}/stat", os.O_RDONLY)
    try:
        _wait_quiet(fd)
        os.kill(p.pid, signal.SIGSTOP)
        time.sleep(0.05)
        assert not worker._quiet_stat(fd)
        os.kill(p.pid, signal.SIGCONT)
        _wait_quiet(fd)
        os.kill(p.pid, getattr(signal, sig))
        for _ in range(20):
            assert not worker._quiet_stat(fd)
            time.sleep(0.002)
        p.wait()
        with pytest.raises(OSError):
            worker._quiet_stat(fd)
    finally:
        os.close(fd)
        if p.poll() is None:
            p.kill()
            p.wait()


def _session_state() -> worker._SessionState:
    """A session's tensors and executor as its worker holds them (on a fake device), in this process."""
    device = {"index": 0, "uuid": "u", "model": "fake", "memory_bytes": 1 << 30, "fake": True}
    return worker._SessionState(worker.WorkerSpec("s", 1, device, 1 << 30, 1000, 0, 0, 1, "", False))


def test_sync_replies_carry_each_scalar_kind_and_errors() -> None:
    """A Sync's answer, as a session's worker builds it (executor `_sync`, through `slices.run_commands` on a real
    session): each scalar kind keeps its type and value, a Sync without scalars still answers with a SyncReply, a
    handle that is no scalar fails the Sync alone, and an error that waits is reported once."""
    import torch
    from gpupool.server import slices

    from gpupool import wire
    from gpupool._proto import device_pb2, tensor_pb2

    state = _session_state()
    base = 1 << 32
    values = [torch.tensor(1.5), torch.tensor(-7), torch.tensor(True), torch.tensor(2 - 3j), torch.ones(2)]
    base += 1  # handle 0 of a session is reserved
    ups = []
    for k, t in enumerate(values):
        meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(t.dtype), shape=list(t.shape), stride=list(t.stride()))
        up = device_pb2.Upload(handle=base + k, meta=meta, data=t.numpy().tobytes(), last=True)
        ups.append(device_pb2.Command(upload=up))

    def run(*commands: device_pb2.Command) -> list[device_pb2.ServerFrame]:
        frame = device_pb2.ClientFrame(commands=commands).SerializeToString()
        res = state.run(slices.SliceRequest(1 << 30, 1 << 24, 1.0, frame))
        return [device_pb2.ServerFrame.FromString(r) for r in res.replies]

    def sync(rid: int, *handles: int) -> device_pb2.Command:
        return device_pb2.Command(sync=device_pb2.Sync(request_id=rid, scalar_handles=handles))

    assert run(*ups) == []
    (got,) = run(sync(9, base, base + 1, base + 2, base + 3))
    assert got.request_id == 9 and not got.sync.HasField("error")
    assert [wire.scalar_from_proto(v) for v in got.sync.values] == [1.5, -7, True, 2 - 3j]
    assert [v.WhichOneof("value") for v in got.sync.values] == ["f", "i", "b", "c"]
    (empty,) = run(sync(10))
    assert (
        empty.request_id == 10
        and empty.HasField("sync")
        and empty == device_pb2.ServerFrame(request_id=10, sync=device_pb2.SyncReply())
    )
    (bad,) = run(sync(11, base, base + 4))  # two elements: not a scalar
    assert bad.sync.error.code == "INVALID_ARGUMENT" and "2 elements" in bad.sync.error.message
    assert not bad.sync.values
    (after,) = run(sync(12, base))  # the failed Sync reported its own error: nothing waits now
    assert [wire.scalar_from_proto(v) for v in after.sync.values] == [1.5] and not after.sync.HasField("error")
    missing = device_pb2.Command(op=device_pb2.Op(name="aten::no_such_op", outputs=[base + 20]))
    replies = run(missing, sync(13, base))  # a failed op: the next Sync reports it (and no scalars)
    assert [r.request_id for r in replies] == [13]
    assert replies[0].sync.error.code and not replies[0].sync.values
    (clear,) = run(sync(14, base + 1))
    assert [wire.scalar_from_proto(v) for v in clear.sync.values] == [-7]


def test_a_slice_result_keeps_its_counts_after_the_next_slice() -> None:
    """`slices._result` hands the ledger's error and event counts to the result without copying them: the next
    slice through the same ledger (an in-thread runner's) must not change an earlier result's counts."""
    from gpupool.server import slices
    from grpc import StatusCode

    from gpupool._proto import device_pb2

    state = _session_state()
    bad = device_pb2.Command(op=device_pb2.Op(name="aten::no_such_op", outputs=[(1 << 32) + 3]))
    sync = device_pb2.Command(sync=device_pb2.Sync(request_id=1))

    def run(*commands: device_pb2.Command) -> slices.SliceResult:
        frame = device_pb2.ClientFrame(commands=commands).SerializeToString()
        return state.run(slices.SliceRequest(1 << 30, 1 << 24, 1.0, frame))

    first = run(bad, sync)
    assert first.errors == {StatusCode.INVALID_ARGUMENT: 1}
    second = run(sync)
    assert second.errors == {} and first.errors == {StatusCode.INVALID_ARGUMENT: 1}
