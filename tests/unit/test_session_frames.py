"""The session writes eager-op commands into its frames by hand: the bytes must be exactly protobuf's."""

from __future__ import annotations

from gpupool.client.session import eager_command

from gpupool._proto import device_pb2


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
