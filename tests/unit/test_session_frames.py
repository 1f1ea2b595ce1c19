"""The session writes eager-op commands into its frames by hand: the bytes must be exactly protobuf's."""

from __future__ import annotations

import pytest
import torch
from gpupool.client.session import eager_command, upload_command

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2


def test_eager_command_is_what_protobuf_writes() -> None:
    for n in [*range(0, 140), 255, 256, 16383, 16384, 70000]:
        record = bytes(i % 251 for i in range(n))
        frame = device_pb2.ClientFrame()
        frame.commands.add(eager_op=record)
        assert eager_command(record) == frame.SerializeToString(), n


def test_a_frame_is_the_concatenation_of_its_parts_in_order() -> None:
    """What Session.flush sends when eager ops and other commands interleave parses as the same commands, in order."""
    free = device_pb2.ClientFrame(commands=[device_pb2.Command(free=device_pb2.Free(handles=[3, 4]))])
    seed = device_pb2.ClientFrame(commands=[device_pb2.Command(seed=device_pb2.Seed(seed=7))])
    raw = free.SerializeToString() + eager_command(b"ab") + seed.SerializeToString() + eager_command(b"c" * 300)
    parsed = device_pb2.ClientFrame.FromString(raw)
    assert [c.WhichOneof("cmd") for c in parsed.commands] == ["free", "eager_op", "seed", "eager_op"]
    assert parsed.commands[1].eager_op == b"ab" and parsed.commands[3].eager_op == b"c" * 300
    assert list(parsed.commands[0].free.handles) == [3, 4] and parsed.commands[2].seed.seed == 7


@pytest.mark.parametrize(
    "shape,dtype",
    [((16, 32), torch.float32), ((16,), torch.int64), ((), torch.float64), ((0, 5), torch.float16),
     ((3, 1, 200), torch.bool), ((1,), torch.uint8), ((70, 300), torch.bfloat16)],
)  # fmt: skip
def test_upload_command_is_what_protobuf_writes(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    t = torch.zeros(shape, dtype=dtype)
    data = bytes(wire.host_bytes(t)) if t.numel() else b""
    for handle in (1, 127, 128, (1 << 32) + 5, (1 << 63) + 1):
        meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(dtype), shape=list(t.shape), stride=list(t.stride()))
        frame = device_pb2.ClientFrame()
        frame.commands.add(upload=device_pb2.Upload(handle=handle, meta=meta, data=data, last=True))
        ours = upload_command(handle, wire.dtype_to_proto(dtype), t.shape, t.stride(), data)
        assert ours == frame.SerializeToString(), (shape, dtype, handle)


def test_upload_command_with_negative_and_zero_values_parses_back() -> None:
    """Strides protobuf would write as 10-byte varints, a dtype of 0 (left out): parsed back to the same values."""
    raw = upload_command(9, 0, [2, 3], [-1, 0], b"xy")
    up = device_pb2.ClientFrame.FromString(raw).commands[0].upload
    assert (up.handle, up.meta.dtype, list(up.meta.shape), list(up.meta.stride)) == (9, 0, [2, 3], [-1, 0])
    assert up.data == b"xy" and up.last and up.offset == 0
    frame = device_pb2.ClientFrame()
    frame.commands.add(upload=device_pb2.Upload(handle=9, meta=tensor_pb2.TensorMeta(shape=[2, 3], stride=[-1, 0]),
                                                data=b"xy", last=True))  # fmt: skip
    assert raw == frame.SerializeToString()
