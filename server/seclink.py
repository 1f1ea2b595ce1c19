"""The encrypted, authenticated transport of collectives between daemons (`--collectives secure`, the default).

gloo and NCCL move a job's tensors between daemons in plain TCP, and neither can be given TLS from here
(torch's gloo device takes a host name only; NCCL has no encryption at all). A confined worker cannot write
the certificate files Python's `ssl` needs, and `ssl` has no pre-shared keys. So the links of a secure group
are plain TCP sockets carrying AES-256-GCM frames (`cryptography`, i.e. OpenSSL), keyed from the group's
secret, which only daemons that were handed the lease's tokens can compute (`group_secret`, server/collectives.py):

Topology: a star around rank 0 (the hub), for the collectives; and (round 44) for send/recv in a group of three or
more a link between the two ranks of a transfer, formed at the pair's first one with the same handshake and frames
(`Links`: the lower rank listens, the higher connects; `SecureGroup.p2p`). The hub listens on the daemon's
peer-facing host, on a free port of the daemon's `--collective-ports` range (`bind_in`: a worker granted network
may bind and connect to no other TCP port under Landlock, round 42; every daemon of a pool has the same range, and a
rank refuses a hub port outside its own); it publishes
`<generation> <host> <port>` in the group's signed store (an HMAC under the secret: `_SignedStore`), where the
generation is 16 fresh random bytes of this group. Every other rank connects to the hub once.

Handshake (fixed sizes, no lengths to trust):

    connector -> hub   HELLO  = MAGIC, rank (u32), nonce_c (32 random bytes)
    hub -> connector   HELLO' = MAGIC, 0 (u32), nonce_s (32 random bytes), HMAC(m_s, b"hub" + transcript)
    connector -> hub   HMAC(m_c, b"rank" + transcript)            transcript = HELLO + HELLO' without its MAC
    hub -> connector   WELCOME = HMAC(m_s, b"in" + transcript)    (v3, round 55: the hub took the link)

    k_c2s, k_s2c, m_c, m_s = HKDF-SHA256(ikm=secret, salt=nonce_c + nonce_s,
                                        info=VERSION, lease id, generation, size, connector rank, hub rank)

Each side proves it holds the secret before the other sends a tensor byte; a connection that fails (an
outsider, a replayed handshake, a rank rewritten on the way) is closed and the hub keeps waiting for the
real peer, until the group's timeout. Strangers cannot crowd a rank out: the hub runs every handshake in
one thread with per-source and total caps, the newest connection pushing out the busiest source's oldest
(`_Hub`), and a rank whose link was dropped before the hub's WELCOME connects again. Binding the lease,
generation, size and both ranks into the keys means a recorded connection cannot be replayed into another
group, generation or rank, and both sides' fresh nonces mean no two connections ever share a key, even if one
side's random numbers repeated.

Frames: `len (u32) | AES-256-GCM(key of the direction, nonce = 0^4 | counter (u64), plaintext, aad = len)`.
Each direction has its own key and its own counter from 0, one per frame, never reset or reused within a
connection (the connection ends before it could wrap). A frame that fails authentication (altered, dropped,
reordered, replayed, forged) ends the group with a clear error, never a wrong result: the collective fails,
the sockets close, and the peers see their collective fail too. Every length read from a peer is bounded
(MAX_FRAME, and what the receiver expects), every read and every send has the group's deadline.

Collectives (what server/collectives.py runs): allreduce (sum, product, min, max; avg is sum then divide),
broadcast, allgather, barrier, each with the call's agreement in its first frames (`Agreement`, round 40: a rank's
record, then its tensor without waiting; the hub's verdict before any tensor byte is used). An allreduce streams:
each rank sends its tensor frame by frame from a thread while it receives the result; the hub reduces each frame's
elements in rank order, `((t0 op t1) op t2) ...` with torch's CPU kernels, and sends that frame of the result back
at once. The outcome equals that local computation bit for bit, on every rank. A record or a verdict goes out with
the frame after it in one system call (`Channel.queue_frame`). Broadcast and allgather go through the hub whole
(they are small in DDP: parameters once, shape signatures). CUDA tensors go through host copies.

Not protected: the store itself (plain TCP; values signed, not secret: the hub's address and the generation),
traffic analysis (sizes and timing), and denial of service by anyone who can reach or cut the connections.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import hmac
import logging
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gpupool.errors import GpupoolError, InvalidArgument, ResourceExhausted
from gpupool.peers import grown_caps, push_out, source_key
from gpupool.protocol import COLLECTIVE_PORTS

log = logging.getLogger(__name__)

# v2 (round 40): a collective's first frames carry its agreement (`Agreement`); v3 (round 55): the hub's WELCOME
VERSION = b"gpupool-seclink-v3"
MAGIC = b"GPSLINK3"  # daemons of two versions do not form one group: the hub drops a hello of another magic
NONCE_BYTES = 32
MAC_BYTES = 32
TAG_BYTES = 16
HELLO = struct.Struct("!8sI32s")  # magic, rank, nonce
HELLO_BYTES = HELLO.size
HUB_HELLO_BYTES = HELLO_BYTES + MAC_BYTES
CONFIRM_BYTES = MAC_BYTES
WELCOME_BYTES = MAC_BYTES
STOP_POLL_SECONDS = 0.1  # how soon a closed session's join gives up (the hub looks this often)
MAX_FRAME = 1 << 20  # plaintext bytes of one frame (a multiple of every element size; several in flight pipeline)
MAX_FRAMES = 1 << 48  # per direction of a connection: far below 2^64 counter values
MAX_PENDING = 32  # handshakes in progress at the hub at once; a newcomer past it pushes out the busiest source's oldest
MAX_PENDING_PER_SOURCE = 8  # ... from one source address; a newcomer past it pushes out its own oldest
MAX_GROWN_PER_SOURCE = 32  # (round 55) the per-source cap grows to the ranks a hub expects, up to this (`_caps`)
HELLO_SECONDS = 2.0  # a connection's hello is due this soon (a rank sends it as soon as it connects)
HANDSHAKE_SECONDS = 10.0  # at most, per connection: an outsider that sent a hello and no proof is dropped after this
RETRY_SECONDS = 0.1  # a rank whose link the hub dropped before its WELCOME connects again after this, doubled
RETRY_MAX_SECONDS = 1.6  # ... each time up to this (each wait jittered: x 0.5-1.5), within the group's timeout
HUB_KEY = "seclink/hub"
P2P_KEY = "seclink/p2p"  # + /<low rank>/<high rank>: the lower rank's listener for their link (`Links`)
_P2P = struct.Struct("!qqqq")  # a transfer's header on a rank-to-rank link: tag, dtype code, elements, bytes after it
_LEN = struct.Struct("!I")
SIGNATURE_BYTES = 64  # a call's signature (server/collectives.py `_signature`: 8 int64), compared whole
_EAGER = struct.Struct("!q")  # after it in a rank's record: the bytes it sends before the verdict (-1: no frame)
RECORD_BYTES = SIGNATURE_BYTES + _EAGER.size


class LinkError(Exception):
    """A link of a secure group failed: the group is over (never a GpupoolError: collectives.py breaks the
    group on any other exception)."""


class _Refused(Exception):
    """The ranks' records disagreed (or a rank's daemon refused its call): `error` is this rank's answer. Raised once
    every byte the call put on the links is read (`SecureGroup._drain`): the links stay in step, the group goes on."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Agreement:
    """A collective's agreement check, folded into its transfer (round 40; until then `_agree` in
    server/collectives.py all-gathered the signatures first, a round trip through the hub of its own before every
    collective). Each rank's first frame of the call is its record: `signature` (SIGNATURE_BYTES, compared whole)
    and the number of bytes it sends next without waiting (its tensor in an allreduce or an allgather, the root's in
    a broadcast; -1 for none); then those bytes. The hub reads every rank's record, sends each rank the verdict (every
    rank's signature, its own first, in one frame) and only then reads, reduces or sends any tensor byte. `check`
    (the same function of the same rows on every rank) returns None to go on, or the error the call ends with; then
    the hub reads and drops what each rank said it sent (in frames of at most MAX_FRAME, into its scratch buffer:
    never a tensor), and every rank fails with its error while the links stay in step (the group goes on)."""

    def __init__(self, signature: bytes, check: Callable[[list[bytes]], Exception | None]) -> None:
        if len(signature) != SIGNATURE_BYTES:
            raise ValueError(f"a signature is {SIGNATURE_BYTES} bytes, not {len(signature)}")
        self.signature = signature
        self.check = check


class _Dropped(LinkError):
    """The hub closed a rank's connection before its hello came back (crowded by strangers): the rank retries."""


def connection_keys(
    secret: bytes, nonce_c: bytes, nonce_s: bytes, lease_id: str, generation: bytes, size: int, rank: int, hub: int
) -> tuple[bytes, bytes, bytes, bytes]:
    """(connector-to-hub key, hub-to-connector key, connector's MAC key, hub's MAC key) of one connection."""
    info = b"\0".join([VERSION, lease_id.encode(), generation, struct.pack("!III", size, rank, hub)])
    okm = HKDF(algorithm=hashes.SHA256(), length=128, salt=nonce_c + nonce_s, info=info).derive(secret)
    return okm[:32], okm[32:64], okm[64:96], okm[96:]


class Buffers:
    """The scratch space of a channel's frames (3 MiB): the hub's channels, used by one thread one at a time,
    share one set, so a hub of many ranks does not hold 3 MiB per peer."""

    def __init__(self) -> None:
        self.out = bytearray(_LEN.size + MAX_FRAME + TAG_BYTES)  # a frame as it goes out: length, sealed bytes
        self.sealed = bytearray(MAX_FRAME + TAG_BYTES)  # a frame as it comes in
        self.plain = bytearray(MAX_FRAME)  # its plaintext, once authenticated


class Channel:
    """One authenticated connection: a key and a frame counter per direction. One thread may send while
    another receives (each direction has its own state and buffer)."""

    def __init__(
        self, sock: socket.socket, peer: int, send_key: bytes, recv_key: bytes, buffers: Buffers | None = None
    ) -> None:
        self.sock = sock
        self.peer = peer
        self._send = AESGCM(send_key)
        self._recv = AESGCM(recv_key)
        self._sent = 0
        self._received = 0
        self.buffers = buffers or Buffers()
        self._queued: list[bytes] = []  # sealed frames that go out with the next one (`queue_frame`)

    def _nonce(self, counter: int) -> bytes:
        if counter >= MAX_FRAMES:
            raise LinkError(f"the link with rank {self.peer} has carried its limit of frames")
        return counter.to_bytes(12, "big")

    def send_frame(self, chunk: memoryview, deadline: float) -> None:
        """One frame of at most MAX_FRAME bytes."""
        n = len(chunk)
        assert n <= MAX_FRAME
        header = _LEN.pack(n + TAG_BYTES)
        out = memoryview(self.buffers.out)[: _LEN.size + n + TAG_BYTES]
        out[: _LEN.size] = header
        nonce = self._nonce(self._sent)
        self._sent += 1
        self._send.encrypt_into(nonce, chunk, header, out[_LEN.size :])
        _set_deadline(self.sock, deadline, self.peer)
        try:
            if self._queued:
                queued, self._queued = self._queued, []
                _send_parts(self.sock, [*queued, out], deadline, self.peer)
            else:
                self.sock.sendall(out)
        except OSError as exc:
            raise LinkError(f"sending to rank {self.peer} failed: {_why(exc)}") from None

    def queue_frame(self, chunk: memoryview) -> None:
        """A small frame (a record, a verdict) sealed now, in its place among the frames, and sent with the next
        frame in one system call (`send_frame`) or by `flush`: one TCP segment where the next follows at once."""
        n = len(chunk)
        assert n <= MAX_FRAME
        header = _LEN.pack(n + TAG_BYTES)
        nonce = self._nonce(self._sent)
        self._sent += 1
        self._queued.append(header + self._send.encrypt(nonce, bytes(chunk), header))

    def flush(self, deadline: float) -> None:
        """Send the queued frames now (none follows them)."""
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        _set_deadline(self.sock, deadline, self.peer)
        try:
            self.sock.sendall(b"".join(queued))
        except OSError as exc:
            raise LinkError(f"sending to rank {self.peer} failed: {_why(exc)}") from None

    def recv_frame(self, want: int, deadline: float) -> memoryview:
        """The plaintext of the next frame, which must hold `want` bytes (<= MAX_FRAME), authenticated before
        it is returned; valid until the next call."""
        (length,) = _LEN.unpack(_recv_exact(self.sock, _LEN.size, deadline, self.peer))
        if length != want + TAG_BYTES:
            raise LinkError(
                f"rank {self.peer} sent a frame of {length} bytes where {want + TAG_BYTES} were due "
                "(altered on the wire, or the ranks disagree)"
            )
        sealed = memoryview(self.buffers.sealed)[:length]
        _recv_into(self.sock, sealed, deadline, self.peer)
        plain = memoryview(self.buffers.plain)[:want]
        try:  # into a scratch buffer: bytes that fail authentication never reach a tensor
            self._recv.decrypt_into(self._nonce(self._received), sealed, _LEN.pack(length), plain)
        except InvalidTag:
            raise LinkError(
                f"a frame from rank {self.peer} failed authentication (altered, replayed or forged on the "
                "wire): the collective is abandoned"
            ) from None
        self._received += 1
        return plain

    def send(self, data: memoryview, deadline: float) -> None:
        """`data` as ceil(len / MAX_FRAME) frames (at least one: an empty message still is one)."""
        for start, end in _frames(len(data)):
            self.send_frame(data[start:end], deadline)

    def recv_into(self, out: memoryview, deadline: float) -> None:
        """Exactly len(out) bytes, in the frames `send` makes of them."""
        for start, end in _frames(len(out)):
            out[start:end] = self.recv_frame(end - start, deadline)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _send_parts(sock: socket.socket, parts: list[Any], deadline: float, peer: int) -> None:
    """`sock.sendall` of the parts one after the other, in as few system calls as the socket takes (sendmsg), by
    `deadline` (the caller set the socket's timeout for the first call). Each further call after a partial send gets
    what is left of the deadline, as each read does (`_recv_into`): the socket's timeout bounds one call, not the
    loop (sendall's bounds its whole), so a peer that read a little at a time, just within it, held a send here
    for as many timeouts as it took reads (round 40's review)."""
    views = [memoryview(p).cast("B") for p in parts]
    while True:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if not views:
            return
        if sent:
            views[0] = views[0][sent:]
        _set_deadline(sock, deadline, peer)


def _frames(n: int) -> list[tuple[int, int]]:
    """The (start, end) of each frame of a message of n bytes: MAX_FRAME each, the last shorter; one if empty."""
    return [(start, min(start + MAX_FRAME, n)) for start in range(0, n, MAX_FRAME)] or [(0, 0)]


# ---- forming the group ----

T = TypeVar("T")


def bind_in(ports: tuple[int, int], bind: Callable[[int], T]) -> T:
    """`bind(port)` on the ports of `ports` (LOW, HIGH: --collective-ports) from a random one on, until one is free:
    the first that does not fail with "address in use" (an OSError of EADDRINUSE, or torch's DistNetworkError naming
    it); RESOURCE_EXHAUSTED when every port of the range is taken (by the daemon's other groups, or anything else of
    the host). Any other failure is raised as it is."""
    low, high = ports
    count = high - low + 1
    start = random.randrange(count)
    for i in range(count):
        port = low + (start + i) % count
        try:
            return bind(port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        except RuntimeError as exc:  # TCPStore's DistNetworkError
            if "EADDRINUSE" not in str(exc):
                raise
    raise ResourceExhausted(f"every port of this daemon's --collective-ports {low}-{high} is in use; try again later")


def in_range(port: int, ports: tuple[int, int]) -> bool:
    return ports[0] <= port <= ports[1]


def form(
    store: Any,
    secret: bytes,
    lease_id: str,
    rank: int,
    size: int,
    timeout: float,
    host: str,
    stop: threading.Event | None = None,
    ports: tuple[int, int] = COLLECTIVE_PORTS,
    own: tuple[int, int] | None = None,
) -> SecureGroup:
    """Connect this rank into the group's star (blocks until every rank is in, or raises LinkError; at once
    when `stop` is set: the session closed, and rank 0's listener goes with it). Rank 0 listens on a port of
    `own` (its session's block of --collective-ports, server/portshare.py; None: `ports`, the range); the others
    connect to no hub port outside `ports`."""
    deadline = time.monotonic() + timeout
    if rank == 0:
        group = _form_hub(store, secret, lease_id, size, timeout, host, deadline, stop, own or ports)
    else:
        channel = _dial(store, HUB_KEY, secret, lease_id, size, rank, 0, deadline, stop, ports)
        group = SecureGroup(rank, size, timeout, {0: channel})
    # rank-to-rank links for send/recv, each formed at its pair's first transfer (round 44)
    group.links = Links(store, secret, lease_id, rank, size, host, stop, ports, own or ports)
    return group


def _dial(
    store: Any,
    key: str,
    secret: bytes,
    lease_id: str,
    size: int,
    rank: int,
    hub: int,
    deadline: float,
    stop: threading.Event | None,
    ports: tuple[int, int],
) -> Channel:
    """Connect this rank to the listener of rank `hub` whose address (`<generation> <host> <port>`) the signed store
    holds under `key`: rank 0's star hub, or (round 44) a peer's listener for a rank-to-rank link (`Links`)."""
    raw = store.get(key).decode(errors="replace").split()
    if len(raw) != 3 or not raw[2].isdigit():
        raise LinkError(f"the group's store holds a malformed address of rank {hub} {' '.join(raw)!r}")
    generation, hub_host, port = bytes.fromhex(raw[0]), raw[1], int(raw[2])
    if not in_range(port, ports):
        raise LinkError(
            f"rank {hub} listens on port {port}, outside this daemon's --collective-ports {ports[0]}-{ports[1]} "
            "(every daemon of a job needs the same range)"
        )
    tries = 0  # links pushed out: the next wait doubles (ranks of one host dropped at once spread out)
    while True:
        try:
            sock = socket.create_connection((hub_host, port), timeout=max(0.1, deadline - time.monotonic()))
        except OSError as exc:
            if stop is not None and stop.is_set():
                raise LinkError("the session closed while its collective group formed") from None
            if time.monotonic() + 0.2 >= deadline:
                raise LinkError(f"cannot reach rank {hub} at {hub_host}:{port}: {_why(exc)}") from None
            time.sleep(0.2)
            continue
        try:
            deadline_hs = min(deadline, _handshake_deadline())
            return _connect(sock, secret, lease_id, generation, size, rank, deadline_hs, hub)
        except _Dropped:  # strangers (or this host's other ranks) crowd the listener: it pushed this link out
            sock.close()
            wait = min(RETRY_MAX_SECONDS, RETRY_SECONDS * 2**tries) * random.uniform(0.5, 1.5)
            tries += 1
            if time.monotonic() + wait >= deadline:
                raise
            time.sleep(wait)
        except BaseException:
            sock.close()
            raise


def _form_hub(
    store: Any,
    secret: bytes,
    lease_id: str,
    size: int,
    timeout: float,
    host: str,
    deadline: float,
    stop: threading.Event | None,
    ports: tuple[int, int] = COLLECTIVE_PORTS,
) -> SecureGroup:
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    listener = bind_in(ports, lambda port: socket.create_server((host, port), family=family, backlog=64))
    generation = os.urandom(16)
    hub = _Hub(secret, lease_id, generation, size, deadline, stop)
    try:
        store.set(HUB_KEY, f"{generation.hex()} {host} {listener.getsockname()[1]}")
        hub.run(listener, timeout)
    except BaseException:
        hub.close_all()
        raise
    finally:
        listener.close()
        # (round 46) every rank read it (each is in), or the hub failed and its port is closed: a subgroup's key left
        # in rank 0's store grew it by each subgroup a session made and left, without bound
        forget(store, [HUB_KEY])
    return SecureGroup(0, size, timeout, hub.channels)


def forget(store: Any, keys: list[str]) -> None:
    """Delete `keys` from the group's store, at most once each and best effort: a store that cannot be reached is
    gone with its group (or its failure is the group's next call's to report)."""
    for key in keys:
        try:
            store.delete_key(key)
        except Exception as exc:
            log.debug("deleting %s from the group's store: %s", key, exc)


class Links:
    """A rank's rank-to-rank links of a secure group, for send/recv (round 44; until then send/recv ran only in a group
    of two, as broadcasts over the star). A pair's link forms at its first transfer, when both ranks run it: the lower
    rank listens on a port of its session's block (`own`, as the hub does), with a fresh generation, and publishes
    `<generation> <host> <port>` in the group's signed store under `seclink/p2p/<low>/<high>`; the higher rank reads
    it and connects (a port outside `ports` is refused) with the star's handshake, its keys bound to the lease, that
    generation, the size and both ranks. The listener takes the ranks it expects only, and closes once they are in.
    Each link carries one thread's sends and one thread's receives at a time (`SecureGroup.p2p`)."""

    def __init__(
        self,
        store: Any,
        secret: bytes,
        lease_id: str,
        rank: int,
        size: int,
        host: str,
        stop: threading.Event | None,
        ports: tuple[int, int],
        own: tuple[int, int],
    ) -> None:
        self.store, self.secret, self.lease_id = store, secret, lease_id
        self.rank, self.size, self.host, self.stop = rank, size, host, stop
        self.ports, self.own = ports, own
        self.channels: dict[int, Channel] = {}

    def ensure(self, peers: set[int], deadline: float) -> None:
        """A link with every rank of `peers`: this rank listens for the higher ones (its keys published first, from
        this thread: the store's client takes one call at a time) while it connects to the lower ones in order."""
        need = sorted(p for p in peers if p not in self.channels)
        higher = {p for p in need if p > self.rank}
        hub: _Hub | None = None
        listener: socket.socket | None = None
        accepted: list[BaseException] = []
        accepting: threading.Thread | None = None
        try:
            if higher:
                family = socket.getaddrinfo(self.host, 0, type=socket.SOCK_STREAM)[0][0]
                listener = bind_in(
                    self.own, lambda port: socket.create_server((self.host, port), family=family, backlog=64)
                )
                generation = os.urandom(16)
                hub = _Hub(self.secret, self.lease_id, generation, self.size, deadline, self.stop, self.rank, higher)
                port = listener.getsockname()[1]
                for p in sorted(higher):
                    self.store.set(f"{P2P_KEY}/{self.rank}/{p}", f"{generation.hex()} {self.host} {port}")

                def accept(hub: _Hub = hub, listener: socket.socket = listener) -> None:
                    try:
                        hub.run(listener, max(0.0, deadline - time.monotonic()))
                    except BaseException as exc:  # reported by the calling thread
                        accepted.append(exc)

                accepting = threading.Thread(target=accept, name="gpupool-seclink-accept", daemon=True)
                accepting.start()
            for p in need:
                if p < self.rank:
                    self.channels[p] = _dial(
                        self.store, f"{P2P_KEY}/{p}/{self.rank}", self.secret, self.lease_id, self.size,
                        self.rank, p, deadline, self.stop, self.ports,
                    )  # fmt: skip
            if accepting is not None:
                accepting.join()
                if accepted:
                    raise accepted[0]
            if hub is not None:
                self.channels.update(hub.channels)
                hub.channels.clear()
        except BaseException:
            if hub is not None:
                if accepting is not None:
                    self.stop_accepting(hub, accepting)
                hub.close_all()
            raise
        finally:
            if listener is not None:
                listener.close()
                # (round 46) the higher ranks read them (each is in), or the listener is closed: they go
                forget(self.store, [f"{P2P_KEY}/{self.rank}/{p}" for p in sorted(higher)])

    @staticmethod
    def stop_accepting(hub: _Hub, accepting: threading.Thread) -> None:
        """End the listener's thread early (a dial failed: the call is over)."""
        hub.deadline = 0.0
        accepting.join()

    def close(self) -> None:
        for c in self.channels.values():
            c.close()
        self.channels.clear()


class _Handshake:
    """One connection the hub accepted, until it proves it is a rank of the group (or is dropped)."""

    def __init__(self, sock: socket.socket, where: str, source: str, now: float, deadline: float) -> None:
        self.sock, self.where, self.source = sock, where, source
        self.accepted = now
        self.until = min(deadline, now + HELLO_SECONDS)  # its hello is due at once
        self.buf = b""
        self.want = HELLO_BYTES
        self.rank = -1
        self.keys: tuple[bytes, bytes, bytes, bytes] | None = None
        self.transcript = b""


class _Hub:
    """Rank 0 forming the star: one thread runs every handshake (non-blocking sockets, one selector), so what
    strangers hold is bounded and a newcomer never waits for a slot. A hello is due within HELLO_SECONDS of
    the connection, the proof within HANDSHAKE_SECONDS; at most `per_source` handshakes per source address and
    `total` in all are in progress (`_caps`: MAX_PENDING_PER_SOURCE and MAX_PENDING, more for a group of more than
    8 ranks). A connection past either cap drops the oldest handshake of its own source, or when the hub is full,
    of the source holding the most (so strangers on other addresses push out each other's connections, not a
    rank's). A rank's connector dials again, with back-off, until the hub's WELCOME comes (round 55: until then a
    rank pushed out in the round trip between the hub's hello and its proof could not know it, and the group
    failed at its timeout: 32 ranks of one host pushed each other out, 12 often)."""

    def __init__(
        self,
        secret: bytes,
        lease_id: str,
        generation: bytes,
        size: int,
        deadline: float,
        stop: threading.Event | None = None,
        hub: int = 0,
        expect: set[int] | None = None,
    ) -> None:
        self.secret, self.lease_id, self.generation, self.size = secret, lease_id, generation, size
        self.deadline = deadline
        self.stop = stop  # the session closed: the hub gives up within STOP_POLL_SECONDS
        self.hub = hub  # this rank: 0 for the star; a rank's own for its rank-to-rank links (`Links`)
        self.expect = set(range(1, size)) if expect is None else expect  # the ranks that connect here
        self.per_source, self.total = _caps(len(self.expect))
        self.channels: dict[int, Channel] = {}
        self.pending: list[_Handshake] = []  # in the order they were accepted
        # the star's channels are used by one thread, one at a time; rank-to-rank links each by a thread of its own
        self.shared = Buffers() if hub == 0 else None
        self._warned = 0.0

    def run(self, listener: socket.socket, timeout: float) -> None:
        listener.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            while not self.expect <= self.channels.keys():
                now = time.monotonic()
                if now >= self.deadline:
                    missing = sorted(self.expect - set(self.channels))
                    raise LinkError(f"ranks {missing} did not connect (with the group's keys) within {timeout:g} s")
                for h in [h for h in self.pending if h.until <= now]:
                    self._drop(sel, h, "did not complete its handshake in time")
                if self.stop is not None and self.stop.is_set():
                    raise LinkError("the session closed while its collective group formed")
                wake = min([self.deadline, *(h.until for h in self.pending)])
                if self.stop is not None:
                    wake = min(wake, now + STOP_POLL_SECONDS)
                for key, _ in sel.select(max(0.0, wake - now)):
                    if key.fileobj is listener:
                        self._accept_new(sel, listener)
                    elif key.data in self.pending:  # not dropped by an earlier event of this round
                        self._step(sel, key.data)

    def _accept_new(self, sel: selectors.BaseSelector, listener: socket.socket) -> None:
        for _ in range(MAX_PENDING):  # what is waiting now; the selector reports the rest next round
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: the connection stays in the backlog
                log.warning("collective hub: accept failed: %s", _why(exc))
                time.sleep(0.05)  # not a busy loop on a listener that stays readable
                return
            source = source_key(addr[0], v6_prefix=128)  # ranks on hosts of one IPv6 subnet stay apart
            out = push_out([h.source for h in self.pending], source, self.per_source, self.total)
            if out is not None:
                at, own = out
                why = "from its address" if own else "(too many handshakes in progress)"
                self._drop(sel, self.pending[at], f"pushed out by a newer connection {why}")
            sock.setblocking(False)
            h = _Handshake(sock, f"{addr[0]}:{addr[1]}", source, time.monotonic(), self.deadline)
            self.pending.append(h)
            sel.register(sock, selectors.EVENT_READ, h)

    def _step(self, sel: selectors.BaseSelector, h: _Handshake) -> None:
        try:
            data = h.sock.recv(h.want - len(h.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(sel, h, _why(exc))
            return
        if not data:
            self._drop(sel, h, "closed the connection during the handshake")
            return
        h.buf += data
        if len(h.buf) < h.want:
            return
        try:
            if h.keys is None:
                h.rank, reply, h.keys, h.transcript = _hub_hello(
                    h.buf, self.secret, self.lease_id, self.generation, self.size, self.hub, self.expect
                )
                h.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if h.sock.send(reply) != len(reply):  # a fresh socket's buffer takes 64 bytes
                    raise LinkError("the connection does not take the hub's hello")
                h.buf, h.want = b"", CONFIRM_BYTES
                h.until = min(self.deadline, h.accepted + HANDSHAKE_SECONDS)
                return
            c2s, s2c, m_c, m_s = h.keys
            _hub_check(h.buf, m_c, h.transcript, h.rank)
            if h.rank in self.channels:
                raise LinkError(f"rank {h.rank} is connected already")
            welcome = _mac(m_s, b"in", h.transcript)  # the rank is in: it waits for this (a pushed-out one sees EOF)
            if h.sock.send(welcome) != len(welcome):  # 108 bytes in all on this socket: its buffer takes them
                raise LinkError("the connection does not take the hub's welcome")
        except (LinkError, OSError) as exc:
            self._drop(sel, h, _why(exc))
            return
        sel.unregister(h.sock)
        self.pending.remove(h)
        h.sock.setblocking(True)
        self.channels[h.rank] = Channel(h.sock, h.rank, s2c, c2s, self.shared)

    def _drop(self, sel: selectors.BaseSelector, h: _Handshake, why: str) -> None:
        self.pending.remove(h)
        sel.unregister(h.sock)
        h.sock.close()
        now = time.monotonic()
        if now - self._warned > 1.0:  # a flood of connections must not flood the log
            self._warned = now
            log.warning("refused a collective link from %s (lease %s): %s", h.where, self.lease_id, why)

    def close_all(self) -> None:
        for h in self.pending:
            h.sock.close()
        self.pending.clear()
        for c in self.channels.values():
            c.close()
        self.channels.clear()


def _caps(expected: int) -> tuple[int, int]:
    """The hub's caps on handshakes in progress (per source address, in all) when `expected` ranks connect to it
    (round 55): every one of them may dial from one host (16 GPUs, or 4 ranks a GPU), so the per-source cap is
    `expected` (MAX_PENDING_PER_SOURCE at least, MAX_GROWN_PER_SOURCE at most: past it the ranks of one host push
    each other out and dial again), and the total grows twice as much (MAX_PENDING for 8), so that one source at
    its cap never makes a rank's own host the busiest. `expected` is the group's size, which the join fixes (the
    lease's tokens), never a connection's say: strangers hold at most 32 of one source and 80 in all."""
    return grown_caps(expected, MAX_PENDING_PER_SOURCE, MAX_PENDING, MAX_GROWN_PER_SOURCE)


def _handshake_deadline() -> float:
    return time.monotonic() + HANDSHAKE_SECONDS


def _connect(
    sock: socket.socket,
    secret: bytes,
    lease_id: str,
    generation: bytes,
    size: int,
    rank: int,
    deadline: float,
    hub_rank: int = 0,
) -> Channel:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    nonce_c = os.urandom(NONCE_BYTES)
    hello = HELLO.pack(MAGIC, rank, nonce_c)
    try:
        _set_deadline(sock, deadline, 0)
        sock.sendall(hello)
        reply = _recv_exact(sock, HUB_HELLO_BYTES, deadline, hub_rank)
    except (LinkError, OSError) as exc:  # no answer: the hub dropped the connection (or never took it)
        raise _Dropped(_why(exc)) from None
    magic, hub, nonce_s = HELLO.unpack(reply[:HELLO_BYTES])
    if magic != MAGIC or hub != hub_rank:
        raise LinkError(f"rank {hub_rank}'s end of the link does not speak this protocol")
    c2s, s2c, m_c, m_s = connection_keys(secret, nonce_c, nonce_s, lease_id, generation, size, rank, hub_rank)
    transcript = hello + reply[:HELLO_BYTES]
    if not hmac.compare_digest(reply[HELLO_BYTES:], _mac(m_s, b"hub", transcript)):
        raise LinkError(
            f"rank {hub_rank}'s end of the link does not hold the group's keys (a stranger or a tampered handshake)"
        )
    try:  # (round 55) a link pushed out before the hub read its proof is closed: the WELCOME never comes
        sock.sendall(_mac(m_c, b"rank", transcript))
        welcome = _recv_exact(sock, WELCOME_BYTES, deadline, hub_rank)
    except (LinkError, OSError) as exc:
        raise _Dropped(_why(exc)) from None
    if not hmac.compare_digest(welcome, _mac(m_s, b"in", transcript)):
        raise LinkError(f"rank {hub_rank}'s welcome does not hold the group's keys (a tampered handshake)")
    return Channel(sock, hub_rank, c2s, s2c)


def _accept(
    sock: socket.socket,
    secret: bytes,
    lease_id: str,
    generation: bytes,
    size: int,
    deadline: float,
    buffers: Buffers | None = None,
) -> Channel:
    """The hub's end of one handshake on a blocking socket (what `_Hub` does on many at once)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hello = _recv_exact(sock, HELLO_BYTES, deadline, -1)
    rank, reply, (c2s, s2c, m_c, m_s), transcript = _hub_hello(hello, secret, lease_id, generation, size)
    _set_deadline(sock, deadline, rank)
    sock.sendall(reply)
    _hub_check(_recv_exact(sock, CONFIRM_BYTES, deadline, rank), m_c, transcript, rank)
    sock.sendall(_mac(m_s, b"in", transcript))
    return Channel(sock, rank, s2c, c2s, buffers)


def _hub_hello(
    hello: bytes,
    secret: bytes,
    lease_id: str,
    generation: bytes,
    size: int,
    hub: int = 0,
    expect: set[int] | None = None,
) -> tuple[int, bytes, tuple[bytes, bytes, bytes, bytes], bytes]:
    """A connector's hello -> (its rank, the hub's hello with its MAC, the connection's keys, the transcript). The
    connector is a rank of `expect` (None: any rank but 0, the star's); `hub` is this end's rank."""
    magic, rank, nonce_c = HELLO.unpack(hello)
    if magic != MAGIC or not (0 < rank < size if expect is None else rank in expect):
        raise LinkError("not a collective link of this group")
    nonce_s = os.urandom(NONCE_BYTES)
    mine = HELLO.pack(MAGIC, hub, nonce_s)
    keys = connection_keys(secret, nonce_c, nonce_s, lease_id, generation, size, rank, hub)
    transcript = hello + mine
    return rank, mine + _mac(keys[3], b"hub", transcript), keys, transcript


def _hub_check(proof: bytes, m_c: bytes, transcript: bytes, rank: int) -> None:
    if not hmac.compare_digest(proof, _mac(m_c, b"rank", transcript)):
        raise LinkError(f"a connection claiming rank {rank} does not hold the group's keys")


def _mac(key: bytes, role: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, role + b"\0" + transcript, hashlib.sha256).digest()


# ---- the collectives ----


class _Done:
    def wait(self, *_: Any) -> bool:
        return True


_REDUCERS: list[tuple[Any, Callable[[torch.Tensor, torch.Tensor], Any]]] = [
    (dist.ReduceOp.SUM, lambda acc, x: acc.add_(x)),
    (dist.ReduceOp.PRODUCT, lambda acc, x: acc.mul_(x)),
    (dist.ReduceOp.MIN, lambda acc, x: torch.minimum(acc, x, out=acc)),
    (dist.ReduceOp.MAX, lambda acc, x: torch.maximum(acc, x, out=acc)),
]


class SecureGroup:
    """A process group over the star's channels, with the calls server/collectives.py makes of a gloo group
    (allreduce, broadcast, allgather, barrier; each returns a done work), each optionally with its `Agreement`
    (then the call's first frames carry it, and a call this rank's daemon refused takes part with `agree`). Any
    failure but a refusal closes every link: the group is over, and peers blocked on it see their collective fail
    at once rather than at the timeout."""

    def __init__(self, rank: int, size: int, timeout: float, channels: dict[int, Channel]) -> None:
        self.rank = rank
        self.size = size
        self.timeout = timeout
        self.channels = channels
        self.failed: str | None = None
        self.links: Links | None = None  # rank-to-rank links for send/recv (`form` sets them up)

    def close(self) -> None:
        for c in self.channels.values():
            c.close()
        if self.links is not None:
            self.links.close()

    def _guard(self, fn: Callable[[float], None]) -> _Done:
        if self.failed:
            raise LinkError(self.failed)
        try:
            deadline = time.monotonic() + self.timeout
            fn(deadline)
            for c in self.channels.values():  # a verdict no frame followed (a barrier's, a broadcast root's)
                c.flush(deadline)
        except _Refused as refused:  # the links are in step: the group goes on
            raise refused.error from None
        except BaseException as exc:
            self.failed = str(exc) if isinstance(exc, LinkError) else f"{type(exc).__name__}: {exc}"
            self.close()
            raise
        return _Done()

    # ---- the agreement a call's first frames carry (`Agreement`) ----

    def _offer(
        self, agreement: Agreement | None, eager: memoryview | None, deadline: float, stream: bool = False
    ) -> None:
        """A rank's record, then the bytes it sends before the verdict (unless `stream`: a thread sends them)."""
        channel = self.channels[0]
        if agreement is not None:  # it goes out with the tensor's first frame, in one system call
            channel.queue_frame(memoryview(agreement.signature + _EAGER.pack(-1 if eager is None else len(eager))))
            if eager is None:
                channel.flush(deadline)
        if eager is not None and not stream:
            channel.send(eager, deadline)

    def _settle(self, agreement: Agreement | None, deadline: float) -> None:
        """A rank's verdict: on a refusal the call ends (`_Refused`), its bytes sent all the same."""
        refusal = self._verdict(agreement, deadline)
        if refusal is not None:
            raise _Refused(refusal)

    def _meet(self, agreement: Agreement, deadline: float) -> None:
        """Every rank's record alone (no bytes after it), and the verdict: a barrier's whole, a refused call's part."""
        if self.rank == 0:
            self._judge(agreement, lambda _: -1, deadline)
        else:
            self._offer(agreement, None, deadline)
            self._settle(agreement, deadline)

    def _verdict(self, agreement: Agreement | None, deadline: float) -> Exception | None:
        """A rank's verdict from the hub (every rank's signature), judged: None to go on, or the call's error."""
        if agreement is None:
            return None
        rows = self.channels[0].recv_frame(self.size * SIGNATURE_BYTES, deadline)
        return agreement.check([bytes(rows[i : i + SIGNATURE_BYTES]) for i in range(0, len(rows), SIGNATURE_BYTES)])

    def _judge(self, agreement: Agreement | None, eager: Callable[[int], int], deadline: float) -> None:
        """The hub's side: every rank's record, then the verdict to each rank (queued: it goes out with the rank's
        next frame, or at the call's end, `_guard`). On a refusal every byte each rank
        said it sent is read and dropped (`_drain`), and the call ends (`_Refused`); where the ranks agree, each
        must have said it sends `eager(rank)` bytes (-1: none), else the group is over."""
        if agreement is None:
            return
        rows, said = [agreement.signature], {}
        for r in range(1, self.size):
            record = self.channels[r].recv_frame(RECORD_BYTES, deadline)
            rows.append(bytes(record[:SIGNATURE_BYTES]))
            (said[r],) = _EAGER.unpack(record[SIGNATURE_BYTES:])
        verdict = memoryview(b"".join(rows))
        for r in range(1, self.size):  # sent with the rank's next frame (its result, its peers' tensors), or flushed
            self.channels[r].queue_frame(verdict)
        refusal = agreement.check(rows)
        if refusal is not None:
            for r in said:
                self.channels[r].flush(deadline)
            for r, n in said.items():
                self._drain(r, n, deadline)
            raise _Refused(refusal)
        for r, n in said.items():
            if n != eager(r):
                raise LinkError(f"rank {r} said it sends {n} bytes before the verdict where {eager(r)} were due")

    def _drain(self, peer: int, n: int, deadline: float) -> None:
        """Read and drop the `n` bytes (-1: no frame) a rank sent before a verdict that refused the call: frame by
        frame into the channel's scratch buffer, each bounded (MAX_FRAME) and authenticated, never into a tensor."""
        left = n
        while left >= 0:
            self.channels[peer].recv_frame(min(left, MAX_FRAME), deadline)
            left -= MAX_FRAME
            if left <= 0:
                return

    def agree(self, agreement: Agreement) -> _Done:
        """A call this rank's daemon refused still takes its part in the agreement (its record, no bytes after it),
        so that every rank fails with a clear error and the group goes on; `agreement.check` gives this rank's."""

        def run(deadline: float) -> None:
            self._meet(agreement, deadline)
            raise LinkError("a refused call's agreement found no refusal")

        return self._guard(run)

    # ---- the collectives ----

    def allreduce(self, tensors: list[torch.Tensor], opts: Any, agreement: Agreement | None = None) -> _Done:
        """Frame by frame: each rank streams its tensor to the hub (from a thread of its own, while it
        receives); the hub reduces each frame's elements in rank order and streams the result back at once."""
        (t,) = tensors
        reducer = next((f for op, f in _REDUCERS if opts.reduceOp == op), None)
        if reducer is None:
            raise LinkError(f"reduce op {opts.reduceOp} is not supported by secure collectives")

        def run(deadline: float) -> None:
            host = _host(t)
            data, size = _bytes(host), host.element_size()
            flat = host.reshape(-1)
            if self.rank == 0:
                self._judge(agreement, lambda _: len(data), deadline)
                for start, end in _frames(len(data)):
                    acc = flat[start // size : end // size]
                    for r in range(1, self.size):  # rank order: ((t0 op t1) op t2) ...
                        plain = self.channels[r].recv_frame(end - start, deadline)
                        if host.dtype is torch.bool and bytes(plain).translate(None, b"\0\1"):
                            # before a kernel reads them: undefined behaviour in torch's (round 35, red35)
                            raise InvalidArgument(f"{_who(r)} sent bool bytes other than 0 and 1")
                        if end > start:
                            reducer(acc, torch.frombuffer(plain, dtype=host.dtype))
                    for r in range(1, self.size):
                        self.channels[r].send_frame(data[start:end], deadline)
            elif len(data) <= MAX_FRAME:
                # One frame (DDP's first bucket, a small model's whole gradient): sent whole, then the result read,
                # in this thread. The hub reads every rank's frame before it sends any result, and each rank sends
                # without waiting for anything, so the send always drains (round 36: a sending thread per call
                # cost a clone and two wake-ups, each several microseconds under gVisor; BENCHMARKS.md "dp36").
                self._offer(agreement, data, deadline)
                self._settle(agreement, deadline)
                self.channels[0].recv_into(data, deadline)
            else:
                # The hub sends frame k of the result only after it read frame k from here: receiving into
                # the tensor never overwrites bytes the sending thread has yet to encrypt. On a refusal the hub
                # reads every frame sent, so the sending thread ends.
                self._offer(agreement, data, deadline, stream=True)
                refused: list[Exception] = []

                def receive() -> None:
                    refusal = self._verdict(agreement, deadline)
                    if refusal is not None:
                        refused.append(refusal)
                    else:
                        self.channels[0].recv_into(data, deadline)

                _send_while(self.channels[0], data, deadline, receive)
                if refused:
                    raise _Refused(refused[0])
            if host is not t:
                t.copy_(host)

        return self._guard(run)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any, agreement: Agreement | None = None) -> _Done:
        (t,) = tensors
        root = int(opts.rootRank)

        def run(deadline: float) -> None:
            host = _host(t)
            if self.rank == 0:
                self._judge(agreement, lambda r: host.numel() * host.element_size() if r == root else -1, deadline)
                if root != 0:
                    self.channels[root].flush(deadline)  # nothing follows its verdict
                    self.channels[root].recv_into(_bytes(host), deadline)
                for r in range(1, self.size):
                    if r != root:
                        self.channels[r].send(_bytes(host), deadline)
            else:
                self._offer(agreement, _bytes(host) if self.rank == root else None, deadline)
                self._settle(agreement, deadline)
                if self.rank != root:
                    self.channels[0].recv_into(_bytes(host), deadline)
            if host is not t and self.rank != root:
                t.copy_(host)

        return self._guard(run)

    def allgather(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], *_: Any, agreement: Agreement | None = None
    ) -> _Done:
        (outs,), (inp,) = outputs, inputs

        def run(deadline: float) -> None:
            hosts = [_host(o) for o in outs]
            mine = _host(inp)
            if self.rank == 0:
                self._judge(agreement, lambda _: mine.numel() * mine.element_size(), deadline)
                hosts[0].copy_(mine)
                for r in range(1, self.size):
                    self.channels[r].recv_into(_bytes(hosts[r]), deadline)
                for r in range(1, self.size):
                    for i, h in enumerate(hosts):
                        if i != r:
                            self.channels[r].send(_bytes(h), deadline)
            else:
                self._offer(agreement, _bytes(mine), deadline)
                self._settle(agreement, deadline)
                hosts[self.rank].copy_(mine)
                for i, h in enumerate(hosts):
                    if i != self.rank:
                        self.channels[0].recv_into(_bytes(h), deadline)
            for o, h in zip(outs, hosts, strict=True):
                if h is not o:
                    o.copy_(h)

        return self._guard(run)

    def barrier(self, *_: Any, agreement: Agreement | None = None) -> _Done:
        def run(deadline: float) -> None:
            if agreement is not None:  # the agreement is the barrier: the hub answers once every record is in
                self._meet(agreement, deadline)
                return
            empty = memoryview(bytearray())
            if self.rank == 0:
                for r in range(1, self.size):
                    self.channels[r].recv_into(empty, deadline)
                for r in range(1, self.size):
                    self.channels[r].send(empty, deadline)
            else:
                self.channels[0].send(empty, deadline)
                self.channels[0].recv_into(empty, deadline)

        return self._guard(run)

    # ---- send and receive between two ranks (round 44) ----

    def p2p(self, transfers: list[Transfer]) -> _Done:
        """One rank's batch of sends and receives (what one wait of its program runs), each over the link with its
        peer (`Links`, formed now where it is not yet). Each transfer is a header frame (`_P2P`: tag, dtype code,
        elements, bytes) and its bytes; a receiver takes a peer's transfers in the order they were sent, each into its
        first receive from that peer of the same tag, and checks dtype and size before it writes a byte. Sends to each
        peer, and receives from each, run in a thread of their own, so that a ring (every rank sends to the next and
        receives from the one before) drains whatever the sizes. A transfer this rank's daemon refused still takes
        its part (a header marked refused; the bytes a peer sent read and dropped), so every receive of the batch
        either completes or fails with InvalidArgument and the links stay in step; the sender of a transfer its
        receiver refuses is not told (as gloo's): its receiver's error says why."""

        def run(deadline: float) -> None:
            assert self.links is not None
            self.links.ensure({t.peer for t in transfers}, deadline)
            jobs: list[Callable[[], Exception | None]] = []
            for peer in sorted({t.peer for t in transfers}):
                channel = self.links.channels[peer]
                out = [t for t in transfers if t.peer == peer and t.sending]
                into = [t for t in transfers if t.peer == peer and not t.sending]
                if out:
                    jobs.append(functools.partial(_p2p_send, channel, out, deadline))
                if into:
                    jobs.append(functools.partial(_p2p_receive, channel, into, deadline))
            errors = _run_all(jobs, self.close)
            first = errors[0] if errors else None
            if first is not None and not isinstance(first, GpupoolError):  # a link's failure first: the group is over
                raise first
            if first is not None:
                raise _Refused(first)

        return self._guard(run)


class Transfer:
    """One send or receive of a rank's batch (`SecureGroup.p2p`): `tensor` a contiguous tensor without a conjugate bit
    (None where this rank's daemon refused the call: `refused` says why), `code` its dtype's number in signatures."""

    def __init__(
        self, peer: int, tag: int, sending: bool, tensor: torch.Tensor | None, code: int, refused: Exception | None
    ) -> None:
        self.peer, self.tag, self.sending, self.tensor, self.code, self.refused = (
            peer, tag, sending, tensor, code, refused,
        )  # fmt: skip


def _p2p_send(channel: Channel, out: list[Transfer], deadline: float) -> Exception | None:
    """Every transfer of `out` to the peer, in order; the first this rank's daemon refused is returned."""
    first: Exception | None = None
    for t in out:
        if t.tensor is None:  # refused here: the receiver is told, and drops nothing
            channel.send_frame(memoryview(_P2P.pack(t.tag, -1, -1, -1)), deadline)
            first = first or t.refused
            continue
        host = _host(t.tensor)
        data = _bytes(host)
        channel.queue_frame(memoryview(_P2P.pack(t.tag, t.code, host.numel(), len(data))))  # with the first frame
        channel.send(data, deadline)
    return first


def _p2p_receive(channel: Channel, into: list[Transfer], deadline: float) -> Exception | None:
    """Every transfer the peer sends for `into`, each matched by tag in order; the first refusal is returned (the
    links stay in step), a link's failure raised."""
    peer, waiting, first = channel.peer, list(into), None
    for _ in range(len(into)):
        tag, code, numel, nbytes = _P2P.unpack(channel.recv_frame(_P2P.size, deadline))
        t = next((w for w in waiting if w.tag == tag), None)
        error: Exception | None = None
        if t is None:
            t = waiting[0]
            error = InvalidArgument(
                f"recv on gpupool: rank {peer} sent a tensor with tag {tag}, and this rank's receives from it in this "
                f"batch wait for tags {sorted({w.tag for w in waiting})}"
            )
        waiting.remove(t)
        if numel < 0:
            error = error or InvalidArgument(
                f"recv on gpupool: rank {peer}'s daemon refused its send (tag {tag}; its own error there says why)"
            )
            nbytes = -1
        elif t.tensor is None:
            error = error or t.refused
        elif error is None and (code != t.code or numel != t.tensor.numel()):
            error = InvalidArgument(
                f"send/recv on gpupool disagree (tag {tag}): rank {peer} sends {numel} elements of dtype "
                f"code {code}; this rank receives {t.tensor.numel()} elements of {t.tensor.dtype} (code {t.code})"
            )
        if error is not None:
            _drain_channel(channel, nbytes, deadline)
            first = first or error
            continue
        assert t.tensor is not None
        host = _host(t.tensor)
        data = _bytes(host)
        if nbytes != len(data):  # agreed dtype and elements: any other byte count is not a rank of this build
            raise LinkError(f"rank {peer} said it sends {nbytes} bytes of {numel} elements where {len(data)} were due")
        channel.recv_into(data, deadline)
        if host.dtype is torch.bool and bytes(data).translate(None, b"\0\1"):
            host.zero_()  # before a kernel reads them: undefined behaviour in torch's (as the allreduce checks)
            first = first or InvalidArgument(f"recv on gpupool: rank {peer} sent bool bytes other than 0 and 1")
        if host is not t.tensor:
            t.tensor.copy_(host)
    return first


def _drain_channel(channel: Channel, n: int, deadline: float) -> None:
    """Read and drop the `n` bytes (-1: no frame) a peer sent for a call refused here, frame by frame into the
    channel's scratch buffer (bounded and authenticated, never into a tensor)."""
    left = n
    while left >= 0:
        channel.recv_frame(min(left, MAX_FRAME), deadline)
        left -= MAX_FRAME
        if left <= 0:
            return


def _run_all(jobs: list[Callable[[], Exception | None]], fail: Callable[[], None]) -> list[BaseException]:
    """Run `jobs` at once (threads for all but the last, which runs here): what they raised (a link's failure, after
    which `fail` closes every link so that the others end at once, not at the deadline), then what they returned
    (their refusals)."""
    raised: list[BaseException] = []
    returned: list[BaseException] = []

    def one(job: Callable[[], Exception | None]) -> None:
        try:
            refusal = job()
        except BaseException as exc:
            raised.append(exc)
            fail()
            return
        if refusal is not None:
            returned.append(refusal)

    threads = [threading.Thread(target=one, args=(job,), name="gpupool-seclink-p2p", daemon=True) for job in jobs[:-1]]
    for th in threads:
        th.start()
    if jobs:
        one(jobs[-1])
    for th in threads:
        th.join()
    return [*raised, *returned]


def _send_while(channel: Channel, data: memoryview, deadline: float, receive: Callable[[], None]) -> None:
    """Send `data` from another thread while `receive` runs here (a rank cannot first send all of a large
    tensor and then read: the hub's result would fill the buffers both ways). The first error wins."""
    failed: list[BaseException] = []

    def send() -> None:
        try:
            channel.send(data, deadline)
        except BaseException as exc:  # reported by the receiving thread
            failed.append(exc)
            channel.close()  # wakes the receiver at once rather than at the deadline

    sender = threading.Thread(target=send, name="gpupool-seclink-send", daemon=True)
    sender.start()
    try:
        receive()
    except BaseException:
        channel.close()  # stops the sender too
        sender.join()
        if failed:  # the sender's error came first (its close is what the receiver saw)
            raise failed[0] from None
        raise
    sender.join()
    if failed:
        raise failed[0]


def _host(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor holding t's values (t itself when it is one)."""
    if t.device.type == "cpu" and t.is_contiguous():
        return t
    return t.detach().to("cpu", copy=True).contiguous()


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place."""
    if t.numel() == 0:
        return memoryview(bytearray())
    return t.reshape(-1).view(torch.uint8).numpy().data  # a uint8 array: format "B", one dimension


# ---- sockets with deadlines ----


def _set_deadline(sock: socket.socket, deadline: float, peer: int) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise LinkError(f"{_who(peer)} did not answer within the group's timeout")
    sock.settimeout(left)


def _recv_exact(sock: socket.socket, n: int, deadline: float, peer: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf), deadline, peer)
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview, deadline: float, peer: int) -> None:
    got = 0
    while got < len(view):
        _set_deadline(sock, deadline, peer)
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            raise LinkError(f"{_who(peer)} did not answer within the group's timeout") from None
        except OSError as exc:
            raise LinkError(f"the link with {_who(peer)} failed: {_why(exc)}") from None
        if n == 0:
            raise LinkError(f"{_who(peer)} closed the link (its daemon or session ended, or the group failed there)")
        got += n


def _who(peer: int) -> str:
    return "the peer" if peer < 0 else f"rank {peer}"


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
