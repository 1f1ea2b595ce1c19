"""Rank-to-rank links of a secure group (round 44, server/seclink.py `Links`), for send/recv in a group of three or
more: the lower rank listens on a port of its block and admits the ranks it expects only, proving the group's keys;
the higher rank dials no port outside the range; a transfer's header is checked before a byte is written. Until round
44 there were no such links (b647913 has no `Links`: every test here fails there at its import)."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import pytest
import torch
from gpupool.server import seclink
from gpupool.server.seclink import LinkError, Links, Transfer
from test_seclink import SECRET, DictStore

from gpupool.errors import InvalidArgument
from gpupool.protocol import COLLECTIVE_PORTS


class WaitingStore(DictStore):
    """A store whose `get` waits for its key, as the group's signed store does."""

    def get(self, key: str) -> bytes:
        deadline = time.monotonic() + 5
        while key not in self.values:
            assert time.monotonic() < deadline, key
            time.sleep(0.01)
        return self.values[key]


def groups(store: Any, ranks: list[int], size: int = 3) -> dict[int, seclink.SecureGroup]:
    out = {}
    for r in ranks:
        g = seclink.SecureGroup(r, size, 5.0, {})
        g.links = Links(store, SECRET, "lease", r, size, "127.0.0.1", None, COLLECTIVE_PORTS, COLLECTIVE_PORTS)
        out[r] = g
    return out


def both(*calls: Any) -> list[BaseException | None]:
    """Run the calls at once; what each raised (None: nothing)."""
    errors: list[BaseException | None] = [None] * len(calls)

    def one(i: int) -> None:
        try:
            calls[i]()
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return errors


def test_a_link_forms_between_ranks_1_and_2_past_strangers_and_carries_a_transfer() -> None:
    store = WaitingStore()
    g = groups(store, [1, 2])
    seen: list[bytes] = []

    def strangers() -> None:  # at rank 1's listener once it is published: a hello of rank 0, then rank 2 without keys
        raw = WaitingStore.get(store, f"{seclink.P2P_KEY}/1/2").decode().split()
        for claim in (0, 2):
            with socket.create_connection((raw[1], int(raw[2])), timeout=5) as s:
                s.sendall(seclink.HELLO.pack(seclink.MAGIC, claim, os.urandom(32)))
                reply = s.recv(seclink.HUB_HELLO_BYTES)
                if reply:
                    s.sendall(os.urandom(seclink.CONFIRM_BYTES))  # a proof without the keys
                    reply += s.recv(1)
                seen.append(reply)

    x, y = torch.arange(5.0), torch.zeros(5)
    code = 0  # float32's number in signatures (collectives._DTYPES)

    def rank_2_after_strangers() -> None:
        strangers()
        g[2].p2p([Transfer(1, 3, False, y, code, None)])

    assert both(lambda: g[1].p2p([Transfer(2, 3, True, x, code, None)]), rank_2_after_strangers) == [None, None]
    assert torch.equal(y, x)
    assert seen[0] == b""  # rank 0 is no rank this listener expects: closed at its hello
    assert len(seen[1]) == seclink.HUB_HELLO_BYTES  # rank 2 was answered, then closed at its proof: no byte after
    assert set(g[1].links.channels) == {2} and set(g[2].links.channels) == {1}  # type: ignore[union-attr]
    # a receive of another size fails the receiver before a byte is written; the link stays in step
    z = torch.full((4,), 9.0)
    errors = both(
        lambda: g[1].p2p([Transfer(2, 0, True, x, code, None)]),
        lambda: g[2].p2p([Transfer(1, 0, False, z, code, None)]),
    )
    assert errors[0] is None and isinstance(errors[1], InvalidArgument), errors
    assert "rank 1 sends 5 elements" in str(errors[1]) and z.tolist() == [9.0] * 4
    assert both(
        lambda: g[1].p2p([Transfer(2, 0, True, x * 2, code, None)]),
        lambda: g[2].p2p([Transfer(1, 0, False, y, code, None)]),
    ) == [None, None]
    assert torch.equal(y, x * 2)
    for group in g.values():
        group.close()


def test_a_rank_dials_no_link_port_outside_its_collective_ports() -> None:
    with socket.create_server(("127.0.0.1", 0)) as outside:
        port = outside.getsockname()[1]
        assert not seclink.in_range(port, COLLECTIVE_PORTS)
        outside.settimeout(0.5)
        store = WaitingStore()
        store.set(f"{seclink.P2P_KEY}/0/2", f"{bytes(16).hex()} 127.0.0.1 {port}")
        g = groups(store, [2])[2]
        with pytest.raises(LinkError, match="rank 0 listens on port .* outside this daemon's --collective-ports"):
            g.p2p([Transfer(0, 0, False, torch.zeros(1), 0, None)])
        with pytest.raises(TimeoutError):
            outside.accept()  # never dialled


_DATA = torch.arange(5.0).numpy().tobytes()
_LIES = {  # frames a rank sends on a formed link: (the error its peer's receive raises, whether the link goes on)
    "bytes of other elements": ([seclink._P2P.pack(0, 0, 5, 24), _DATA], LinkError, False),
    "a frame shorter": ([seclink._P2P.pack(0, 0, 5, 20), _DATA[:16]], LinkError, False),
    "a frame longer": ([seclink._P2P.pack(0, 0, 5, 20), _DATA + b"abcd"], LinkError, False),
    "another tag": ([seclink._P2P.pack(77, 0, 5, 20), _DATA], InvalidArgument, True),
    "another dtype": ([seclink._P2P.pack(0, 99, 5, 20), _DATA], InvalidArgument, True),
    "refused, then bytes": ([seclink._P2P.pack(0, 0, -5, 20), _DATA], InvalidArgument, False),
    "2^40 bytes never sent": ([seclink._P2P.pack(0, 0, 6, 1 << 40)], LinkError, False),
}


@pytest.mark.parametrize("lie", sorted(_LIES))
def test_a_peer_that_lies_in_its_header_fails_the_receive_or_the_link_and_writes_nothing(lie: str) -> None:
    """Round 45 (hostile45): a rank that writes its own frames on a formed link (any bytes its keys seal) rather than
    `_p2p_send`'s. A header whose byte count disagrees with its agreed dtype and elements, a frame shorter or longer
    than the header said: the link fails (LinkError) at once. Another tag, another dtype: the receive fails
    (InvalidArgument), the bytes drained, and the link carries the next transfer right. A refusal (-1 elements)
    followed by bytes anyway: the receive fails, and the next transfer finds the link out of step (LinkError). A
    header announcing 2^40 bytes that never come: the group's timeout (1 s here) ends the receive. The receiving
    tensor is never written. Pins behaviour that holds on f47ac67."""
    frames, raised, goes_on = _LIES[lie]
    g = groups(WaitingStore(), [1, 2])
    for group in g.values():
        group.timeout = 1.0
    x, y, z = torch.arange(5.0), torch.zeros(5), torch.full((5,), 9.0)
    assert both(
        lambda: g[1].p2p([Transfer(2, 3, True, x, 0, None)]), lambda: g[2].p2p([Transfer(1, 3, False, y, 0, None)])
    ) == [None, None]
    channel = g[1].links.channels[2]  # type: ignore[union-attr]

    def send(deadline: float) -> None:
        for f in frames:
            channel.send_frame(memoryview(f), deadline)

    # (`both` waits 10 s for each call: a receive still waiting then reads as None here)
    errors = both(lambda: g[1]._guard(send), lambda: g[2].p2p([Transfer(1, 0, False, z, 0, None)]))
    assert errors[0] is None and isinstance(errors[1], raised), errors
    assert z.tolist() == [9.0] * 5
    if raised is InvalidArgument:
        after = both(
            lambda: g[1].p2p([Transfer(2, 1, True, x * 2, 0, None)]),
            lambda: g[2].p2p([Transfer(1, 1, False, y, 0, None)]),
        )
        assert after == [None, None] if goes_on else isinstance(after[1], LinkError), after
        assert torch.equal(y, x * 2) is goes_on
    for group in g.values():
        group.close()
