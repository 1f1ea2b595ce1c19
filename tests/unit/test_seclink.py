"""server/seclink.py on real socket pairs: frames round-trip, every frame has its own nonce, an altered,
replayed or oversized frame is refused before its bytes are used, the keys bind both ranks, the lease and
the generation, and a handshake without the group's secret is refused on both ends."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from gpupool.server import seclink
from gpupool.server.seclink import Channel, LinkError
from support import TcpRelay, shut

from gpupool.errors import ResourceExhausted
from gpupool.peers import push_out
from gpupool.protocol import COLLECTIVE_PORTS

SECRET = b"s" * 64
GEN = bytes(16)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection (what the links are)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def pair() -> tuple[Channel, Channel, socket.socket, socket.socket]:
    a, b = tcp_pair()
    k1, k2 = os.urandom(32), os.urandom(32)
    return Channel(a, 1, k1, k2), Channel(b, 0, k2, k1), a, b


def later(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def sent_frames(payloads: list[bytes]) -> list[bytes]:
    """What a Channel puts on the wire for each message (one frame each: they are small)."""
    ca, _, a, b = pair()
    out = []
    for p in payloads:
        ca.send(memoryview(p), later())
        (length,) = struct.unpack("!I", b.recv(4))
        body = b""
        while len(body) < length:
            body += b.recv(length - len(body))
        out.append(struct.pack("!I", length) + body)
    a.close()
    b.close()
    return out


def test_messages_round_trip_in_frames_of_bounded_size() -> None:
    ca, cb, _, _ = pair()
    big = os.urandom(2 * seclink.MAX_FRAME + 123)  # three frames
    got = bytearray(len(big))
    t = threading.Thread(target=ca.send, args=(memoryview(big), later()))
    t.start()
    cb.recv_into(memoryview(got), later())
    t.join()
    assert bytes(got) == big
    empty = memoryview(bytearray())
    ca.send(empty, later())  # an empty message is still a frame: a barrier really waits for it
    cb.recv_into(empty, later())
    cb.send(memoryview(b"back"), later())
    back = bytearray(4)
    ca.recv_into(memoryview(back), later())
    assert bytes(back) == b"back"


def test_each_frame_has_its_own_nonce() -> None:
    one, two = sent_frames([b"same plaintext!!", b"same plaintext!!"])
    assert one[:4] == two[:4] and one[4:] != two[4:]  # a reused (key, nonce) would encrypt them alike


@pytest.mark.parametrize("where", [4, 10, -1], ids=["first-byte", "middle", "tag"])
def test_an_altered_frame_fails_authentication(where: int) -> None:
    ca, cb, a, b = pair()
    ca.send(memoryview(b"0123456789abcdef"), later())
    frame = bytearray(b.recv(4 + 16 + 16))
    frame[where] ^= 0x01
    a2, b2 = tcp_pair()  # feed the altered bytes to the receiving channel
    cb.sock = b2
    a2.sendall(frame)
    with pytest.raises(LinkError, match="failed authentication"):
        cb.recv_into(memoryview(bytearray(16)), later())


def test_a_replayed_frame_fails_authentication() -> None:
    ca, cb, a, b = pair()
    for msg in (b"first message!!!", b"second message!!"):
        ca.send(memoryview(msg), later())
    first = b.recv(4 + 32)
    b.recv(4 + 32)
    a2, b2 = tcp_pair()
    cb.sock = b2
    a2.sendall(first + first)  # the first frame again where the second was due
    out = bytearray(16)
    cb.recv_into(memoryview(out), later())
    assert bytes(out) == b"first message!!!"
    with pytest.raises(LinkError, match="failed authentication"):
        cb.recv_into(memoryview(out), later())
    assert bytes(out) == b"first message!!!"  # nothing of the refused frame was written


def test_lengths_from_the_peer_are_bounded() -> None:
    _, cb, a, _ = pair()
    a.sendall(struct.pack("!I", 0xFFFFFFF0))  # a 4 GiB frame: refused before anything is allocated or read
    with pytest.raises(LinkError, match="frame of 4294967280 bytes where 32 were due"):
        cb.recv_into(memoryview(bytearray(16)), later())


def test_a_silent_peer_times_out_and_a_closed_one_is_named() -> None:
    _, cb, a, _ = pair()
    start = time.monotonic()
    with pytest.raises(LinkError, match="rank 0 did not answer within the group's timeout"):
        cb.recv_into(memoryview(bytearray(8)), later(0.3))
    assert time.monotonic() - start < 10.0  # by its 0.3 s deadline, with a busy machine's room (was 2 s)
    a.close()
    with pytest.raises(LinkError, match="rank 0 closed the link"):
        cb.recv_into(memoryview(bytearray(8)), later())


def test_keys_bind_ranks_lease_generation_size_and_nonces() -> None:
    nc, ns = os.urandom(32), os.urandom(32)
    base = seclink.connection_keys(SECRET, nc, ns, "lease", GEN, 3, 1, 0)
    variants = [
        seclink.connection_keys(SECRET, nc, ns, "lease", GEN, 3, 2, 0),  # another rank
        seclink.connection_keys(SECRET, nc, ns, "lease", GEN, 4, 1, 0),  # another size
        seclink.connection_keys(SECRET, nc, ns, "other", GEN, 3, 1, 0),  # another lease
        seclink.connection_keys(SECRET, nc, ns, "lease", b"\1" * 16, 3, 1, 0),  # another generation
        seclink.connection_keys(SECRET, ns, nc, "lease", GEN, 3, 1, 0),  # other nonces
        seclink.connection_keys(b"t" * 64, nc, ns, "lease", GEN, 3, 1, 0),  # another secret
    ]
    assert len(set(base)) == 4  # each direction and each MAC its own key
    for v in variants:
        assert not set(v) & set(base)


def handshake(hub_secret: bytes, rank_secret: bytes, rank: int = 1) -> tuple[object, object]:
    """Run both ends of a handshake on a socket pair; each result is a Channel or the exception raised."""
    a, b = tcp_pair()
    results: dict[str, object] = {}

    def hub() -> None:
        try:
            results["hub"] = seclink._accept(b, hub_secret, "lease", GEN, 3, later(2))
        except (LinkError, OSError) as exc:
            results["hub"] = exc
        b.close()

    t = threading.Thread(target=hub)
    t.start()
    try:
        results["rank"] = seclink._connect(a, rank_secret, "lease", GEN, 3, rank, later(2))
    except (LinkError, OSError) as exc:
        results["rank"] = exc
    a.close()
    t.join()
    return results["hub"], results["rank"]


def test_handshake_authenticates_both_ends() -> None:
    hub, rank = handshake(SECRET, SECRET)
    assert isinstance(hub, Channel) and isinstance(rank, Channel) and hub.peer == 1 and rank.peer == 0
    hub, rank = handshake(SECRET, b"x" * 64)  # a connector without the secret
    assert isinstance(rank, LinkError) and "does not hold the group's keys" in str(rank)
    assert isinstance(hub, LinkError | OSError)
    hub, rank = handshake(b"x" * 64, SECRET)  # a hub without it
    assert isinstance(rank, LinkError) and "rank 0's end" in str(rank)
    hub, rank = handshake(SECRET, SECRET, rank=3)  # not a rank of a group of 3
    assert isinstance(hub, LinkError) and "not a collective link" in str(hub)


def test_a_forged_proof_is_refused_by_the_hub() -> None:
    a, b = tcp_pair()
    a.sendall(seclink.HELLO.pack(seclink.MAGIC, 1, os.urandom(32)))
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(_try_accept(b)))
    t.start()
    assert len(a.recv(seclink.HUB_HELLO_BYTES, socket.MSG_WAITALL)) == seclink.HUB_HELLO_BYTES
    a.sendall(os.urandom(32))
    t.join()
    assert isinstance(out[0], LinkError) and "claiming rank 1 does not hold the group's keys" in str(out[0])


def _try_accept(sock: socket.socket) -> object:
    try:
        return seclink._accept(sock, SECRET, "lease", GEN, 3, later(2))
    except LinkError as exc:
        return exc


def test_gcm_is_what_protects_the_frames() -> None:
    """The frame format is AES-256-GCM with the length as associated data: a frame sealed by hand decrypts."""
    key = os.urandom(32)
    a, b = tcp_pair()
    ch = Channel(b, 1, os.urandom(32), key)
    body = AESGCM(key).encrypt((0).to_bytes(12, "big"), b"hello", struct.pack("!I", 5 + 16))
    a.sendall(struct.pack("!I", len(body)) + body)
    out = bytearray(5)
    ch.recv_into(memoryview(out), later())
    assert bytes(out) == b"hello"


class DictStore:
    """The two calls `seclink.form` makes of the group's store."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.values[key] = value.encode()

    def get(self, key: str) -> bytes:
        return self.values[key]


def in_range_listener() -> socket.socket:
    """A loopback listener on a free port of the default --collective-ports (a rank connects to no hub port outside)."""
    return seclink.bind_in(COLLECTIVE_PORTS, lambda port: socket.create_server(("127.0.0.1", port)))


def test_a_rank_connects_to_no_hub_port_outside_its_collective_ports() -> None:
    """The hub's address comes from the group's store (signed, but any rank 0 of the lease writes it): a rank dials
    no port outside its daemon's --collective-ports, the only ports its worker may reach under Landlock (round 42;
    on ca5fb68 it connected wherever the store said: here the daemon's own port stands outside the range)."""
    with socket.create_server(("127.0.0.1", 0)) as outside:
        port = outside.getsockname()[1]
        assert not seclink.in_range(port, COLLECTIVE_PORTS)  # (a port the kernel picked: above 32767)
        outside.settimeout(0.5)
        store = DictStore()
        store.set(seclink.HUB_KEY, f"{GEN.hex()} 127.0.0.1 {port}")
        with pytest.raises(LinkError, match="outside this daemon's --collective-ports"):
            seclink.form(store, SECRET, "lease", 1, 3, 5.0, "127.0.0.1", ports=COLLECTIVE_PORTS)
        with pytest.raises(TimeoutError):
            outside.accept()  # never dialled


def test_a_hub_listens_on_a_free_port_of_the_range() -> None:
    """`bind_in` skips the ports of the range in use and says RESOURCE_EXHAUSTED once all are."""
    low, high = COLLECTIVE_PORTS
    taken = seclink.bind_in(COLLECTIVE_PORTS, _listen)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ResourceExhausted, match=f"every port of this daemon's --collective-ports {port}-{port}"):
            seclink.bind_in((port, port), _listen)
        for _ in range(20):  # from a random port of a range that holds `port` on: never `port`
            with seclink.bind_in((port, high) if port < high else (low, port), _listen) as other:
                assert other.getsockname()[1] != port
    finally:
        taken.close()


def _listen(port: int) -> socket.socket:
    return socket.create_server(("127.0.0.1", port))


def test_a_rank_the_hub_drops_before_answering_connects_again() -> None:
    """The hub pushes out the oldest handshakes when strangers crowd it; the rank whose link was dropped before
    the hub's hello came back connects again (here the first two connections are hung up on, then served)."""
    listener = in_range_listener()
    store = DictStore()
    store.set(seclink.HUB_KEY, f"{GEN.hex()} 127.0.0.1 {listener.getsockname()[1]}")
    served: list[object] = []

    def hub() -> None:
        for _ in range(2):
            listener.accept()[0].close()
        sock, _ = listener.accept()
        served.append(_try_accept(sock))

    t = threading.Thread(target=hub)
    t.start()
    group = seclink.form(store, SECRET, "lease", 1, 3, 5.0, "127.0.0.1")
    t.join()
    listener.close()
    assert isinstance(served[0], Channel) and served[0].peer == 1 and set(group.channels) == {0}
    group.close()
    served[0].close()


def test_a_hub_without_the_keys_is_not_retried() -> None:
    """Only a link dropped before the hub answered is tried again: a hub that answers without the group's keys
    ends the rank's join at once."""
    listener = in_range_listener()
    store = DictStore()
    store.set(seclink.HUB_KEY, f"{GEN.hex()} 127.0.0.1 {listener.getsockname()[1]}")
    accepted: list[socket.socket] = []

    def hub() -> None:
        sock, _ = listener.accept()
        accepted.append(sock)
        try:
            seclink._accept(sock, b"x" * 64, "lease", GEN, 3, later(2))
        except (LinkError, OSError):
            pass

    t = threading.Thread(target=hub)
    t.start()
    with pytest.raises(LinkError, match="rank 0's end of the link does not hold"):
        seclink.form(store, SECRET, "lease", 1, 3, 5.0, "127.0.0.1")
    t.join()
    listener.close()
    assert len(accepted) == 1
    accepted[0].close()


def star(size: int) -> list[seclink.SecureGroup]:
    """A SecureGroup per rank over loopback channel pairs around rank 0 (what `form` builds, without the handshake)."""
    hub: dict[int, Channel] = {}
    groups = []
    buffers = seclink.Buffers()
    for r in range(1, size):
        a, b = tcp_pair()
        k1, k2 = os.urandom(32), os.urandom(32)
        hub[r] = Channel(a, r, k1, k2, buffers)
        groups.append(seclink.SecureGroup(r, size, 10.0, {0: Channel(b, 0, k2, k1)}))
    return [seclink.SecureGroup(0, size, 10.0, hub), *groups]


@pytest.mark.parametrize("numel", [1, 5000, seclink.MAX_FRAME // 4, 2 * seclink.MAX_FRAME // 4 + 7])
def test_allreduce_sums_in_rank_order_and_streams_only_past_one_frame(numel: int, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Round 36: a rank's tensor of one frame is sent and then its result read in the collective's own thread (no
    sending thread per call, `_send_while`); past one frame it still streams from one. Either way every rank gets
    ((t0 + t1) + t2) bit for bit."""
    import torch
    import torch.distributed as dist

    streamed: list[int] = []
    plain = seclink._send_while

    def counted(channel: Channel, *args: object) -> None:
        streamed.append(channel.peer)
        plain(channel, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(seclink, "_send_while", counted)
    gen = torch.Generator().manual_seed(numel)
    values = [torch.randn(numel, generator=gen) for _ in range(3)]
    tensors = [v.clone() for v in values]
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.SUM  # type: ignore[assignment]
    groups = star(3)
    with ThreadPoolExecutor(3) as pool:  # each rank in a thread of its own; .result() raises a rank's failure
        for done in [pool.submit(g.allreduce, [t], opts) for g, t in zip(groups, tensors, strict=True)]:
            done.result(timeout=30)
    want = (values[0] + values[1]) + values[2]
    for t in tensors:
        assert torch.equal(t, want)
    assert streamed == ([] if numel * 4 <= seclink.MAX_FRAME else [0, 0])
    for g in groups:
        g.close()


class HeldStore(DictStore):
    """The group's store as `form` uses it from many ranks: `get` waits for its key (as the signed store does)."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = threading.Condition()

    def set(self, key: str, value: str) -> None:
        with self.changed:
            super().set(key, value)
            self.changed.notify_all()

    def get(self, key: str) -> bytes:
        with self.changed:
            assert self.changed.wait_for(lambda: key in self.values, timeout=60), key
            return self.values[key]


def form_all(store: DictStore, ranks: list[int], size: int, timeout: float = 60.0) -> list[seclink.SecureGroup]:
    """`seclink.form` of `ranks` of a group of `size` on loopback, each in a thread of its own (a failure raised)."""
    with ThreadPoolExecutor(len(ranks)) as pool:
        joins = [pool.submit(seclink.form, store, SECRET, "lease", r, size, timeout, "127.0.0.1") for r in ranks]
        return [j.result(timeout=2 * timeout) for j in joins]


def test_32_ranks_of_one_host_form_past_a_strangers_flood_and_sum(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Round 55: a hub took at most 8 handshakes from one address, and the 9th pushed out the oldest, which could be
    a rank between the hub's hello and its proof: that rank never knew, and the group failed at its timeout (32
    ranks of one process mostly did, 12 often). The hub's per-source cap now grows to the ranks it expects
    (`_caps`), so ranks of one host (16 GPUs, or 4 ranks a GPU) never push each other out; a stranger flooding
    hellos from one other address still pushes out only its own connections, and the group sums."""
    import torch
    import torch.distributed as dist

    pushed: list[str] = []  # the source of every connection the hub pushed out

    def spy(sources: list[str], new: str, per_source: int, total: int) -> tuple[int, bool] | None:
        out = push_out(sources, new, per_source, total)
        if out is not None:
            pushed.append(sources[out[0]])
        return out

    monkeypatch.setattr(seclink, "push_out", spy)
    store, size = HeldStore(), 32
    stop, opened = threading.Event(), [0]

    def flood() -> None:  # fresh hellos claiming rank 1 (without the keys), from 127.0.0.2, as fast as it can
        address = store.get(seclink.HUB_KEY).decode().split()
        held: list[socket.socket] = []
        while not stop.is_set():
            try:
                s = socket.create_connection((address[1], int(address[2])), timeout=1, source_address=("127.0.0.2", 0))
                s.sendall(seclink.HELLO.pack(seclink.MAGIC, 1, os.urandom(32)))
            except OSError:
                continue
            opened[0] += 1
            held.append(s)
            while len(held) > 2 * seclink.MAX_GROWN_PER_SOURCE:
                held.pop(0).close()
        for s in held:
            s.close()

    flooding = threading.Thread(target=flood)
    flooding.start()
    try:
        with ThreadPoolExecutor(1) as pool:
            hub = pool.submit(seclink.form, store, SECRET, "lease", 0, size, 60.0, "127.0.0.1")
            deadline = later(60)
            while opened[0] <= seclink.MAX_GROWN_PER_SOURCE:  # the ranks dial once the flood is past its cap
                assert time.monotonic() < deadline and not hub.done()
                time.sleep(0.01)
            others = form_all(store, list(range(1, size)), size)
            groups = [hub.result(timeout=120), *others]
    finally:
        stop.set()
        flooding.join()
    assert "127.0.0.1" not in pushed  # the flood's own connections only, never a rank's
    values = [torch.full((3,), float(r)) for r in range(size)]
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.SUM  # type: ignore[assignment]
    with ThreadPoolExecutor(size) as pool:
        for done in [pool.submit(g.allreduce, [v], opts) for g, v in zip(groups, values, strict=True)]:
            done.result(timeout=60)
    assert all(v.tolist() == [float(sum(range(size)))] * 3 for v in values)
    for g in groups:
        g.close()


def test_a_rank_pushed_out_between_the_hubs_hello_and_its_proof_dials_again(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Round 55: the handshake's last message was the rank's proof, so a rank whose link the hub pushed out after its
    hello (9 connections from its address) believed itself in while the hub waited for it until the group's timeout.
    Now the hub's WELCOME ends the handshake: the rank sees its link closed before it and dials again. A relay holds
    rank 1's proof until 8 connections from its address pushed its link out, then lets the next one through."""
    import torch
    import torch.distributed as dist

    for name in ("HELLO_SECONDS", "HANDSHAKE_SECONDS"):  # the relay's steps, however slow, are not a late hello
        monkeypatch.setattr(seclink, name, 60.0)
    strangers: list[socket.socket] = []

    class Relay(TcpRelay):  # connection 0: rank 1's proof held until the hub pushed its link out, then closed
        def _relay(self, down: socket.socket, up: socket.socket, n: int) -> None:
            if n > 0:
                return super()._relay(down, up, n)
            for sock in (down, up):
                sock.settimeout(60)
            up.sendall(down.recv(seclink.HELLO_BYTES, socket.MSG_WAITALL))
            down.sendall(up.recv(seclink.HUB_HELLO_BYTES, socket.MSG_WAITALL))
            proof = down.recv(seclink.CONFIRM_BYTES, socket.MSG_WAITALL)
            strangers.extend(socket.create_connection(self.upstream) for _ in range(seclink.MAX_PENDING_PER_SOURCE))
            with contextlib.suppress(ConnectionResetError):
                assert up.recv(1) == b""  # the hub pushed this link out, its proof not yet read
            with contextlib.suppress(OSError):
                up.sendall(proof)
            shut(up, down)  # what rank 1 sees of the push-out

    relays: list[Relay] = []

    class Rewriting(HeldStore):  # rank 1 reads the relay's port where the hub published its own
        def set(self, key: str, value: str) -> None:
            generation, host, port = value.split()
            relays.append(Relay((host, int(port)), ports=COLLECTIVE_PORTS))
            super().set(key, f"{generation} {host} {relays[0].port}")

    store = Rewriting()
    try:
        groups = form_all(store, [0, 1], 2, timeout=30.0)
        values = [torch.tensor([1.5, 2.0]), torch.tensor([0.25, -4.0])]
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM  # type: ignore[assignment]
        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(g.allreduce, [v], opts) for g, v in zip(groups, values, strict=True)]:
                done.result(timeout=60)
        assert [v.tolist() for v in values] == [[1.75, -2.0]] * 2 and relays[0].connections == 2
        for g in groups:
            g.close()
    finally:
        for sock in [*strangers, *relays]:
            sock.close()
