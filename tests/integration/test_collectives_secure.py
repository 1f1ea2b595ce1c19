"""The secure transport of collectives between real daemons (server/seclink.py, `--collectives secure`, the
default): results equal the local computation bit for bit on 2 and 3 ranks; a man in the middle that alters,
replays or re-labels anything on a link makes the group fail with a clear error, never a wrong result; a
stranger's connection is refused without harming the group; `--collectives gloo` (plaintext) still works.

The man in the middle is a TCP relay in this process. It gets onto the path the way only a holder of the
lease's tokens could (the test has them): it rewrites the hub's signed address in the group's store before
the other ranks read it. On the wire it then does only what any party on the hosts' network can do to a
plaintext TCP connection: read, alter, replay and re-label bytes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from gpupool.client.session import Session
from gpupool.server import collectives, seclink
from gpupool.server.collectives import _SignedStore, group_secret
from support import MiB, TcpRelay, shut
from test_collectives import collective, join_all

from gpupool._proto import device_pb2
from gpupool.protocol import COLLECTIVE_PORTS

TIMEOUT = 4.0
Tamper = Callable[[int, int, bytes], bytes]  # (connection number, frame number, frame) -> frame to forward


def sessions_of(
    daemon_factory: Any, devices: list[int], collectives: str = "secure"
) -> tuple[list[Session], list[str]]:
    """One daemon per host, `devices[i]` fake GPUs on host i; one session per device, all of one lease."""
    lease = uuid.uuid4().hex
    tokens, sessions = [], []
    for i, n in enumerate(devices):
        d = daemon_factory(
            host_id=f"host-{i}",
            fake_gpus=n,
            fake_gpu_memory=64 * MiB,
            worker_network=True,
            collectives=collectives,
            gloo_connect_anywhere=collectives == "gloo",
        )
        for dev in range(n):
            tokens.append(d.token(lease_id=lease, device=dev, network=True))
            sessions.append(Session.attach(d.address, tokens[-1]))
    return sessions, tokens


def group_store(port: int, token0: str) -> Any:
    """The group's signed keys in rank 0's store, as a holder of the lease's tokens sees them."""
    secret = group_secret(token0)  # (hole53) rank 0's store asks for the group's secret first
    key = collectives._front_key(secret)
    store = collectives._connect_store(["127.0.0.1"], port, 2, 10.0, threading.Event(), key=key)
    name = hashlib.sha256(b"gpupool-group-keys:" + secret.encode()).hexdigest()
    return _SignedStore(dist.PrefixStore(f"gpupool/{name}/", store), secret.encode())


def join_rank0(sessions: list[Session], tokens: list[str], timeout: float) -> int:
    h = sessions[0].new_handle()
    join = device_pb2.GroupJoin(rank=0, size=len(sessions), tokens=tokens, port_handle=h, timeout_seconds=timeout)
    sessions[0].command(device_pb2.Command(group_join=join))
    (port,) = sessions[0].sync([h])
    return int(port)


def join_others(sessions: list[Session], tokens: list[str], port: int, timeout: float) -> None:
    for rank, s in enumerate(sessions[1:], 1):
        join = device_pb2.GroupJoin(
            rank=rank, size=len(sessions), tokens=tokens, store_address=f"127.0.0.1:{port}", timeout_seconds=timeout
        )
        s.command(device_pb2.Command(group_join=join))
        s.sync()


class Relay(TcpRelay):
    """A man in the middle between the ranks and the hub: forwards each connection, parsing the handshake's
    fixed-size messages and then the length-prefixed frames, and lets `tamper_*` change any of them."""

    def __init__(
        self,
        upstream: tuple[str, int],
        tamper_up: Tamper | None = None,
        tamper_down: Tamper | None = None,
        hello: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.tamper_up, self.tamper_down, self.hello = tamper_up, tamper_down, hello
        super().__init__(upstream, ports=COLLECTIVE_PORTS)  # a rank dials no hub port outside its daemon's range

    def _relay(self, down: socket.socket, up: socket.socket, n: int) -> None:
        first_up = [(seclink.HELLO_BYTES, self.hello), (seclink.CONFIRM_BYTES, None)]
        first_down = [(seclink.HUB_HELLO_BYTES, None), (seclink.WELCOME_BYTES, None)]
        threading.Thread(target=self._frames, args=(down, up, n, first_up, self.tamper_up), daemon=True).start()
        threading.Thread(target=self._frames, args=(up, down, n, first_down, self.tamper_down), daemon=True).start()

    @staticmethod
    def _frames(src: socket.socket, dst: socket.socket, n: int, first: list[Any], tamper: Tamper | None) -> None:
        try:
            for size, change in first:
                data = _read(src, size)
                dst.sendall(change(data) if change else data)
            frame = 0
            while True:
                header = _read(src, 4)
                data = header + _read(src, struct.unpack("!I", header)[0])
                dst.sendall(tamper(n, frame, data) if tamper else data)
                frame += 1
        except OSError:
            pass
        shut(src, dst)


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def hung_up(sock: socket.socket) -> bool:
    """The other end closed (an orderly close, or a reset where our unread bytes were still in its buffer)."""
    sock.settimeout(5.0)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def join_through_relay(sessions: list[Session], tokens: list[str], timeout: float = TIMEOUT, **tamper: Any) -> Relay:
    port = join_rank0(sessions, tokens, timeout)
    keys = group_store(port, tokens[0])
    generation, host, hub_port = keys.get(seclink.HUB_KEY).decode().split()
    relay = Relay((host, int(hub_port)), **tamper)
    keys.set(seclink.HUB_KEY, f"{generation} 127.0.0.1 {relay.port}")
    keys.get(seclink.HUB_KEY)  # (front54) a set has no reply: in the store before the others read it
    join_others(sessions, tokens, port, timeout)
    return relay


def run_everywhere(sessions: list[Session], kind: str, per_rank: list[tuple[list[int], list[int]]], **kw: Any) -> None:
    for s, (tensors, inputs) in zip(sessions, per_rank, strict=True):
        collective(s, kind, tensors, inputs, **kw)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


LOCAL: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sum": torch.add, "avg": torch.add, "product": torch.mul, "min": torch.minimum, "max": torch.maximum,
}  # fmt: skip


@pytest.mark.parametrize("devices", [[1, 1], [2, 1]], ids=["2-ranks", "3-ranks"])
def test_results_equal_the_local_computation_bit_for_bit(daemon_factory, devices) -> None:  # type: ignore[no-untyped-def]
    sessions, tokens = sessions_of(daemon_factory, devices)
    size = len(sessions)
    join_all(sessions, tokens, timeout=20.0)
    gen = torch.Generator().manual_seed(16)
    # float32 sums depend on their order: the hub reduces in rank order, ((t0 op t1) op t2)
    for op, local in LOCAL.items():
        values = [torch.randn(1001, generator=gen) for _ in range(size)]
        handles = [s.upload(v) for s, v in zip(sessions, values, strict=True)]
        run_everywhere(sessions, "allreduce", [([h], []) for h in handles], op=op)
        want = functools.reduce(local, values)
        if op == "avg":
            want = want / size
        for s, h in zip(sessions, handles, strict=True):
            assert same_bits(s.download(h), want), op
    # several tensors at once (flattened together), integers (avg floors), and a message of several frames
    for dtype, n in ((torch.int64, 37), (torch.float64, seclink.MAX_FRAME // 8 + 1001)):
        values = [torch.randint(-1000, 1000, (n,), generator=gen).to(dtype) * (r + 1) for r in range(size)]
        handles = [[s.upload(v[:7]), s.upload(v[7:])] for s, v in zip(sessions, values, strict=True)]
        run_everywhere(sessions, "allreduce", [(hs, []) for hs in handles], op="avg")
        total = functools.reduce(torch.add, values)
        want = total.div(size) if dtype.is_floating_point else total.floor_divide(size)
        for s, hs in zip(sessions, handles, strict=True):
            assert same_bits(torch.cat([s.download(h) for h in hs]), want)
    for root in range(size):
        values = [torch.randn(5, 3, generator=gen) for _ in range(size)]
        handles = [s.upload(v) for s, v in zip(sessions, values, strict=True)]
        run_everywhere(sessions, "broadcast", [([h], []) for h in handles], root=root)
        for s, h in zip(sessions, handles, strict=True):
            assert same_bits(s.download(h), values[root])
    values = [torch.randn(4, generator=gen).to(torch.bfloat16) for _ in range(size)]
    outs = [[s.upload(torch.zeros(4, dtype=torch.bfloat16)) for _ in range(size)] for s in sessions]
    ins = [s.upload(v) for s, v in zip(sessions, values, strict=True)]
    run_everywhere(sessions, "allgather", [(o, [i]) for o, i in zip(outs, ins, strict=True)])
    for s, o in zip(sessions, outs, strict=True):
        assert all(same_bits(s.download(h), v) for h, v in zip(o, values, strict=True))
    values = [torch.randn(2 * size, generator=gen) for _ in range(size)]
    ins = [s.upload(v) for s, v in zip(sessions, values, strict=True)]
    outs1 = [s.upload(torch.zeros(2)) for s in sessions]
    run_everywhere(sessions, "reduce_scatter", [([o], [i]) for o, i in zip(outs1, ins, strict=True)], op="sum")
    total = functools.reduce(torch.add, values)
    for r, (s, o) in enumerate(zip(sessions, outs1, strict=True)):
        assert same_bits(s.download(o), total[2 * r : 2 * r + 2])
    flags = [s.upload(torch.tensor([r == 1, False])) for r, s in enumerate(sessions)]
    run_everywhere(sessions, "allreduce", [([f], []) for f in flags], op="max")
    assert all(s.download(f).tolist() == [True, False] for s, f in zip(sessions, flags, strict=True))
    run_everywhere(sessions, "barrier", [([], [])] * size)
    for s in sessions:
        s.sync()
        s.close()


def flip(conn: int, frame: int, offset: int) -> Tamper:
    def tamper(n: int, i: int, data: bytes) -> bytes:
        if (n, i) != (conn, frame):
            return data
        out = bytearray(data)
        out[offset] ^= 0x40
        return bytes(out)

    return tamper


@pytest.mark.parametrize(
    "where, victim, message",
    [
        ("tamper_up", 0, "a frame from rank 1 failed authentication"),  # a ciphertext byte, rank 1 -> hub
        ("tamper_down", 1, "a frame from rank 0 failed authentication"),  # hub -> rank 1
    ],
    ids=["to-hub", "from-hub"],
)
def test_a_byte_altered_on_the_wire_fails_the_collective(daemon_factory, where, victim, message) -> None:  # type: ignore[no-untyped-def]
    sessions, tokens = sessions_of(daemon_factory, [1, 1])
    # frame 0 of each direction is the agreement check, frame 1 the tensor: alter one byte of the tensor
    relay = join_through_relay(sessions, tokens, **{where: flip(0, 1, 4 + 100)})
    handles = [s.upload(torch.full((100,), float(r + 1))) for r, s in enumerate(sessions)]
    run_everywhere(sessions, "allreduce", [([h], []) for h in handles], op="sum")
    from gpupool.errors import GpupoolError, Unavailable

    with pytest.raises(Unavailable, match=f"collective allreduce of rank {victim} of 2 .*{message}"):
        sessions[victim].sync()
    if victim == 0:  # the hub never sent a result: rank 1 sees its link close, at once rather than at the timeout
        start = time.monotonic()
        with pytest.raises(Unavailable, match="rank 0 closed the link"):
            sessions[1].sync()
        assert time.monotonic() - start < TIMEOUT
    else:  # the hub's result was right; the group is over for it at its next collective
        assert sessions[0].download(handles[0]).tolist() == [3.0] * 100
        collective(sessions[0], "barrier", [])
        with pytest.raises(Unavailable, match="closed the link"):
            sessions[0].sync()
    with pytest.raises(GpupoolError, match="failed"):  # broken for good: later collectives fail at once
        collective(sessions[victim], "barrier", [])
        sessions[victim].sync()
    relay.close()
    for s in sessions:
        s.close()


def test_a_replayed_frame_fails_the_collective(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    sessions, tokens = sessions_of(daemon_factory, [1, 1])
    recorded: dict[int, bytes] = {}

    def replay(n: int, i: int, data: bytes) -> bytes:  # rank 1 -> hub: its first tensor again, for the second
        recorded[i] = data
        return recorded[1] if i == 3 else data

    relay = join_through_relay(sessions, tokens, tamper_up=replay)
    for step in (1.0, 2.0):
        handles = [s.upload(torch.full((4,), step * (r + 1))) for r, s in enumerate(sessions)]
        run_everywhere(sessions, "allreduce", [([h], []) for h in handles], op="sum")
    from gpupool.errors import Unavailable

    with pytest.raises(Unavailable, match="a frame from rank 1 failed authentication"):
        sessions[0].sync()
    assert len(recorded[3]) == len(recorded[1])  # a frame the hub would take, were it not for its nonce
    with pytest.raises(Unavailable, match="rank 0 closed the link"):
        sessions[1].sync()
    relay.close()
    for s in sessions:
        s.close()


def test_ranks_relabelled_on_the_wire_cannot_join(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """The relay swaps ranks 1 and 2 in their hellos: keys bound to the ranks make both handshakes fail, so
    the hub cannot take rank 1's tensors for rank 2's."""
    sessions, tokens = sessions_of(daemon_factory, [2, 1])

    def swap(hello: bytes) -> bytes:
        magic, rank, nonce = seclink.HELLO.unpack(hello)
        return seclink.HELLO.pack(magic, 3 - rank, nonce)

    relay = join_through_relay(sessions, tokens, timeout=3.0, hello=swap)
    ins = [s.upload(torch.tensor([float(r)])) for r, s in enumerate(sessions)]
    outs = [[s.upload(torch.zeros(1)) for _ in range(3)] for s in sessions]
    run_everywhere(sessions, "allgather", [(o, [i]) for o, i in zip(outs, ins, strict=True)])
    from gpupool.errors import Unavailable

    for r in (1, 2):
        with pytest.raises(Unavailable, match=f"rank {r} of 3 .*rank 0's end of the link does not hold"):
            sessions[r].sync()
    with pytest.raises(Unavailable, match=r"rank 0 of 3 .*ranks \[1, 2\] did not connect"):
        sessions[0].sync()
    relay.close()
    for s in sessions:
        s.close()


def test_strangers_connections_are_refused_and_the_group_forms(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    sessions, tokens = sessions_of(daemon_factory, [1, 1])
    port = join_rank0(sessions, tokens, 10.0)
    _, host, hub_port = group_store(port, tokens[0]).get(seclink.HUB_KEY).decode().split()
    hub = (host, int(hub_port))  # a stranger finds it by scanning the host's ports
    idle = socket.create_connection(hub)
    garbage = socket.create_connection(hub)
    garbage.sendall(os.urandom(seclink.HELLO_BYTES + seclink.CONFIRM_BYTES))
    pretender = socket.create_connection(hub)  # a well-formed hello claiming rank 1, without the keys
    pretender.sendall(seclink.HELLO.pack(seclink.MAGIC, 1, os.urandom(32)))
    assert len(_read(pretender, seclink.HUB_HELLO_BYTES)) == seclink.HUB_HELLO_BYTES
    pretender.sendall(os.urandom(seclink.CONFIRM_BYTES))
    join_others(sessions, tokens, port, 10.0)
    handles = [s.upload(torch.tensor([1.5, float(r)])) for r, s in enumerate(sessions)]
    run_everywhere(sessions, "allreduce", [([h], []) for h in handles], op="sum")
    assert [s.download(h).tolist() for s, h in zip(sessions, handles, strict=True)] == [[3.0, 1.0]] * 2
    for stranger in (garbage, pretender):  # the hub hung up on them
        assert hung_up(stranger)
    for s in (idle, garbage, pretender):
        s.close()
    for s in sessions:
        s.close()


class Crowd:
    """Strangers crowding the hub from other loopback addresses (127.0.0.2 ...): each opens connections as fast
    as it can and sends a well-formed hello claiming rank 1, then nothing (it has no keys); it keeps the newest
    few of its sockets open."""

    def __init__(self, hub: tuple[str, int], sources: list[str]) -> None:
        self.hub, self.sources = hub, sources
        self.stop = threading.Event()
        self.opened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        held: list[socket.socket] = []
        while not self.stop.is_set():
            for source in self.sources:
                try:
                    s = socket.create_connection(self.hub, timeout=1.0, source_address=(source, 0))
                    s.sendall(seclink.HELLO.pack(seclink.MAGIC, 1, os.urandom(32)))
                except OSError:
                    continue
                self.opened += 1
                held.append(s)
            while len(held) > 4 * seclink.MAX_PENDING:
                held.pop(0).close()
        for s in held:
            s.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def test_idle_and_flooding_strangers_do_not_keep_ranks_out(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """Round 16's known limit: 32 idle connections held every handshake slot of the hub for 10 s, and a rank
    that came then was hung up on (its group failed). Now strangers push out each other's handshakes (per
    source address first), a hello is due within 2 s, and a rank whose link was pushed out connects again: a
    group forms with a timeout shorter than one stranger's 10 s, while the hub is held by idle connections
    from the ranks' own address and from others, and flooded with fresh ones from four other addresses."""
    sessions, tokens = sessions_of(daemon_factory, [2, 1])
    timeout = seclink.HANDSHAKE_SECONDS * 0.8
    port = join_rank0(sessions, tokens, timeout)
    _, host, hub_port = group_store(port, tokens[0]).get(seclink.HUB_KEY).decode().split()
    hub = (host, int(hub_port))
    idle = [socket.create_connection(hub) for _ in range(seclink.MAX_PENDING_PER_SOURCE // 2)]  # the ranks' address
    idle += [socket.create_connection(hub, source_address=("127.0.0.9", 0)) for _ in range(2 * seclink.MAX_PENDING)]
    crowd = Crowd(hub, [f"127.0.0.{i}" for i in range(2, 6)])
    try:
        wait_for(lambda: crowd.opened > 4 * seclink.MAX_PENDING)
        join_others(sessions, tokens, port, timeout)
        handles = [s.upload(torch.tensor([1.5, float(r)])) for r, s in enumerate(sessions)]
        run_everywhere(sessions, "allreduce", [([h], []) for h in handles], op="sum")
        assert [s.download(h).tolist() for s, h in zip(sessions, handles, strict=True)] == [[4.5, 3.0]] * 3
    finally:
        crowd.close()
        for s in idle:
            s.close()
        for s in sessions:
            s.close()


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_gloo_workers_granted_network_need_the_operators_second_opt_in(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """Under `--collectives gloo` a worker granted network connects to any TCP port of any host: gloo's listener binds
    a port its kernel picks (getaddrinfo with no service: no option of gloo, c10d or GLOO_* names one) and each pair
    dials its peer's, so Landlock's TCP rules cannot hold it to --collective-ports. On a kernel whose Landlock could
    (ABI 4+) such a daemon now refuses to start, naming the way out, unless `--gloo-connect-anywhere on`; on 7b5ed4d it
    started. Without workers' network (or under --landlock off: nothing to keep) it starts as before."""
    from gpupool.server import landlock

    from gpupool.errors import InvalidArgument

    if landlock.abi() < 4:
        pytest.skip("TCP rules need Landlock ABI 4 (Linux 6.7)")
    with pytest.raises(InvalidArgument, match=r"--collectives gloo with --worker-network on: .* --collective-ports "
                       r"30100-30355: .*--collectives secure .*--gloo-connect-anywhere on"):  # fmt: skip
        daemon_factory(worker_network=True, collectives="gloo")
    for started in ({"gloo_connect_anywhere": True}, {"landlock": False}, {"worker_network": False}):
        d = daemon_factory(**{"worker_network": True, "collectives": "gloo", **started})
        with Session.attach(d.address, d.token(network=True)) as s:
            assert s.download(s.upload(torch.ones(2))).tolist() == [1.0, 1.0]


def test_plaintext_gloo_is_an_explicit_opt_in(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    sessions, tokens = sessions_of(daemon_factory, [1, 1], collectives="gloo")
    port = join_rank0(sessions, tokens, TIMEOUT)
    join_others(sessions, tokens, port, TIMEOUT)
    handles = [s.upload(torch.tensor([1, 2, 3]) * (r + 1)) for r, s in enumerate(sessions)]
    run_everywhere(sessions, "allreduce", [([h], []) for h in handles], op="sum")
    assert [s.download(h).tolist() for s, h in zip(sessions, handles, strict=True)] == [[3, 6, 9]] * 2
    assert not group_store(port, tokens[0]).check([seclink.HUB_KEY])  # gloo's links, not the secure star
    for s in sessions:
        s.close()
