"""Round 35 review (rev35) of red34's guards against reading another session's bytes and red35's bool check in
collectives, through real daemons (`--isolation thread`: one process, one allocator, where freed bytes cross)."""

from __future__ import annotations

from typing import Any

import pytest
import test_daemon_red34
import torch
from gpupool.client.session import Handle, Session
from gpupool.server import collectives
from test_daemon_red34 import CANARY, _plant
from test_daemon_red35 import N, agree, forged_pair, send_forged

from gpupool import errors
from gpupool._proto import device_pb2

pair = test_daemon_red34.pair  # a victim and a reader on one `--isolation thread` daemon (a fixture)


def _whole(s: Session, h: int, n: int) -> torch.Tensor:
    """The first n float32 elements of h's storage (`as_strided`: views are checked against their storage)."""
    [whole] = s.call("aten::as_strided.default", Handle(h), [n], [1], 0)
    return s.download(whole)


def test_a_reduced_loss_into_a_live_handle_holds_no_freed_bytes(pair: tuple[Session, Session]) -> None:
    """Round 34 zeroed a new storage outside its tensor's extent in `bind_new`, the path of an op's one new output
    handle; an output handle already live (or a multi-output op's, or an out= op's `set_`) took `bind`, which did
    not: `mse_loss` (mean) into a live handle returned its 0-d loss over the elementwise buffer unzeroed, and a view
    over the whole storage read 29,992 of another session's 30,000 freed floats."""
    n = 30_000
    victim, s = pair
    a = Handle(s.upload(torch.rand(n)))
    b = Handle(s.upload(torch.rand(n)))
    loss = Handle(s.upload(torch.ones(1)))
    for _ in range(4):  # the allocator does not hand the planted blocks back every time
        _plant(victim, n)
        s.call("aten::mse_loss.default", a, b, outputs=[loss])
        got = _whole(s, loss, n)
        assert not (got == CANARY).any(), f"{int((got == CANARY).sum())} of another session's values read"
        assert torch.equal(got[1:], torch.zeros(n - 1))
    assert torch.equal(s.download(loss), torch.nn.functional.mse_loss(s.download(a), s.download(b)))


def test_a_gappy_empty_strided_holds_no_freed_bytes_between_its_elements(pair: tuple[Session, Session]) -> None:
    """Bytes inside a tensor's extent that no element covers (`empty_strided((2n, 3), (6, 2))`: three gaps a row)
    are zeroed with the rest of an uninitialized factory's storage (red34 left this unmeasured): none of another
    session's freed values, nor any nonzero byte, is read through `as_strided` over the whole storage."""
    victim, s = pair
    for rows in (2, 20_000):
        reach = 6 * (rows - 1) + 5
        _plant(victim, reach)
        [t] = s.call("aten::empty_strided.default", [rows, 3], [6, 2], dtype=torch.float32)
        assert not _whole(s, t, reach).any()


@pytest.mark.parametrize("transport", ["secure", "gloo"])
@pytest.mark.parametrize("kind", ["allgather", "reduce_scatter"])
def test_a_forged_rank_writes_no_bool_bytes_in_allgather_or_reduce_scatter(
    daemon_factory: Any, transport: str, kind: str
) -> None:
    """red35 tried broadcast and allreduce; the other kinds that write bool outputs, with the forged rank's bytes
    sent as uint8 (gloo checks no dtype, only sizes). The secure transport refuses them (INVALID_ARGUMENT); gloo's
    own copy out of its flat buffer and its max stores 1 for any nonzero byte: either way no output holds another."""
    with forged_pair(daemon_factory, "thread", transport) as (s, forged):
        n_out, n_in, op = (2, N, "") if kind == "allgather" else (1, 2 * N, "max")
        outs = [Handle(s.upload(torch.zeros(N, dtype=torch.bool))) for _ in range(n_out)]
        inp = Handle(s.upload(torch.zeros(n_in, dtype=torch.bool)))
        call = device_pb2.Collective(kind=kind, tensors=outs, inputs=[inp], reduce_op=op)
        s.command(device_pb2.Command(collective=call))
        s.flush()
        g = forged()
        sig = [collectives.KINDS.index(kind), collectives._OPS.index(op), 0, n_out, 1, n_out * N, n_in]
        extra = agree(g, [*sig, collectives._DTYPES[torch.bool]])
        send_forged(g, kind, torch.full((n_in,), 7, dtype=torch.uint8), extra)
        try:
            s.sync()
        except errors.InvalidArgument as e:
            assert transport == "secure" and "bool bytes other than 0 and 1" in str(e)
        else:
            assert transport == "gloo"
            got = [s.download(o).view(torch.uint8) for o in outs]
            assert max(int(x.max()) for x in got) == 1  # the forged rank's bytes arrived, as 1
        if isinstance(g.pg, collectives.seclink.SecureGroup):
            g.pg.close()


def test_unique_consecutive_holds_no_freed_bytes_past_its_result(pair: tuple[Session, Session]) -> None:
    """A multi-output op's new storages took `bind` too: torch's CPU `unique_consecutive` writes its unique values
    into a buffer of the input's size and shrinks the result (`resize_` keeps the storage), the rest never written;
    under `--isolation thread` a view over the whole storage read another session's freed floats."""
    n = 30_000
    victim, s = pair
    x = Handle(s.upload(torch.zeros(n)))
    for _ in range(4):  # the allocator does not hand the planted blocks back every time
        _plant(victim, n)
        [values, _, counts] = s.call("aten::unique_consecutive.default", x, True, True, outputs=3)
        got = _whole(s, values, n)
        assert not (got == CANARY).any(), f"{int((got == CANARY).sum())} of another session's values read"
        assert torch.equal(s.download(counts), torch.tensor([n]))
