"""`Session.send_commands`, the hand-off of a client that encodes its own frames (the C++ client in spike/), against a
live daemon, its frames on the stream and on the side socket: the bytes compute what the same commands queued one by
one compute, in order after what the session queued itself; a daemon error on one of them surfaces at the next sync
with the daemon's type and message, and the session goes on; bad bytes are refused before they leave; a closed
session refuses with its reason."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpupool.client.session import Session, eager_command, upload_command

from gpupool import compact, errors, wire
from gpupool._proto import device_pb2


@pytest.fixture(params=["stream", "side"])
def session(request: Any, daemon_factory: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Session]:
    """A session whose frames travel on its gRPC stream, or on its side socket (round 26: what the C++ client's
    frames take where the daemon has a side port)."""
    side = request.param == "side"
    daemon = daemon_factory(bulk_listen="127.0.0.1:0") if side else daemon_factory()
    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "1")
    with Session.attach(daemon.address, daemon.token(tenant="handoff")) as s:
        assert (s._carrier is not None) == side
        yield s


def rec(op_id: int, name: str | None, outputs: list[int], args: list[bytes]) -> bytes:
    return b"".join([compact.head(op_id, name, outputs), compact.U8.pack(len(args)), *args, b"\x00"])


def up(handle: int, t: torch.Tensor) -> bytes:
    return upload_command(handle, wire.dtype_to_proto(t.dtype), t.shape, t.stride(), bytes(wire.host_bytes(t)))


def test_commands_compute_in_order_after_what_the_session_queued(session: Session) -> None:
    a = session.upload(torch.arange(6.0))  # queued by the session itself: it must reach the daemon first
    b, total, c = session.new_handle(), session.new_handle(), session.new_handle()
    frame = b"".join(
        [
            up(b, torch.full((6,), 2.0)),
            eager_command(rec(0, "aten::mul.Tensor", [total], [compact.tensor(a), compact.tensor(b)])),
            eager_command(rec(0, None, [c], [compact.tensor(total), compact.tensor(total)])),  # by id only
            device_pb2.ClientFrame(
                commands=[device_pb2.Command(free=device_pb2.Free(handles=[b]))]
            ).SerializeToString(),
        ]
    )
    session.send_commands(frame)
    session.send_commands(eager_command(rec(1, "aten::neg", [b], [compact.tensor(c)])))  # b: freed, reusable
    assert session.sync() == []
    assert torch.equal(session.download(c), (torch.arange(6.0) * 2) ** 2)
    assert torch.equal(session.download(b), -((torch.arange(6.0) * 2) ** 2))


def test_a_daemon_error_surfaces_at_the_next_sync_and_the_session_goes_on(session: Session) -> None:
    a = session.upload(torch.ones(3))
    bad, good = session.new_handle(), session.new_handle()
    target = session.upload(torch.tensor([0, 99, 1]))
    args = [compact.tensor(a), compact.tensor(target), compact.encode_value(None), compact.encode_value(1),
            compact.encode_value(-100)]  # fmt: skip
    session.send_commands(eager_command(rec(0, "aten::nll_loss_forward", [bad, session.new_handle()], args)))
    session.send_commands(eager_command(rec(1, "aten::neg", [good], [compact.tensor(a)])))  # no error of its own
    with pytest.raises(errors.GpupoolError) as info:
        session.sync()
    assert type(info.value) is errors.InvalidArgument
    assert str(info.value).startswith("aten::nll_loss_forward: ") and info.value.op == "aten::nll_loss_forward"
    assert session.sync() == []  # reported once
    assert torch.equal(session.download(good), -torch.ones(3))  # the session goes on
    session.send_commands(eager_command(rec(1, None, [bad], [compact.tensor(good)])))
    assert torch.equal(session.download(bad), torch.ones(3))


@pytest.mark.parametrize(
    ("raw", "match"),
    [(b"", "do not start"), (b"\x12\x00", "do not start"), ("text", "takes bytes")],
)
def test_what_cannot_be_a_frame_is_refused_before_it_leaves(session: Session, raw: Any, match: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=match):
        session.send_commands(raw)
    a = session.upload(torch.ones(2))
    assert torch.equal(session.download(a), torch.ones(2))  # nothing was sent: the stream is intact


def test_a_frame_over_the_message_limit_is_refused(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpupool.client import session as session_mod

    monkeypatch.setattr(session_mod, "MAX_FRAME_BYTES", 64)
    with pytest.raises(errors.InvalidArgument, match="at most 64"):
        session.send_commands(eager_command(b"x" * 70))


def test_a_closed_session_refuses_with_its_reason(daemon: Any) -> None:
    s = Session.attach(daemon.address, daemon.token(tenant="closed"))
    s.close()
    with pytest.raises((errors.Unavailable, errors.FailedPrecondition), match="closed"):  # ours, or the daemon's
        s.send_commands(eager_command(b"\x00"))
