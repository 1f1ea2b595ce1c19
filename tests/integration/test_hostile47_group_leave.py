"""Round 47 red team (hostile47): dp46's GroupLeave (Command field 72) with hostile numbers, repeated, in the same
frame as collectives on the subgroup it names, interleaved with the peer's collectives. Two ranks of one lease on a
daemon run in this process (--isolation thread, the secure transport)."""

from __future__ import annotations

import time

import pytest
import torch
from gpupool.client.session import Session
from test_collectives import TIMEOUT, collective, join_all
from test_subgroups import _join, _leave, _on, _two_ranks

from gpupool._proto import device_pb2
from gpupool.errors import FailedPrecondition, GpupoolError, InvalidArgument, Unavailable


def _leave_cmd(number: int) -> device_pb2.Command:
    return device_pb2.Command(group_leave=device_pb2.GroupLeave(subgroup=number))


def _coll(number: int, handle: int) -> device_pb2.Command:
    return device_pb2.Command(
        collective=device_pb2.Collective(kind="allreduce", tensors=[handle], subgroup=number, reduce_op="sum")
    )


def _one_frame(s: Session, *cmds: device_pb2.Command) -> None:
    for cmd in cmds:
        s.command(cmd)  # (batched: one frame at the flush)
    s.flush()


def test_hostile_leaves_between_and_beside_a_peers_collectives(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """Rank 1 leaves 0, numbers it never joined (7, 2^31, 2^32 - 1) and a live subgroup twice, between rank 0's
    allreduces on the group and on another subgroup: each leave refused (INVALID_ARGUMENT / FAILED_PRECONDITION) but
    the first of the live one, every allreduce of rank 0 right. A frame of [allreduce on N, leave N] runs the
    allreduce with the peer, then leaves; a frame of [leave M, allreduce on M] refuses the allreduce (never joined,
    FAILED_PRECONDITION) and the peer's allreduce on M fails within the join's timeout (UNAVAILABLE), the group going
    on after. Pins behaviour that holds on 41939607."""
    sessions, toks = _two_ranks(daemon_factory, "secure")
    s0, s1 = sessions
    try:
        join_all(sessions, toks)
        for number in (3, 4, 5, 6):
            for s in sessions:
                _join(s, number, [0, 1])

        def both(number: int, k: float) -> None:  # an allreduce of both ranks on `number` (0: the group)
            hs = [s.upload(torch.tensor([k * (r + 1)])) for r, s in enumerate(sessions)]
            for s, h in zip(sessions, hs, strict=True):
                if number:
                    _on(s, number, "allreduce", [h], reduce_op="sum")
                else:
                    collective(s, "allreduce", [h], op="sum")
            assert [s.download(h).tolist() for s, h in zip(sessions, hs, strict=True)] == [[3.0 * k]] * 2

        hostile: list[tuple[int, type[GpupoolError], str]] = [
            (0, InvalidArgument, "the session's own group ends with the session"),
            (7, FailedPrecondition, "never joined or left already"),
            (1 << 31, FailedPrecondition, "never joined or left already"),
            ((1 << 32) - 1, FailedPrecondition, "never joined or left already"),
        ]
        for i, (number, error, words) in enumerate(hostile * 2):
            with pytest.raises(error, match=words):
                _leave(s1, number)
            both(0, 1.0 + i)
            both(3, 2.0 + i)
        _leave(s1, 4)
        with pytest.raises(FailedPrecondition, match="never joined or left already"):
            _leave(s1, 4)
        both(3, 20.0)

        # [allreduce on 5, leave 5] in one frame: the allreduce runs with rank 0's, then the leave
        h0, h1 = s0.upload(torch.tensor([1.0])), s1.upload(torch.tensor([2.0]))
        _on(s0, 5, "allreduce", [h0], reduce_op="sum")
        _one_frame(s1, _coll(5, h1), _leave_cmd(5))
        s1.sync()
        assert s0.download(h0).tolist() == [3.0] and s1.download(h1).tolist() == [3.0]
        with pytest.raises(FailedPrecondition, match="never joined or left already"):
            _leave(s1, 5)

        # [leave 6, allreduce on 6] in one frame: rank 1's allreduce refused, rank 0's fails within the timeout
        h0, h1 = s0.upload(torch.tensor([1.0])), s1.upload(torch.tensor([2.0]))
        started = time.monotonic()
        _on(s0, 6, "allreduce", [h0], reduce_op="sum")
        _one_frame(s1, _leave_cmd(6), _coll(6, h1))
        with pytest.raises(FailedPrecondition, match="subgroup 6, which this session never joined"):
            s1.sync()
        with pytest.raises(Unavailable):
            s0.sync()
        assert time.monotonic() - started < TIMEOUT + 5
        both(0, 30.0)
        both(3, 31.0)
    finally:
        for s in sessions:
            s.close()
