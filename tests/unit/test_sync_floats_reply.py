"""`protocol.sync_floats_reply`, the hand-built answer of an `.item()` of a float (server/executor.py `_sync`): the
exact bytes protobuf writes for the same ServerFrame, for every request id size and every double (zeros, NaN's
payload, infinities, subnormals), and what a session's worker answers through it."""

from __future__ import annotations

import math
import random
import struct

import pytest

from gpupool import protocol
from gpupool._proto import device_pb2

IDS = [0, 1, 127, 128, 300, 16383, 16384, 2**32, 2**63 - 1, 2**64 - 1]
ODD = [0.0, -0.0, 1.0, -1.5, math.inf, -math.inf, math.nan, 5e-324, -2.2250738585072014e-308, 1.7976931348623157e308]


def _protobuf(request_id: int, values: list[float]) -> bytes:
    frame = device_pb2.ServerFrame(request_id=request_id)
    frame.sync.SetInParent()
    for v in values:
        frame.sync.values.add(f=v)
    return frame.SerializeToString()


@pytest.mark.parametrize("request_id", IDS)
def test_the_bytes_are_protobufs(request_id: int) -> None:
    rng = random.Random(request_id)
    cases = [[], *([v] for v in ODD), ODD, [rng.uniform(-1e6, 1e6) for _ in range(12)]]
    cases.append([struct.unpack("<d", rng.randbytes(8))[0] for _ in range(3)])  # any bit pattern, NaN payloads too
    for values in cases:
        got = protocol.sync_floats_reply(request_id, values)
        assert got == _protobuf(request_id, values), (request_id, values)
        back = device_pb2.ServerFrame.FromString(got)
        assert back.request_id == request_id and back.HasField("sync") and not back.sync.HasField("error")
        assert [struct.pack("<d", v.f) for v in back.sync.values] == [struct.pack("<d", v) for v in values]
        assert all(v.WhichOneof("value") == "f" for v in back.sync.values)
    assert protocol.sync_floats_reply(request_id, []) == protocol.sync_reply(request_id)


def test_a_worker_answers_float_scalars_with_them() -> None:
    """Through a session's worker state (executor `_sync` in `slices.run_commands`): one float, several, a float
    beside an int (the message path), each as protobuf writes it."""
    import torch
    from gpupool.server import slices, worker

    from gpupool import wire
    from gpupool._proto import tensor_pb2

    device = {"index": 0, "uuid": "u", "model": "fake", "memory_bytes": 1 << 30, "fake": True}
    state = worker._SessionState(worker.WorkerSpec("s", 1, device, 1 << 30, 1000, 0, 0, 1, "", False))
    base = (1 << 32) + 1
    tensors = [torch.tensor(0.25), torch.tensor(-0.0, dtype=torch.float64), torch.tensor(3)]
    ups = []
    for k, t in enumerate(tensors):
        meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(t.dtype), shape=[], stride=[])
        up = device_pb2.Upload(handle=base + k, meta=meta, data=t.numpy().tobytes(), last=True)
        ups.append(device_pb2.Command(upload=up))

    def run(*commands: device_pb2.Command) -> list[bytes]:
        frame = device_pb2.ClientFrame(commands=commands).SerializeToString()
        return state.run(slices.SliceRequest(1 << 30, 1 << 24, 1.0, frame)).replies  # type: ignore[return-value]

    def sync(rid: int, *handles: int) -> device_pb2.Command:
        return device_pb2.Command(sync=device_pb2.Sync(request_id=rid, scalar_handles=handles))

    assert run(*ups) == []
    assert run(sync(7, base)) == [_protobuf(7, [0.25])]
    assert run(sync(300, base, base + 1)) == [_protobuf(300, [0.25, -0.0])]
    (mixed,) = run(sync(8, base, base + 2))
    got = device_pb2.ServerFrame.FromString(mixed)
    assert [v.WhichOneof("value") for v in got.sync.values] == ["f", "i"] and got.sync.values[1].i == 3
