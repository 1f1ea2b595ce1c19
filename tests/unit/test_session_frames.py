"""The session writes eager-op commands into its frames by hand: the bytes must be exactly protobuf's."""

from __future__ import annotations

from typing import Any

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


def test_batching_keeps_every_command_in_order_and_frames_within_the_command_bound() -> None:
    """Eager records, small uploads and protobuf commands interleaved in every pattern: the frames a session hands
    to gRPC hold exactly the commands queued, in order, none more than MAX_BATCH_COMMANDS (the eager path counts
    its frame without reading the protobuf part, which must then be empty)."""
    import random

    from gpupool.client.session import MAX_BATCH_COMMANDS, Session

    s = Session.__new__(Session)  # the batching state only: no channel, frames stay in the send queue
    s._dead = None
    s._side = None
    s._init_frames()
    rng = random.Random(5)
    sent: list[tuple[str, Any]] = []
    frames: list[Any] = []
    # long runs of eager records after each other kind (they fill frames), then a random mix
    kinds = [k for other in ("seed", "upload", "op", "free") for k in [other] + ["eager"] * 300]
    kinds += [rng.choice(["eager"] * 6 + ["upload", "seed", "op", "free", "flush"]) for _ in range(3000)]
    for i, kind in enumerate(kinds):
        while not s._send.empty():  # what gRPC's sending thread would take (a full queue blocks the caller)
            frames.append(_take(s))
        if kind == "eager":
            s.eager_op(b"r%d" % i)
            sent.append(("eager_op", b"r%d" % i))
        elif kind == "upload":
            s.upload(torch.full((2,), float(i)), handle=i + 1)
            sent.append(("upload", i + 1))
        elif kind == "seed":
            s.seed(i)
            sent.append(("seed", i))
        elif kind == "op":
            s.op("aten::neg", [tensor_pb2.Arg(tensor=i)], {}, [i + 1])
            sent.append(("op", i))
        elif kind == "free":
            s.free([i])
            sent.append(("free", i))
        else:
            s.flush()
    s.flush()
    while not s._send.empty():
        frames.append(_take(s))
    got: list[tuple[str, Any]] = []
    for frame in frames:
        parsed = device_pb2.ClientFrame.FromString(frame) if isinstance(frame, bytes) else frame
        assert 0 < len(parsed.commands) <= MAX_BATCH_COMMANDS
        for c in parsed.commands:
            which = c.WhichOneof("cmd")
            got.append((which, _identity(c)))
    assert got == sent


def _take(s: Any) -> Any:
    """The next queued frame, as the session's sending thread takes and writes it."""
    frame, n = s._send.get()
    s.bytes_sent += n
    return frame


def _identity(c: device_pb2.Command) -> Any:
    """What `test_batching_...` records of each command it queues."""
    which = c.WhichOneof("cmd")
    if which == "eager_op":
        return c.eager_op
    if which == "upload":
        return c.upload.handle
    if which == "seed":
        return c.seed.seed
    if which == "op":
        return c.op.args[0].tensor
    return c.free.handles[0]


def test_send_commands_waits_for_a_full_send_queue_and_keeps_the_order() -> None:
    """`Session.send_commands` (a client's own finished frames) after the session's queued commands, with the shim's
    back-pressure: while SEND_QUEUE_FRAMES frames wait for gRPC it blocks; when one goes, it goes."""
    import threading

    from gpupool.client.session import SEND_QUEUE_FRAMES, Session

    s = Session.__new__(Session)  # the batching state only: no channel, frames stay in the send queue
    s._dead = None
    s._side = None
    s._init_frames()
    s.seed(1)  # queued by the session: goes out first
    s.send_commands(eager_command(b"a"))
    first = [_take(s) for _ in range(2)]
    parsed = [device_pb2.ClientFrame.FromString(f) if isinstance(f, bytes) else f for f in first]
    assert [p.commands[0].WhichOneof("cmd") for p in parsed] == ["seed", "eager_op"]
    for _ in range(SEND_QUEUE_FRAMES):
        s._send.put((b"", 0))
    done = threading.Event()
    t = threading.Thread(target=lambda: (s.send_commands(eager_command(b"b")), done.set()))
    t.start()
    assert not done.wait(0.2)  # blocked: gRPC has taken none of the frames
    _take(s)
    assert done.wait(5)
    t.join()
    frames = [_take(s) for _ in range(SEND_QUEUE_FRAMES)]
    assert device_pb2.ClientFrame.FromString(frames[-1]).commands[0].eager_op == b"b"
