"""Collectives between daemons: the daemon side of the `gpupool` torch.distributed backend.

The sessions of one multi-GPU lease (one per rank) form a process group among their daemons, so gradients
move daemon to daemon and never through the clients. A session joins with `GroupJoin`: the daemon verifies
its rank's lease token (of this session's lease and device, with the lease's `group` claim, which keys the
group; no other rank's token need leave its rank), or, for hand-minted tokens without that claim (and older
clients), the tokens of every rank (all of this session's lease, distinct devices, this session's own device at
its rank), and then, in the background, builds a `ProcessGroupGloo` (NCCL on real GPUs, where available) over
a TCPStore that rank 0's daemon hosts. Never the default group: a daemon hosts many sessions, and the group
belongs to the session (`WorkerSession.group`), closed with it.

Each `Collective`'s ranks first agree on a small signature (kind, op, root, counts, numels, dtype) so that ranks
that disagree get a clear INVALID_ARGUMENT on every rank instead of a hang or a corrupted buffer: on the secure
transport in the transfer's first frames (seclink.Agreement, round 40), on gloo by an all-gather of its own; then it
runs the collective in place on the session's tensors. A peer that dies or never calls fails the collective
within the group timeout (UNAVAILABLE); the group is then broken and every later collective fails at once.

Transport (`--collectives`): `secure` (the default) runs the collectives over server/seclink.py's links,
AES-256-GCM with keys from the group's secret, mutually authenticated; `gloo` is the operator's explicit
opt-in to torch's plaintext gloo (NCCL on real GPUs), faster and unencrypted.

Trust and its limits (docs/security.md, "Collectives between daemons"): tokens prove lease membership; only
the workers of a lease of several devices may open sockets at all (the token's `network` claim, bounded by
--worker-network); the store is plain TCP (its values HMAC-signed), meant for the hosts' private network. Every
listener of a group (rank 0's store and secure hub, a rank's store relay) takes a free port of the daemon's
`--collective-ports` range, and a rank connects to no store or hub port outside it (the same range on every daemon
of a pool): under Landlock ABI 4+ a worker granted network binds and connects to those ports only (round 42).
A group of one rank needs no socket: its collectives are the identity.

Subgroups (round 45; `dist.new_group(ranks)`, a DeviceMesh dimension): a session that joined its group joins a
subgroup of it with a `GroupJoin` naming the session's number for it and its members (`Collectives._join_subgroup`:
refused unless this rank is one); it is a `Group` of its own, formed over its group's store with a secret derived from
the group's, and its collectives (`Collective.subgroup`) run in the group's thread, in the session's order.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import queue
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Generator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gpupool import protocol
from gpupool._proto import device_pb2
from gpupool.errors import (
    FailedPrecondition,
    GpupoolError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from gpupool.peers import grown_caps, push_out, source_key
from gpupool.protocol import COLLECTIVE_PORTS
from gpupool.tokens import TokenClaims

from . import seclink
from .sessions import WorkerSession
from .speedmodel import SpeedModel

log = logging.getLogger(__name__)

MAX_RANKS = 1024
MAX_SUBGROUPS = 32  # a session's subgroups of its group (each holds its links: a mesh of 5 dimensions joins 5)
# (round 46) a session's subgroups left (`GroupLeave`) before they formed, whose close waits in the group's thread
# behind their formation: each holds no socket until its formation runs, and is closed right after it
MAX_LEAVING = 256
# (round 46) the distinct member lists of the subgroups a session joined over its life, each with its count: a
# subgroup's secret takes it (`_join_subgroup`), so that a subgroup made again after its like was left never meets
# the keys of the one before in the store. Bounded: a hostile client's joins and leaves of ever new lists grow it.
MAX_MEMBER_LISTS = 4096
DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 300.0  # the longest a collective waits for its peers (group formation, each call)
# The longest a waiting collective holds its device's thread while another session of the device waits to run: it
# waits in its group's thread, and each slice of its session looks for the outcome in steps this long, then lets
# the device run the others (a tenant that held back its other rank held a shared device up to MAX_TIMEOUT per
# call until round 18). While nobody else waits it keeps looking: a lone job pays no slice per step.
POLL_SECONDS = 0.005
STOP_POLL_SECONDS = seclink.STOP_POLL_SECONDS  # how soon a closed session's join gives up
RELAY_BACKLOG = 1024  # a relay's listen backlog (the kernel caps it at net.core.somaxconn): a flood of strangers'
# connections is accepted and closed in batches of up to this many, one walk of /proc/self/fd a batch (`_keep_own`)
STORE_ATTEMPT_SECONDS = 0.5  # a rank's attempts to reach rank 0's store: how soon a closed session's join gives up
# the addresses of a store's name a join tries (in the resolver's order): a hostile name's hundreds of black-holed
# addresses took STORE_ATTEMPT_SECONDS each, one after another, with no look at the session's close (round 22)
MAX_STORE_ADDRESSES = 8
STORE_BACKOFF_SECONDS = 30.0  # the longest wait between store constructors that failed on an address that accepts
TRANSPORTS = protocol.COLLECTIVE_TRANSPORTS  # --collectives: encrypted links, or plaintext gloo/NCCL
KINDS = ("allreduce", "broadcast", "allgather", "reduce_scatter", "barrier")
_REDUCE = {"sum": dist.ReduceOp.SUM, "product": dist.ReduceOp.PRODUCT, "min": dist.ReduceOp.MIN,
           "max": dist.ReduceOp.MAX, "avg": dist.ReduceOp.SUM}  # fmt: skip
_OPS = ("", "sum", "avg", "product", "min", "max")
_SIGNATURE = struct.Struct("!8q")  # a signature on the secure links (seclink.SIGNATURE_BYTES)
P2P = "p2p"  # a rank's batch of sends and receives (round 44; `Collectives._p2p`), not a collective of every rank
_REFUSED = -1  # a signature's kind where its rank's daemon refused the call (`Collectives._agree`)
# Each dtype's number in a call's signature (`_agree`), so that ranks calling with different dtypes are refused
# alike before a byte moves. Every dtype the wire carries has its own (the complex ones since round 35: both were
# "99", so a complex64 call agreed with a complex128 one of as many elements, and gloo's receiving thread met twice the
# bytes it expected and aborted the process, under --isolation thread the daemon with every tenant's sessions);
# any other is told apart by its element size (`_dtype_code`). Append only: the numbers go between daemons.
_DTYPES = {d: i for i, d in enumerate([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                       torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                                       torch.complex64, torch.complex128])}  # fmt: skip

Verifier = Callable[[str], TokenClaims]


class Group:
    """One session's membership in its lease's process group."""

    def __init__(
        self,
        lease_id: str,
        rank: int,
        size: int,
        timeout: float,
        transport: str = "secure",
        ports: tuple[int, int] = COLLECTIVE_PORTS,
        own: tuple[int, int] | None = None,
    ) -> None:
        self.lease_id = lease_id
        self.ports = ports  # --collective-ports: the peers' ports it connects to
        self.own = own or ports  # where its listeners bind: its session's block of them (server/portshare.py)
        self.transport = transport
        self.nccl = True  # a gloo transport's CUDA group may try NCCL (`use_nccl`)
        self.rank = rank
        self.size = size
        self.timeout = timeout
        self.ready = threading.Event()
        self.pg: Any = None
        self.store: Any = None
        self.front: _StoreFront | None = None  # (hole53) rank 0's: the store's port that peers reach
        self.broken: str | None = None
        self.closed = False
        self.stop = threading.Event()  # set by `close`: a join still in progress gives up (its thread and sockets end)
        self.store_deadline: float | None = None  # a rank > 0 still reaching the store reports failure by then
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] | None = None  # its collectives' thread's
        # (round 45) a subgroup's: the session's group it is formed over, and its members' ranks there; a session's
        # group's: its subgroups by the session's number for each (`Collectives._join_subgroup`)
        self.parent: Group | None = None
        self.members: tuple[int, ...] = ()
        self.subgroups: dict[int, Group] = {}
        self.secret = ""  # its store's and links' (`group_secret`): a subgroup's is derived from it
        self.keys: _SignedStore | None = None  # (store56) an NCCL subgroup's, until its first collective: `forget_ids`
        # (round 46) a session's group's: its subgroups left before they formed, closed in its thread after their
        # formation (`Collectives.leave`); and how many subgroups of each member list (by digest) it ever joined
        self.leaving: list[Group] = []
        self.made: dict[bytes, int] = {}

    def submit(self, job: Callable[[], None], name: str, threads: int) -> None:
        """Run `job` (a collective's call and wait) in the group's thread, started at its first collective with
        the device thread's torch settings, ended by `close` (a thread a collective cost ~0.2-0.3 ms of CPU
        here, most of it torch's per-thread setup). The session runs one collective at a time: a subgroup's run in
        its session's group's thread, in the order the session called them (as NCCL's groups on one CUDA stream)."""
        if self.parent is not None:
            self.parent.submit(job, name, threads)
            return
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=_serve, args=(self._jobs, threads), name=name, daemon=True).start()
        self._jobs.put(job)

    def describe(self) -> str:
        if self.parent is not None:
            return f"rank {self.rank} of {self.size} of subgroup {list(self.members)} (lease {self.lease_id})"
        return f"rank {self.rank} of {self.size} (lease {self.lease_id})"

    def form(self, store: Any, owner: str, secret: str, host: str, device: torch.device) -> None:
        """Build the process group (blocks until every rank has joined or the timeout passes). The group's
        keys (gloo's rendezvous: each rank's address) live under a prefix derived from `secret` (`group_secret`
        of the lease's group claim, or of rank 0's token without one), not the public lease id, and each value
        carries an HMAC under `secret` (_SignedStore): a stranger who reaches the store can neither find them nor
        forge or alter one unnoticed. The secure transport keys its links from the same secret (server/seclink.py)."""
        keys: _SignedStore | None = None
        try:
            if self.rank == 0 and self.parent is None:  # the others checked it before (`join`'s `run`: _check_owner)
                dist.PrefixStore(f"gpupool/{self.lease_id}/", store).set("owner", owner)
            name = hashlib.sha256(b"gpupool-group-keys:" + secret.encode()).hexdigest()
            keys = _SignedStore(dist.PrefixStore(f"gpupool/{name}/", store), secret.encode(), self.stop, self.timeout)
            if self.transport == "secure":
                pg = seclink.form(
                    keys,
                    secret.encode(),
                    self.lease_id,
                    self.rank,
                    self.size,
                    self.timeout,
                    host,
                    self.stop,
                    self.ports,
                    self.own,
                )
                if self.closed:  # the session ended as the group formed: its links go with it
                    pg.close()
                else:
                    self.pg = pg
            else:
                pg = _process_group(keys, self.rank, self.size, self.timeout, host, device, self.nccl)
                if self.parent is not None and not _is_nccl(pg):
                    # (round 46) a subgroup's keys (each rank's address) go once every rank has read them: past a
                    # barrier every member has built its group (NCCL's: not here, no GPU to check it on)
                    try:
                        pg.barrier().wait()
                    except BaseException:
                        _shutdown(pg)
                        raise
                    keys.forget()
                elif self.parent is not None:  # (store56) NCCL's: its communicator's id is set at its first
                    self.keys = keys  # collective, not here (`forget_ids`; on the base it stayed in the store)
                if self.closed:  # the session ended as the group formed: its connections go with it
                    _shutdown(pg)
                else:
                    self.pg = pg
        except Exception as exc:  # any failure here is reported at the group's first collective
            self.broken = f"joining the collective group as {self.describe()} failed: {_short(exc)}"
            log.warning("%s", self.broken)
            if self.parent is not None and keys is not None:  # its group failed here: this rank's keys lead
                keys.forget()  # nowhere (its members fail alike)
        finally:
            self.ready.set()

    def forget_ids(self) -> None:
        """(store56) An NCCL subgroup's keys, deleted once its first collective returned: torch's ProcessGroupNCCL
        makes its communicator there, not as the group forms (its rank 0 sets the id, the others get it), and the
        communicator's init blocks until every member has it. They stayed: a script's new_group/destroy loop over NCCL
        grew rank 0's store by a subgroup's id each, until its bound refused the next (sec55b). Gloo's and the secure
        transport's go as they form (`form`)."""
        if self.keys is not None:
            keys, self.keys = self.keys, None
            keys.forget()

    def not_formed(self) -> str:
        """What the client learns of any failure to reach the group's store: the address's state (refused, timed
        out, accepting but no store, another group's store) stays in the daemon's log (_STORE_LOG)."""
        return f"the collective group of lease {self.lease_id} did not form within {self.timeout:g} s"

    def wait_ready(self) -> Any:
        wait = self.timeout
        if self.store is None and self.store_deadline is not None:  # as every failed store join: by its deadline
            wait = min(wait, max(0.0, self.store_deadline - time.monotonic()))  # (a hung TCPStore constructor too)
        if not self.ready.wait(wait):
            self.broken = self.not_formed()
        if self.broken:
            raise Unavailable(self.broken)
        return self.pg

    def close(self) -> None:
        self.closed = True
        self.stop.set()  # a join in progress (rank 0's hub, a wait on the store) gives up within STOP_POLL_SECONDS
        self.broken = self.broken or "the session closed"
        self.ready.set()  # a collective waiting for the group to form fails now, not at the group's timeout
        if self._jobs is not None:
            self._jobs.put(None)  # its thread ends once the collective it runs (if any) has failed
        if isinstance(self.pg, seclink.SecureGroup):
            self.pg.close()
        elif self.pg is not None and self.parent is not None and not isinstance(self.pg, _Solo):
            _shutdown(self.pg)  # (round 46) a subgroup left mid-job: gloo's (NCCL's) connections close now
        if self.front is not None:
            self.front.close()
        self.pg, self.store = None, None
        for sub in [*self.subgroups.values(), *self.leaving]:  # formed over this group: they end with it
            sub.close()


def timedelta_seconds(t: Any) -> float:
    return t.total_seconds() if isinstance(t, timedelta) else float(t)


class _Relay:
    """The join's own loopback relay between its TCPStore client and the store's address: the client connects to the
    relay's port (one of `ports`, --collective-ports: the only ports a network worker may bind), the relay forwards
    bytes both ways over `upstream` (the connection the join opened to the store's address), and closes both
    connections once `stop` is set (the session closed), at `close_at` (set while the client's constructor runs: the
    join's deadline), or when either side closes. torch's TCPStore client waits for the store's answers without its
    timeout (2.13: its constructor's handshake, and each call after) and cannot be interrupted from Python, so a
    store address that accepts and never answers held the join's thread and socket for the daemon's life (round 22);
    the relay's close is an end of stream the client sees. Since round 53 it reads the store protocol as it passes
    (`_Scan`: `_queries`, `_replies`) and closes both connections at a length past MAX_STORE_VALUE, a reply no query
    asked for or a query the rendezvous never sends: torch's client allocated whatever length a reply named. It accepts
    one connection, from this process's TCPStore client, and then listens no more: a connection from any other process
    on the host (a client on the same machine, another session's worker with a network token) is closed unread
    (`_keep_own`; round 23 forwarded the first connection to arrive, whoever made it: store traffic on this
    join's connection, and the join's own client refused)."""

    def __init__(
        self, upstream: socket.socket, stop: threading.Event, ports: tuple[int, int] = COLLECTIVE_PORTS
    ) -> None:
        self.upstream, self.stop = upstream, stop
        self.close_at: float | None = None
        self.listener = seclink.bind_in(ports, _loopback_listener)
        self.host, self.port = self.listener.getsockname()[:2]
        self.done = threading.Event()
        threading.Thread(target=self._pump, name="gpupool-store-relay", daemon=True).start()

    def _over(self) -> bool:
        return self.stop.is_set() or (self.close_at is not None and time.monotonic() >= self.close_at)

    def _pump(self) -> None:
        client: socket.socket | None = None
        try:
            self.listener.settimeout(STOP_POLL_SECONDS)
            while client is None:
                if self._over():
                    return
                try:
                    first, _ = self.listener.accept()
                except TimeoutError:
                    continue
                client = _keep_own(self._accept_pending([first]))
            self._close_listener()
            asked: collections.deque[list[int]] = collections.deque()  # (store53) the store protocol, read both ways
            scans = {client: _Scan(_queries(asked)), self.upstream: _Scan(_replies(asked))}
            _forward(client, self.upstream, self._over, scans)
        except StoreRefused as exc:
            _STORE_LOG.warning("a group's store relay closed: %s", exc)
        except OSError:
            return
        finally:
            self._close_listener()
            for end in (self.upstream, client):
                if end is not None:
                    end.close()
            self.done.set()

    def _accept_pending(self, batch: list[socket.socket]) -> list[socket.socket]:
        """`batch` and every connection already waiting in the listener's queue (up to RELAY_BACKLOG), accepted
        without waiting: one walk of this process's sockets then answers for all of them (`_keep_own`)."""
        self.listener.setblocking(False)
        try:
            while len(batch) < RELAY_BACKLOG:
                try:
                    batch.append(self.listener.accept()[0])
                except (BlockingIOError, InterruptedError):
                    break
        finally:
            self.listener.settimeout(STOP_POLL_SECONDS)
        return batch

    def _close_listener(self) -> None:
        """Close the listener and take its port off `_RELAY_PORTS` (once)."""
        if self.listener.fileno() >= 0:
            self.listener.close()
            _unlist(self.port)


# (store53) The store protocol the relay reads: torch 2.13's TCPStore (c10d TCPStoreBackend.hpp `QueryType`). A store's
# reply is read against the query that asked for it: a length past MAX_STORE_VALUE, bytes no query asked for, or a
# query the daemon's store client never sends close the relay (both connections) before the client reads a byte of
# it. torch's client allocated and zero-filled the length a store's reply named before a byte of the value came: a
# store a tenant named (its own listener on the hosts' network) answered a `get` with 1 GiB and grew rank > 0's
# worker (under --isolation thread the daemon) by 1 GiB (secrev52).
MAX_STORE_VALUE = 1 << 20  # a key or value of the store (the rendezvous's are a few hundred bytes: measured)
MAX_STORE_KEYS = 1 << 16  # the keys of one check or wait
# (front54) What the holders of a group's secret may keep in rank 0's store through its front (`_StoreTally`):
MAX_STORE_BYTES = 4 << 20  # keys and values in all (gloo's rendezvous of 32 ranks: 16,773; bench/store_front_tally.py)
# (store56) ... and more with the group's size: gloo's rendezvous keeps ~270 + 8 x ranks bytes a rank (its address, a
# word a peer: 4 MiB at ~700 ranks; MAX_RANKS 1,024), a subgroup of them all as much again while it forms
STORE_RANK_BYTES = 1024  # a rank's room past MAX_STORE_BYTES (`_StoreTally.room`): this + STORE_PEER_BYTES a rank
STORE_PEER_BYTES = 16  # (1,024 ranks: 17.8 MB more; gloo's group and a subgroup of all its ranks: 17.4 MB)
MAX_FRONT_KEYS = 16384  # distinct keys (gloo, 32 ranks: 34; the secure links' p2p keys of every pair: 992)
MAX_FRONT_ASKED = 2  # queries a connection has not had answered (torch's client asks one at a time)
# (sec55b) bytes of queries and replies in flight through the front, all the group's connections together (`_Flight`):
MAX_FRONT_FLYING = 8 << 20  # (each connection alone held up to ~6 MiB: at 32 ranks + 8 spare ~250 MiB; gloo's 32
# ranks: at most 8,189 at once, bench/store_front_tally.py; one query of the largest: a compare_set's 3 MiB + reply)
ADDED_BYTES = 20  # an add's counter, counted as the longest int64 it may hold
_VALIDATE, _SET, _COMPARE_SET, _GET, _ADD, _CHECK, _WAIT, _NUM_KEYS, _DELETE_KEY = range(9)
_CANCEL_WAIT, _PING = 12, 13
_VECTOR, _WAITING = -1, -2  # replies: a length and its bytes; a wait's answer (a byte, two after a cancel's)


class StoreRefused(ValueError):
    """The relay read what it refuses in the store protocol (both connections close)."""


class _Scan:
    """One direction of a relay's stream, read as it passes by `script`, a generator that yields how many bytes it
    needs next (n > 0: those bytes are sent back to it; n < 0: -n bytes to pass unread, a key's or value's; 0: what
    it read so far may pass) and raises StoreRefused on what it refuses. Holds at most one length field: values pass
    through in chunks. `feed` returns the bytes that may pass on: all it was given, or with `hold` (front54: rank 0's
    front) those up to the script's last 0, so that nothing of a query it refuses reaches the store (what it holds: a
    query's header, its keys, a compare_set's expected value)."""

    def __init__(self, script: Generator[int, bytes, None], hold: bool = False) -> None:
        self._script = script
        self._hold, self._held, self._out, self._open = hold, bytearray(), bytearray(), False
        self._buf = bytearray()
        self._want = 0
        self.refused: StoreRefused | None = None  # what it refused (`feed` returned what passes before it)
        self._next(next(script))

    def _next(self, want: int) -> None:
        while not want:  # what it read may pass on
            if self._hold:
                self._out += self._held
                self._held.clear()
            self._open = True
            want = self._script.send(b"")
        self._open = self._open and want < 0
        self._want = want

    def feed(self, data: bytes) -> bytes:
        try:
            self._take(memoryview(data))
        except StoreRefused as exc:  # (with `hold`, the queries before it in `data` still pass: then it is raised)
            self.refused = exc
            if not self._hold:
                return b""
        if not self._hold:
            return data
        out = bytes(self._out)
        self._out.clear()
        return out

    def _take(self, view: memoryview) -> None:
        while view:
            if self._want < 0:
                n = min(-self._want, len(view))
                if self._hold:
                    (self._out if self._open else self._held).extend(view[:n])
                view, self._want = view[n:], self._want + n
                if not self._want:
                    self._next(self._script.send(b""))
                continue
            n = min(self._want - len(self._buf), len(view))
            self._buf += view[:n]
            if self._hold:
                self._held += view[:n]
            view = view[n:]
            if len(self._buf) == self._want:
                got = bytes(self._buf)
                self._buf.clear()
                self._next(self._script.send(got))


def _length(raw: bytes, what: str) -> int:
    n = int.from_bytes(raw, "little")
    if n > MAX_STORE_VALUE:
        raise StoreRefused(f"{what} of {n} bytes (at most {MAX_STORE_VALUE})")
    return n


def _string(what: str, flight: _Flight | None = None, read: bool = True) -> Generator[int, bytes, bytes]:
    """A length and its bytes: passed unread, or (`flight`: rank 0's front, which counts keys) read and returned; with
    `flight` its bytes are in flight (sec55b: taken before a byte of them is held)."""
    n = _length((yield 8), what)
    if flight is not None:
        flight.take(n)
    if n and flight is not None and read:
        return (yield n)
    if n:
        yield -n
    return b""


def _value(flight: _Flight | None, key: bytes, replace: bool) -> Generator[int, bytes, None]:
    """A value set under `key`: its length counted (`flight`'s tally; in flight too) before a byte of it passes, and
    (store56) whether it is a counter (`_counter`; a value of at most ADDED_BYTES bytes is read and held until then)."""
    n = _length((yield 8), "a value")
    if flight is None:
        yield 0
        if n:
            yield -n
        return
    flight.take(n)  # (first: a set refused here changes nothing the store keeps)
    flight.tally.set(key, n, replace, 0 < n <= ADDED_BYTES and _counter((yield n)))
    yield 0
    if n > ADDED_BYTES:
        yield -n


def _counter(value: bytes) -> bool:
    """(store56) Whether torch's store can add to `value`: a decimal int64 (a sign, digits), as its `add` writes one.
    Its `add` parses the value it holds (std::stoll) and, on one that is no number, writes c10d's "Error processing
    client message: stoll" to its stderr (under --isolation thread the daemon's) and closes the connection: a keyed
    client's `set` of "abc" and `add` on one connection did it once a connection, ~22 lines a second (audit55)."""
    if not 0 < len(value) <= ADDED_BYTES:  # (first: rank 0's own values of up to 1 MiB are not copied)
        return False
    digits = value[1:] if value[:1] in (b"-", b"+") else value
    return digits.isdigit() and -(1 << 63) <= int(value) < 1 << 63


def _queries(
    asked: collections.deque[list[int]], tally: _StoreTally | None = None, flight: _Flight | None = None
) -> Generator[int, bytes, None]:
    """The store client's queries (this process's TCPStore client: what the daemon's rendezvous sends), each noted in
    `asked` with the reply it takes, for `_replies`. With `tally` (front54: rank 0's front, queries of any holder of
    the group's secret) the keys are read and what the store keeps is counted against the group's bounds; and
    (sec55b) each query's bytes are in flight (`flight`, the connection's share of the group's MAX_FRONT_FLYING)
    until the store has them (a set) or its reply has passed (`_replies`), with the largest value the group set for
    a get's or compare_set's reply."""
    if tally is not None and flight is None:
        flight = _Flight(tally)
    while True:
        (query,) = yield 1
        held = flight.queried if flight is not None else 0
        reply = 0  # bytes of a fixed-size reply; 0: none
        if query in (_VALIDATE, _PING):
            yield 4
            reply = 4 if query == _PING else 0
        elif query == _SET:
            key = yield from _string("a key", flight)
            yield from _value(flight, key, True)
        elif query in (_GET, _COMPARE_SET, _ADD, _DELETE_KEY):
            key = yield from _string("a key", flight)
            if query == _COMPARE_SET:
                yield from _string("a value", flight, read=False)  # the expected one (not kept)
                yield from _value(flight, key, False)  # the new one, where the expected one is there
            if query == _ADD:
                yield 8
                if flight is not None:
                    flight.tally.add(key)
            if query == _DELETE_KEY and flight is not None:
                flight.tally.delete(key)
            reply = _VECTOR if query in (_GET, _COMPARE_SET) else 8
            if flight is not None and reply == _VECTOR:
                flight.take(flight.tally.largest)  # its reply (the store makes it before the front reads a byte)
        elif query in (_CHECK, _WAIT):
            keys = int.from_bytes((yield 8), "little")
            if keys > MAX_STORE_KEYS:
                raise StoreRefused(f"a query of {keys} keys (at most {MAX_STORE_KEYS})")
            total = 0
            for _ in range(keys):
                total += len((yield from _string("a key", flight)))
                if total > MAX_STORE_VALUE:  # (front54; a wait's keys stay in the store until it is answered)
                    raise StoreRefused(f"a query's keys of more than {MAX_STORE_VALUE} bytes")
            reply = 1 if query == _CHECK else _WAITING
        elif query == _NUM_KEYS:
            reply = 8
        elif query == _CANCEL_WAIT:
            if asked and asked[-1][0] == _WAITING and len(asked[-1]) == 2:  # (audit55: a 2nd cancel: a query)
                asked[-1].append(1)  # the wait's answer: its own byte and then the cancel's, or the cancel's alone
                yield 0
                continue
            reply = 1  # the wait was answered already: the cancel's own
        else:
            raise StoreRefused(f"a store query of type {query}, which the daemon's rendezvous never sends")
        flying = flight.queried - held if flight is not None else 0
        if reply:
            if flight is not None and len(asked) >= MAX_FRONT_ASKED:
                raise StoreRefused(f"more than {MAX_FRONT_ASKED} queries unanswered on one connection")
            asked.append([reply, flying])
        yield 0
        if flight is not None and flying and not reply:  # (a set's value passed: the store holds it, counted as kept)
            flight.give(flying)


class _StoreTally:
    """(front54) What the holders of a group's secret set into rank 0's store through its front, all its
    connections together: each key's bytes (key and value; an `add`'s counter as ADDED_BYTES), at most
    MAX_STORE_BYTES in all and MAX_FRONT_KEYS keys, checked before a byte of the value passes (`_value`). A set
    replaces its key's count, a compare_set or add (which may leave the old value) keeps the larger, a delete_key
    frees it. What rank 0's daemon sets itself (its own client reaches the store directly) is counted too, by
    `_CountedStore` (sec55b; front54 did not count it). (store56) The bytes' bound grows with the group's size
    (`room`), and an add to a key whose value may be no counter is refused (`add`)."""

    def __init__(self, size: int = 0) -> None:
        self._lock = threading.RLock()  # (`add` sets under it)
        self._keys: dict[bytes, int] = {}
        self.bytes = 0
        self.peak_bytes = self.peak_keys = 0  # (the bound's measurement: bench/store_front_tally.py)
        self.largest = 0  # (sec55b) the largest value ever set: what a get's reply may be
        self.flying = self.peak_flying = 0  # (sec55b) bytes in flight through the front (`_Flight`), all connections
        self._words: set[bytes] = set()  # (store56) the keys whose value may be no counter (`_counter`): no add
        self.room = size * (STORE_RANK_BYTES + STORE_PEER_BYTES * size)  # (store56) the ranks' past MAX_STORE_BYTES

    def set(self, key: bytes, n: int, replace: bool, counter: bool = True) -> None:
        """A set (`replace`; a compare_set or add: not) of `n` bytes under `key`, a counter or not (`_counter`)."""
        with self._lock:
            old = self._keys.get(key)
            if old is None and len(self._keys) >= MAX_FRONT_KEYS:
                raise StoreRefused(f"a key past the group's {MAX_FRONT_KEYS} keys")
            if not replace and old is not None:
                n = max(n, old)
            total = self.bytes - (len(key) + old if old is not None else 0) + len(key) + n
            if total > MAX_STORE_BYTES + self.room:
                raise StoreRefused(f"{total} bytes in the group's store (at most {MAX_STORE_BYTES + self.room})")
            self._keys[key] = n
            self.bytes, self.largest = total, max(self.largest, n)
            self.peak_bytes, self.peak_keys = max(self.peak_bytes, total), max(self.peak_keys, len(self._keys))
            if not counter:  # (a compare_set's new value may not have taken: the key may hold a counter or this)
                self._words.add(key)
            elif replace:
                self._words.discard(key)

    def add(self, key: bytes) -> None:
        """(store56) An add to `key`'s counter: refused where the key may hold a value that is no counter, as the
        front read the group's writes (the store would fail to parse it, write c10d's line and close the connection)."""
        with self._lock:
            if key in self._words:
                raise StoreRefused("an add to a key whose value is no decimal integer (the store's counter)")
            self.set(key, ADDED_BYTES, False)

    def delete(self, key: bytes) -> None:
        with self._lock:
            self._words.discard(key)
            old = self._keys.pop(key, None)
            if old is not None:
                self.bytes -= len(key) + old

    def fly(self, n: int) -> None:
        """(sec55b) `n` bytes more in flight (n < 0: fewer): StoreRefused past MAX_FRONT_FLYING."""
        with self._lock:
            if n > 0 and self.flying + n > MAX_FRONT_FLYING:
                raise StoreRefused(
                    f"{self.flying + n} bytes of queries and replies in flight through the group's store's front "
                    f"(at most {MAX_FRONT_FLYING}, all its connections)"
                )
            self.flying += n
            self.peak_flying = max(self.peak_flying, self.flying)


class _Flight:
    """(sec55b) One connection's bytes in flight through rank 0's front (`_queries`, `_replies`), counted in its
    group's `_StoreTally` (`fly`) until the store holds them or their reply passed, all of them given back when the
    connection closes (`close`). A connection alone held up to ~6 MiB (a query's key and a compare_set's expected
    value held by the front, a value on its way to the store, two waits' keys and replies in the store), and the front
    takes the group's size + 8 of them (size up to MAX_RANKS): now MAX_FRONT_FLYING is the whole group's."""

    def __init__(self, tally: _StoreTally) -> None:
        self.tally, self.held = tally, 0
        # (audit56) what its queries took, never its replies: `_queries` counts one query's bytes by it (by `held`,
        # a reply passing while a query came in part by part was given back or taken again with that query's)
        self.queried = 0

    def take(self, n: int, reply: bool = False) -> None:
        if n:
            self.tally.fly(n)
            self.held += n
            self.queried += 0 if reply else n

    def give(self, n: int) -> None:
        self.held -= n
        self.tally.fly(-n)

    def close(self) -> None:
        self.give(self.held)


def _replies(asked: collections.deque[list[int]], flight: _Flight | None = None) -> Generator[int, bytes, None]:
    """The store's replies, each read as the reply of the query it answers (`_queries`' `asked`, in order: [its
    reply, its bytes in flight, a cancel's byte]); (sec55b) with `flight` its bytes in flight are given back once it
    passed, a value's length past what its query took taken first."""
    while True:
        first = yield 1
        if not asked:
            raise StoreRefused("the store sent bytes that no query asked for")
        reply = asked.popleft()
        if reply[0] == _VECTOR:
            n = _length(first + (yield 7), "a value in the store's reply")
            if flight is not None and n > reply[1]:
                flight.take(n - reply[1], reply=True)
                reply[1] = n
            if n:
                yield -n
        elif reply[0] == _WAITING:
            while len(reply) > 2 and first == b"\0":  # canceled: its answer came before the cancel's
                first = yield 1
        elif reply[0] > 1:
            yield reply[0] - 1
        if flight is not None:
            flight.give(reply[1])


# The ports of this process's live store relays (bound, until their pump ends). A store address is never one: under
# --isolation thread every session's join runs in the daemon's process, so to a relay another join's connection to
# its "store" was "from this process" (round 42 review: a join naming 127.0.0.1:<another join's relay port>, a port
# of the range, took that relay's one connection: its store client talked to the other group's store, and the other
# join's own client was refused). `_connect_store` refuses such an address, before it connects and after.
_RELAY_PORTS: collections.Counter[int] = collections.Counter()  # (a count: a closed listener's port is bound again)
_RELAY_LOCK = threading.Lock()


def _own_relay(sockaddr: Any) -> bool:
    ip, port = _address(sockaddr)
    with _RELAY_LOCK:
        return ipaddress.ip_address(ip).is_loopback and _RELAY_PORTS[port] > 0


def _unlist(port: int) -> None:
    with _RELAY_LOCK:
        _RELAY_PORTS[port] -= 1
        if _RELAY_PORTS[port] <= 0:
            del _RELAY_PORTS[port]


def _loopback_listener(port: int, relay: bool = True) -> socket.socket:
    """A relay's listener on PORT of a random address of 127.0.0.0/8 (`_relay_address`; 127.0.0.1 where that address
    is not there), with a backlog of RELAY_BACKLOG. SO_REUSEADDR: the relay closes its connection first, so the port
    sits in TIME_WAIT for 60 s after; without it that port took no bind for as long (round 42 review: a loop of joins
    and closes used up --collective-ports for every group of the host). Another listener on the port it still
    refuses. (hole53) Rank 0's store's too (`relay` False: not listed in `_RELAY_PORTS`, where a rank of the same
    daemon dialing its front's port, the same number on 127.0.0.1, would be refused)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listed = False
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((_relay_address(), port))
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
            listener.bind(("127.0.0.1", port))  # a loopback of 127.0.0.1 alone
        if relay:
            with _RELAY_LOCK:  # before it listens: no connection reaches it unregistered
                _RELAY_PORTS[listener.getsockname()[1]] += 1
            listed = True
        listener.listen(RELAY_BACKLOG)
    except OSError:
        if listed:
            _unlist(listener.getsockname()[1])
        listener.close()
        raise
    return listener


def _relay_address() -> str:
    """A random address of 127.0.0.0/8 (not .0, .255 nor 127.0.0.1) for a relay to listen on. Any process of the host
    may connect to a relay's port (a worker granted network: the ports of --collective-ports), and one local process
    of threads of connects outruns any accept loop it shares the CPU with (round 43: the relay accepted ~2,000 a
    second, ~28 us of CPU each, against ~50,000 connects a second of 16 threads), so its queue stayed full and the
    join's own client's SYNs were dropped. A flood of 127.0.0.1:PORT now reaches no relay; a worker cannot read the
    host's table of connections (/proc/net, landlock.PROC_SELF_WITHHELD) to learn the address, and ~2^24 addresses a
    port are too many to try within a join."""
    while True:
        address = 0x7F000000 | secrets.randbits(24)
        if address & 0xFF not in (0, 255) and address != 0x7F000001:
            return str(ipaddress.IPv4Address(address))


def _address(sockaddr: Any) -> tuple[str, int]:
    """(IP, port) of a socket address, an IPv4-mapped IPv6 address as its IPv4 one (torch's TCPStore client dials
    IPv6 sockets)."""
    ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(sockaddr[1])


def _keep_own(batch: list[socket.socket]) -> socket.socket | None:
    """The first connection of `batch` (accepted on a relay's listener) whose other end this process holds
    (`_this_process_ends`: one walk of /proc/self/fd for the whole batch); every other one is closed at once with a
    reset (SO_LINGER 0: no TIME_WAIT left on the relay's port by a flood), unread. Round 42 walked /proc/self/fd
    for each connection and listened with a backlog of 8: one local process of 16 threads of connects held a join's
    client out for 7.1 s, once for over 60 s (hostrev43)."""
    client: socket.socket | None = None
    try:
        ends = _this_process_ends({conn.fileno() for conn in batch})
    except Exception:  # whatever fails: none is known to be ours
        ends = set()
    for conn in batch:
        try:
            own = client is None and (_address(conn.getpeername()), _address(conn.getsockname())) in ends
        except (OSError, ValueError):
            own = False
        if own:
            client = conn
            continue
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        conn.close()
    return client


def _this_process_ends(skip: set[int]) -> set[tuple[tuple[str, int], tuple[str, int]]]:
    """(own address, peer address) of each connected TCP socket this process holds but the descriptors `skip`: its
    descriptors (/proc/self/fd) that are sockets, asked of the socket itself (a duplicate of the descriptor:
    getsockname, getpeername). A connection accepted on loopback is from this process when (its peer, its own
    address) is one of them. Until round 42 this read the host's table of TCP connections (/proc/net/tcp, tcp6) for
    the socket's inode, and so every worker granted network could read every connection of the host."""
    ends: set[tuple[tuple[str, int], tuple[str, int]]] = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in skip:
            continue
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(fd)) as other:
                if other.type != socket.SOCK_STREAM or other.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                ends.add((_address(other.getsockname()), _address(other.getpeername())))
        except OSError:  # closed meanwhile, not connected, not a socket
            continue
    return ends


def _send_until(sock: socket.socket, data: bytes, over: Callable[[], bool]) -> None:
    """`sock.sendall(data)` in steps of its timeout that give up once `over()` (a peer that never reads)."""
    view = memoryview(data)
    while view:
        if over():
            raise OSError("the relay closed")
        try:
            view = view[sock.send(view) :]
        except TimeoutError:
            continue


def _connect_store(
    addresses: list[str],
    port: int,
    size: int,
    timeout: float,
    stop: threading.Event,
    ports: tuple[int, int] = COLLECTIVE_PORTS,
    key: bytes | None = None,
) -> Any:
    """A client of the group's TCPStore at PORT of the first of `addresses` (IPs, `_resolve_store`'s: never a name,
    which would be resolved again) that accepts, connected within `timeout` s, in attempts of
    STORE_ATTEMPT_SECONDS that give up once `stop` is set (the session closed). One constructor call with the
    group's timeout kept its join thread (`gpupool-group-N`) retrying a dead or black-holed address the client
    named for up to MAX_TIMEOUT after the session closed: a tenant looping join-and-close held threads without
    bound (--isolation thread; a worker process ends with its session). The store then waits `timeout` per call.

    Each attempt first only opens a TCP connection (rank 0's store logs nothing for it): every
    failed TCPStore constructor writes c10d's error and C++ stack trace to the daemon's stderr (~6 KB, 40 lines), so
    round 20's attempts let a tenant naming a dead address write ~4 KB/s of log per join for up to 300 s. The store
    itself is made only once the address accepts, and if that still fails (the address is no store) the next tries
    back off, doubling from STORE_ATTEMPT_SECONDS to STORE_BACKOFF_SECONDS: at most ~10 such traces per join.
    The connection that accepted is kept as the store's: the client talks to it through a `_Relay`, which ends a
    constructor still waiting at `timeout` and every call once `stop` is set (torch's client waits for answers
    without its timeout: an address that accepts and never answers held this thread for the daemon's life).
    (hole53) With `key` (`_front_key` of the group's secret) each connection first passes `_prove` (rank 0's
    `_StoreFront` forwards no byte of a connection that has not): one that fails is an address without the store."""
    deadline = time.monotonic() + timeout
    backoff = STORE_ATTEMPT_SECONDS
    while True:
        if stop.is_set():
            raise Unavailable("the session closed before the group's store answered")
        start = time.monotonic()
        left = deadline - start
        attempt = max(0.05, min(STORE_ATTEMPT_SECONDS, left))
        host = ""
        failure: OSError | None = None
        upstream: socket.socket | None = None
        for ip in addresses[:MAX_STORE_ADDRESSES]:
            if stop.is_set() or time.monotonic() >= deadline:  # a name of many black-holed addresses: not each
                break
            if _own_relay((ip, port)):
                raise PermissionDenied(f"{ip}:{port} is another group's store relay on this host, not a store")
            try:
                upstream = socket.create_connection((ip, port), timeout=attempt)
            except OSError as exc:
                failure = exc
                continue
            if _own_relay(upstream.getpeername()):  # a relay bound between the check and the connection
                upstream.close()
                raise PermissionDenied(f"{ip}:{port} is another group's store relay on this host, not a store")
            if key is not None:
                try:
                    _prove(upstream, key, min(deadline, time.monotonic() + FRONT_HANDSHAKE_SECONDS))
                except (OSError, PermissionDenied) as exc:
                    upstream.close()
                    failure = exc if isinstance(exc, OSError) else OSError(str(exc))
                    continue
            host = ip
            break
        if not host:
            if time.monotonic() >= deadline:
                why = (failure.strerror if failure else None) or type(failure).__name__
                raise Unavailable(f"nothing answers there ({why})") from None
            stop.wait(max(0.0, start + STORE_ATTEMPT_SECONDS - time.monotonic()))  # a refusal comes at once
            continue
        assert upstream is not None
        try:
            relay = _Relay(upstream, stop, ports)
        except OSError:
            upstream.close()
            raise
        relay.close_at = deadline  # a constructor still waiting then is ended by the relay's close
        try:
            store = dist.TCPStore(relay.host, relay.port, size, is_master=False, timeout=timedelta(seconds=attempt))
        except Exception:
            relay.close_at = 0.0
            relay.done.wait(2 * STOP_POLL_SECONDS)
            if time.monotonic() >= deadline:
                raise
            stop.wait(min(backoff, max(0.0, deadline - time.monotonic())))
            backoff = min(2 * backoff, STORE_BACKOFF_SECONDS)
            continue
        relay.close_at = None  # the store lives on through the relay until the session closes
        store.set_timeout(timedelta(seconds=timeout))
        return store


def _store_master(
    bind: str, port: int, size: int, timeout: float, key: bytes, ports: tuple[int, int], name: str = ""
) -> Any:
    """Rank 0's store for PORT (hole53): its front (`_StoreFront`) on PORT of the address `bind` (`_front_listener`),
    and torch's TCPStore behind it on a random address of 127.0.0.0/8 (`_loopback_listener`, handed to the store:
    `master_listen_fd`, a duplicate; the store closes its own), PORT too where that is free (another of `ports`
    where it is not: a front on every interface), where rank 0's own client reaches it. Until round 53 the store
    itself listened on the daemon's peer-facing address (round 52; every interface before), where anyone who reached
    it could write values into it (each up to 8 MiB, any number of keys: memory of rank 0's worker, under --isolation
    thread of the daemon) or delete them. Returns (the store, its front): the store as rank 0's own client, its writes
    counted in the front's tally (sec55b: `_CountedStore`)."""
    front = _front_listener(bind, port)
    try:
        try:
            listener = _loopback_listener(port, relay=False)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            listener = seclink.bind_in(ports, functools.partial(_loopback_listener, relay=False))
        host, inner = listener.getsockname()[:2]
        with listener:  # (the duplicate keeps the socket listening)
            fd = os.dup(listener.fileno())
        store = dist.TCPStore(
            host, inner, size, is_master=True, timeout=timedelta(seconds=timeout), wait_for_workers=False,
            master_listen_fd=fd,
        )  # fmt: skip
        served = _StoreFront(front, (host, inner), key, size, name)
        return _CountedStore(store, served.tally), served
    except BaseException:
        front.close()
        raise


def _front_listener(bind: str, port: int) -> socket.socket:
    """The front's listener on PORT of the address `bind` only (the daemon's peer-facing host, where its secure hub
    listens too: secrev52), or of every interface where `bind` is "" (a wildcard --listen) or not an address of this
    host (a NAT's --advertise)."""
    if bind:
        try:
            family = socket.getaddrinfo(bind, 0, type=socket.SOCK_STREAM)[0][0]
            return socket.create_server((bind, port), family=family, backlog=64)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, backlog=64, dualstack_ipv6=True)
    return socket.create_server(("", port), backlog=64)


# (hole53) Rank 0's store behind the group's keys. A connection to the store's port (`_StoreFront`) is forwarded to
# the store only once it has proved the group's secret: the dialer sends FRONT_HELLO and a nonce, the front its own
# nonce and HMAC(key, "front" nonces), the dialer HMAC(key, "rank" nonces) (`_prove`; key: `_front_key`), all within
# FRONT_HANDSHAKE_SECONDS, and (sec55b) the front FRONT_ADMITTED once it forwards the connection. So each side knows
# the other holds the secret; the bytes after are not MACed (the values are: `_SignedStore`), so one who can rewrite
# the hosts' traffic can still alter them in flight. (link56) The dialer's hello carries HMAC(key, "hello" nonce)
# too: the front knows a rank's connection from its first bytes, and no stranger's newcomer pushes it out.
FRONT_HELLO = b"GPSTORE3"  # (sec55b: 2, the front's FRONT_ADMITTED after the proof; link56: 3, the keyed hello)
FRONT_HELLO_BYTES = len(FRONT_HELLO) + 32 + 32  # magic, the dialer's nonce, its MAC
FRONT_ADMITTED = b"\1"
FRONT_HANDSHAKE_SECONDS = 10.0
MAX_FRONT_PENDING = 16  # connections in their handshake at once; a newcomer past it pushes out the busiest source's
MAX_FRONT_PENDING_PER_SOURCE = 8  # oldest (front54); ... of one source address (the hub's; a host of 8 GPUs' ranks at
# once), a newcomer past it pushing out its own source's oldest
MAX_FRONT_GROWN_PER_SOURCE = 32  # (link56) the per-source cap grows to the group's ranks but rank 0, up to this
FRONT_SEEN_HELLOS = 4096  # (link56) keyed hellos' nonces a front remembers: a replayed one vouches for nothing
FRONT_SPARE = 8  # proved connections at once past the group's size (a rank's store client holds one)


def _front_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"gpupool-store-front", hashlib.sha256).digest()


def _front_mac(key: bytes, side: bytes, nonces: bytes) -> bytes:
    return hmac.new(key, side + b"\0" + nonces, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the store's handshake timed out")
        sock.settimeout(left)
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the store's handshake was closed")
        data += chunk
    return bytes(data)


def _prove(sock: socket.socket, key: bytes, deadline: float) -> None:
    """The dialer's side of the front's handshake: PermissionDenied where the other end does not know the key."""
    mine = secrets.token_bytes(32)
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    sock.sendall(FRONT_HELLO + mine + _front_mac(key, b"hello", mine))  # (link56: the front holds this connection)
    answer = _recv_exact(sock, 64, deadline)
    nonces = mine + answer[:32]
    if not hmac.compare_digest(answer[32:], _front_mac(key, b"front", nonces)):
        raise PermissionDenied("the store's address does not know the group's secret")
    sock.sendall(_front_mac(key, b"rank", nonces))
    # (sec55b) the front's word that it forwards this connection: one it pushed out as its proof came (a newcomer's
    # handshake slot), or past its proved connections, is closed instead, here, before a TCPStore client is made on it
    # (whose failure wrote c10d's trace to the daemon's stderr; the join now tries again at once, as at any refusal)
    try:
        admitted = _recv_exact(sock, len(FRONT_ADMITTED), deadline)
    except ConnectionError:  # (closed: a reset too)
        admitted = b""
    if admitted != FRONT_ADMITTED:
        raise ConnectionError("the store's handshake ended without its admission")


class _StoreFront:
    """Rank 0's listener on the store's port (the port its peers are told): a connection that passes the handshake
    (`_prove`'s other side) is forwarded to the store's loopback address `inner`, its queries read as they pass
    (front54: `_queries` with the group's `_StoreTally`, `_forward`); any other is closed without a byte read past
    the handshake or sent to the store. A newcomer is never refused a handshake slot (front54; `peers.push_out`, as
    the collective hub's): past MAX_FRONT_PENDING_PER_SOURCE of its source address it pushes out that source's
    oldest, past MAX_FRONT_PENDING in all the busiest source's oldest (round 53 closed newcomers past 16: a stranger
    holding 16 for 10 s each delayed every rank's join). Closed with the group (`Group.close`).

    (link56) The caps grow with the group (`peers.grown_caps`: its ranks but rank 0 a source, 8 to
    MAX_FRONT_GROWN_PER_SOURCE; 16 plus twice that growth in all), so ranks of one host do not push each other out;
    and a connection whose keyed hello the front read (at its accept where the bytes are there, else by its thread)
    is held: no newcomer pushes it out, a newcomer finding only held ones of its source is turned away
    (`peers.push_out`). Strangers on the ranks' own address then push out only each other's connections, however
    fast they open them; they still hold at most the caps' sockets. Each hello's nonce vouches once (`_vouched`)."""

    def __init__(self, listener: socket.socket, inner: tuple[str, int], key: bytes, size: int, name: str) -> None:
        self.listener, self.inner, self.key, self.name = listener, inner, key, name
        self.port = listener.getsockname()[1]
        self.closed = threading.Event()
        self.tally = _StoreTally(size)
        self._lock = threading.Lock()
        self._pending: list[list[Any]] = []  # [source, connection, held (link56)], in arrival order
        self._per_source, self._total = grown_caps(
            size - 1, MAX_FRONT_PENDING_PER_SOURCE, MAX_FRONT_PENDING, MAX_FRONT_GROWN_PER_SOURCE
        )
        self._seen: dict[bytes, None] = {}  # keyed hellos' nonces, oldest first (`_vouched`)
        self._proved = 0
        self._limit = size + FRONT_SPARE
        self._socks: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="gpupool-store-front", daemon=True).start()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        self.listener.settimeout(STOP_POLL_SECONDS)
        try:
            while not self.closed.is_set():
                try:
                    conn, addr = self.listener.accept()
                except TimeoutError:
                    continue
                source = source_key(str(addr[0]), v6_prefix=128)
                out: socket.socket | None = None
                hello = _peek(conn, FRONT_HELLO_BYTES)
                with self._lock:
                    held = len(hello) == FRONT_HELLO_BYTES and self._vouched(hello)
                    at = push_out([p[0] for p in self._pending], source, self._per_source, self._total,
                                  [p[2] for p in self._pending])  # fmt: skip
                    admit = not self.closed.is_set() and (at is None or at[0] >= 0)  # (-1: this newcomer turned away)
                    if admit:
                        if at is not None:
                            out = self._pending.pop(at[0])[1]
                        self._pending.append([source, conn, held])
                        self._socks.add(conn)
                if out is not None:  # its handshake fails now (its thread closes it)
                    with contextlib.suppress(OSError):
                        out.shutdown(socket.SHUT_RDWR)
                if not admit:
                    conn.close()
                    continue
                threading.Thread(target=self._serve, args=(conn,), name="gpupool-store-front", daemon=True).start()
        except OSError:
            return
        finally:
            self.listener.close()

    def _vouched(self, hello: bytes) -> bool:
        """(link56; under `_lock`) Whether `hello` is a keyed hello of the group whose nonce no earlier one used."""
        nonce = hello[len(FRONT_HELLO) : len(FRONT_HELLO) + 32]
        if not hello.startswith(FRONT_HELLO) or nonce in self._seen:
            return False
        if not hmac.compare_digest(hello[len(FRONT_HELLO) + 32 :], _front_mac(self.key, b"hello", nonce)):
            return False
        self._seen[nonce] = None
        if len(self._seen) > FRONT_SEEN_HELLOS:
            del self._seen[next(iter(self._seen))]
        return True

    def _hold(self, conn: socket.socket, hello: bytes) -> bool:
        """(link56) Whether `conn`, which said `hello`, is still pending and held (held now where it was not)."""
        with self._lock:
            for p in self._pending:
                if p[1] is conn:
                    p[2] = p[2] or self._vouched(hello)
                    return bool(p[2])
        return False

    def _handshake(self, conn: socket.socket) -> bool:
        deadline = time.monotonic() + FRONT_HANDSHAKE_SECONDS
        try:
            hello = _recv_exact(conn, len(FRONT_HELLO), deadline)
            if hello != FRONT_HELLO:  # (a TCPStore client's first query, an older daemon's hello)
                return False
            hello += _recv_exact(conn, FRONT_HELLO_BYTES - len(FRONT_HELLO), deadline)
            if not self._hold(conn, hello):
                return False
            mine = secrets.token_bytes(32)
            nonces = hello[len(FRONT_HELLO) : len(FRONT_HELLO) + 32] + mine
            conn.sendall(mine + _front_mac(self.key, b"front", nonces))
            return hmac.compare_digest(_recv_exact(conn, 32, deadline), _front_mac(self.key, b"rank", nonces))
        except OSError:
            return False

    def _serve(self, conn: socket.socket) -> None:
        inner: socket.socket | None = None
        flight: _Flight | None = None
        proved = False
        try:
            ok = self._handshake(conn)
            with self._lock:
                mine = [p for p in self._pending if p[1] is conn]  # (none: pushed out by a newcomer)
                for p in mine:
                    self._pending.remove(p)
                proved = ok and bool(mine) and self._proved < self._limit and not self.closed.is_set()
                self._proved += proved
            if not proved:
                _STORE_LOG.warning("rank 0's store refused a connection that did not prove the group's secret")
                return
            inner = socket.create_connection(self.inner, timeout=FRONT_HANDSHAKE_SECONDS)
            with self._lock:
                self._socks.add(inner)
            if self.closed.is_set():
                return
            conn.sendall(FRONT_ADMITTED)  # (sec55b; `_prove`)
            asked: collections.deque[list[int]] = collections.deque()
            flight = _Flight(self.tally)  # (given back below: what its closed connection held is gone)
            scans = {conn: _Scan(_queries(asked, self.tally, flight), hold=True), inner: _Scan(_replies(asked, flight))}
            _forward(conn, inner, self.closed.is_set, scans)
        except StoreRefused as exc:
            _STORE_LOG.warning("rank 0's store of lease %s closed a proved connection: %s", self.name, exc)
        except OSError:
            return
        finally:
            if flight is not None:
                flight.close()
            with self._lock:
                self._proved -= proved
                self._socks.discard(conn)
                if inner is not None:
                    self._socks.discard(inner)
            for sock in (conn, inner):
                if sock is not None:
                    sock.close()


def _peek(conn: socket.socket, n: int) -> bytes:
    """(link56) Up to `n` bytes that have come on `conn`, left there to read (b"": none yet)."""
    try:
        conn.setblocking(False)
        return conn.recv(n, socket.MSG_PEEK)
    except OSError:
        return b""
    finally:
        conn.setblocking(True)


def _forward(a: socket.socket, b: socket.socket, over: Callable[[], bool], scans: dict[socket.socket, _Scan]) -> None:
    """Forward bytes both ways between `a` and `b` until either closes or `over()`: rank > 0's relay (`_Relay`) and
    rank 0's front (`_StoreFront`), one loop (front54). Each direction's bytes pass its `_Scan` (`scans`) first,
    and on only as far as it lets them; its StoreRefused ends the loop (the caller closes both connections)."""
    ends = {a: b, b: a}
    with selectors.DefaultSelector() as sel:
        for sock in ends:
            sock.settimeout(STOP_POLL_SECONDS)
            sel.register(sock, selectors.EVENT_READ)
        while not over():
            for key, _ in sel.select(STOP_POLL_SECONDS):
                data = key.fileobj.recv(1 << 16)  # type: ignore[union-attr]
                if not data:
                    return
                scan = scans[key.fileobj]  # type: ignore[index]
                _send_until(ends[key.fileobj], scan.feed(data), over)  # type: ignore[index]
                if scan.refused is not None:
                    raise scan.refused


def _check_owner(store: Any, lease_id: str, owner: str, stop: threading.Event, deadline: float) -> None:
    """Rank 0's mark in the store: waits for it in steps that give up once `stop` is set (a get on the store
    waited the group's timeout whatever the session did), until `deadline`."""
    prefixed = dist.PrefixStore(f"gpupool/{lease_id}/", store)
    while not prefixed.check(["owner"]):
        if stop.wait(STOP_POLL_SECONDS):
            raise Unavailable("the session closed before rank 0 marked the group's store")
        if time.monotonic() >= deadline:
            raise Unavailable("rank 0 never marked the store")
    if prefixed.get("owner").decode(errors="replace") != owner:
        raise PermissionDenied("the group's store was not set up by rank 0 of this lease")


class _RateLimitedLog:
    """At most `limit` warnings a minute; the rest are counted and their number logged once the minute is over
    (a tenant can fail joins in a loop: each failure's detail must not be a line of the daemon's log)."""

    def __init__(self, logger: logging.Logger, limit: int = 10, window: float = 60.0) -> None:
        self._log, self._limit, self._window = logger, limit, window
        self._lock = threading.Lock()
        self._start, self._count, self._dropped = time.monotonic(), 0, 0

    def warning(self, fmt: str, *args: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._start >= self._window:
                if self._dropped:
                    self._log.warning("%d more such warnings in %g s were not logged", self._dropped, self._window)
                self._start, self._count, self._dropped = now, 0, 0
            self._count += 1
            if self._count > self._limit:
                self._dropped += 1
                return
        self._log.warning(fmt, *args)


_STORE_LOG = _RateLimitedLog(log)  # failures to reach a group's store: the address's state, for the operator only


def _shutdown(pg: Any) -> None:
    try:
        pg.shutdown()
    except Exception as exc:  # the group is dropped either way
        log.debug("shutting down a closed session's process group: %s", _short(exc))


def _serve(jobs: queue.SimpleQueue[Callable[[], None] | None], threads: int) -> None:
    """A group's collectives' thread: runs its jobs in order until told to stop (None)."""
    torch.set_grad_enabled(False)  # thread-local, as the device's thread has it
    torch.set_num_threads(threads)  # OpenMP's team size is per thread: a new one's is every core's
    while (job := jobs.get()) is not None:
        job()


def group_secret(basis: str) -> str:
    """The secret of a group's store and links, from the lease's `group` claim (or rank 0's lease token, for
    tokens without one): only the lease's holders know either."""
    return hmac.new(b"gpupool-group-store", basis.encode(), hashlib.sha256).hexdigest()


class _SignedStore(dist.Store):
    """The group's view of its TCPStore: each value is stored as HMAC-SHA256(secret, key NUL value) + value and
    checked when read, so that a value written or altered by anyone without the secret (the store is plain TCP
    on the hosts' network) fails the join instead of steering gloo to another address. gloo's rendezvous uses
    only set, get and wait."""

    def __init__(self, inner: Any, secret: bytes, stop: threading.Event | None = None, timeout: float = 0.0) -> None:
        super().__init__()
        self._inner = inner
        self._secret = secret
        self._stop = stop  # the session closed: a get or wait for a key not yet set fails now
        self._timeout = timeout
        self.written: set[str] = set()  # (round 46) the keys this rank set: `forget` deletes them

    def forget(self) -> None:
        """Delete the keys this rank set (round 46): a subgroup's keys stayed in rank 0's store after its members
        left it, and a client that made and left subgroups in a loop grew the store (under --isolation thread the
        daemon's own memory) by a few hundred bytes a cycle, without bound."""
        seclink.forget(self._inner, sorted(self.written))
        self.written.clear()

    def _await(self, keys: list[str], timeout: float) -> None:
        """Wait for `keys` in steps, giving up when the session closes (the inner store's own wait blocks its
        thread, and the group's sockets, for the group's timeout); past `timeout` it fails (UNAVAILABLE)."""
        if self._stop is None:
            return
        deadline = time.monotonic() + timeout
        while not self._inner.check(keys):
            if self._stop.wait(STOP_POLL_SECONDS):
                raise Unavailable("the session closed while its collective group formed")
            if time.monotonic() >= deadline and not self._inner.check(keys):
                # (round 46) not the inner call: it waited the store's own timeout (its group's, not this subgroup's),
                # and in one run a TCPStore client whose get timed out lost its connection ("Broken pipe"), and the
                # rank's next subgroup failed to form. Such waits are more common now that a subgroup's keys go once
                # it formed or failed (`forget`): a member that comes late to a failed subgroup finds nothing
                raise Unavailable(f"the group's store holds no {', '.join(keys)} after {timeout:g} s")

    def _mac(self, key: str, value: bytes) -> bytes:
        return hmac.new(self._secret, key.encode() + b"\0" + value, hashlib.sha256).digest()

    def set(self, key: str, value: Any) -> None:
        data = _as_bytes(value)
        self.written.add(key)
        self._inner.set(key, self._mac(key, data) + data)

    def get(self, key: str) -> bytes:
        self._await([key], self._timeout)
        raw = bytes(self._inner.get(key))
        mac, data = raw[:32], raw[32:]
        if not hmac.compare_digest(mac, self._mac(key, data)):
            raise PermissionDenied(f"the group's store holds a value for {key!r} not written by a rank of the group")
        return data

    def wait(self, keys: list[str], timeout: Any = None) -> None:
        self._await(keys, self._timeout if timeout is None else timedelta_seconds(timeout))
        _wait(self._inner, keys, timeout)

    def check(self, keys: list[str]) -> bool:
        return bool(self._inner.check(keys))

    def add(self, key: str, amount: int) -> int:  # a counter cannot be signed; gloo's rendezvous uses none
        return int(self._inner.add(key, amount))

    def delete_key(self, key: str) -> bool:
        return bool(self._inner.delete_key(key))

    def num_keys(self) -> int:
        return int(self._inner.num_keys())


class _CountedStore(dist.Store):
    """(sec55b) Rank 0's own client of its group's store (the TCPStore that serves it), whose writes are counted in the
    front's `_StoreTally` as a keyed client's are: they reach the store directly, not through the front, and front54
    did not count them. They are the daemon's own (the group's and each subgroup's rendezvous through `_SignedStore`:
    gloo's addresses, the secure hub's and p2p keys, NCCL's ids; the owner mark), but a tenant's script decides how
    many subgroups it forms and leaves: a subgroup's keys NCCL kept are never deleted (`Group.form` forgets gloo's
    and the secure transport's only). Now past MAX_STORE_BYTES or MAX_FRONT_KEYS rank 0's own set fails too (its
    group's or subgroup's join fails, saying so). Keys are counted as torch's TCPStore client sends them (its "/"
    first), so that a key rank 0 set and a keyed client deleted, or the other way round, is one key of the tally."""

    def __init__(self, inner: Any, tally: _StoreTally) -> None:
        super().__init__()
        self._inner, self.tally = inner, tally

    def _count(self, key: str, data: bytes, replace: bool) -> None:
        self.tally.set(b"/" + key.encode(), len(data), replace, _counter(data))

    def set(self, key: str, value: Any) -> None:
        data = _as_bytes(value)
        self._count(key, data, True)
        self._inner.set(key, data)

    def get(self, key: str) -> bytes:
        return bytes(self._inner.get(key))

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        data = _as_bytes(desired)  # (store56: a str's UTF-8 bytes, as the store keeps them; its characters before)
        self._count(key, data, False)
        return bytes(self._inner.compare_set(key, expected, data))

    def add(self, key: str, amount: int) -> int:
        self.tally.add(b"/" + key.encode())  # (store56: refused on a key that may hold no counter, as the front's)
        return int(self._inner.add(key, amount))

    def deleteKey(self, key: str) -> bool:  # noqa: N802 (the name torch's C++ calls: a PrefixStore over this store)
        self.tally.delete(b"/" + key.encode())
        return bool(self._inner.delete_key(key))

    delete_key = deleteKey  # (the name Python calls)

    def wait(self, keys: list[str], timeout: Any = None) -> None:
        _wait(self._inner, keys, timeout)

    def check(self, keys: list[str]) -> bool:
        return bool(self._inner.check(keys))

    def getNumKeys(self) -> int:  # noqa: N802 (as deleteKey)
        return int(self._inner.num_keys())

    num_keys = getNumKeys


def _as_bytes(value: Any) -> bytes:
    """A store value as torch's store client sends it (a str's UTF-8 bytes)."""
    return value.encode() if isinstance(value, str) else bytes(value)


def _wait(store: Any, keys: list[str], timeout: Any) -> None:
    """`store.wait(keys)` with its own timeout, or `timeout` where one is given."""
    if timeout is None:
        store.wait(keys)
    else:
        store.wait(keys, timeout)


def use_nccl(device: torch.device, confined: bool) -> bool:
    """Whether a `--collectives gloo` group on `device` tries NCCL: on a CUDA device of a worker that is not confined
    only. NCCL makes its shared-memory files in /dev/shm (open with O_CREAT, ftruncate) and passes CUDA memory
    handles over unix sockets: Landlock (no file made anywhere) and seccomp (no O_CREAT, no unix socket) refuse both,
    and NCCL meets them only at a group's first collectives, past the fallback to gloo at its constructor. So a
    confined worker's group is gloo's from the start (CUDA tensors through host copies), and says so once in the
    log; `--landlock off --seccomp off` lets NCCL run (round 40)."""
    return device.type == "cuda" and not confined


def _is_nccl(pg: Any) -> bool:
    """Whether `pg` is torch's NCCL process group (`--collectives gloo` on unconfined real GPUs: `_process_group`)."""
    return type(pg).__name__ == "ProcessGroupNCCL"


def _process_group(
    store: Any, rank: int, size: int, timeout: float, host: str, device: torch.device, nccl: bool = True
) -> Any:
    """NCCL for CUDA devices where torch has it and `nccl` (`use_nccl`), else gloo (CPU tensors, and CUDA tensors
    through host copies)."""
    td = timedelta(seconds=timeout)
    if nccl and device.type == "cuda" and dist.is_nccl_available():  # pragma: no cover - needs real GPUs
        try:
            from torch.distributed import ProcessGroupNCCL

            opts = ProcessGroupNCCL.Options()
            opts._timeout = td
            with torch.cuda.device(device):
                return ProcessGroupNCCL(store, rank, size, opts)
        except Exception as exc:
            log.warning("NCCL group failed (%s); falling back to gloo", _short(exc))
    from torch.distributed import ProcessGroupGloo

    gopts = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    gopts._timeout = td
    gopts._devices = [ProcessGroupGloo.create_device(hostname=host)]
    return ProcessGroupGloo(store, rank, size, gopts)


class Collectives:
    """Joins sessions to groups and runs their collectives. Holds configuration only; groups live on sessions."""

    def __init__(self) -> None:
        self.verify: Verifier | None = None
        self.host = "127.0.0.1"  # where this daemon's store and gloo listen and are reached by peers
        self.speed: SpeedModel | None = None  # fake GPUs' modelled link (server/speedmodel.py)
        self.transport = "secure"  # --collectives
        self.confined = False  # a worker under Landlock or seccomp (server/worker.py): its groups never try NCCL
        self.ports = COLLECTIVE_PORTS  # --collective-ports: the peers' ports its groups reach
        self.own = COLLECTIVE_PORTS  # where its groups listen: the session's block of them (server/portshare.py)
        self.store_host = "127.0.0.1"  # the address rank 0's store listens on (`_store_master`; "": every one)
        # Whether another session of the device waits to run (the daemon says: server/worker.py `contend`): a
        # waiting collective keeps the device's thread while nobody does. Until told: always (it yields).
        self.contended: Callable[[], bool] = _always

    def configure(
        self,
        verify: Verifier,
        host: str,
        transport: str = "secure",
        ports: tuple[int, int] = COLLECTIVE_PORTS,
        own: tuple[int, int] | None = None,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown collectives transport {transport!r} (known: {', '.join(TRANSPORTS)})")
        self.verify = verify
        self.transport = transport
        self.ports = (int(ports[0]), int(ports[1]))
        self.own = (int(own[0]), int(own[1])) if own else self.ports
        wildcard = host in ("", "0.0.0.0", "::", "[::]")
        self.host = socket.gethostname() if wildcard else host
        self.store_host = "" if wildcard else host  # where rank 0's store listens ("": every interface)

    # ---- joining ----

    def join(self, s: WorkerSession, msg: device_pb2.GroupJoin) -> None:
        if self.verify is None:
            raise FailedPrecondition("this daemon does not run collectives (no token verifier configured)")
        if msg.subgroup or msg.members:
            self._join_subgroup(s, msg)
            return
        if s.group is not None and not s.group.closed:
            raise FailedPrecondition(f"session already joined its collective group as {s.group.describe()}")
        size, rank = msg.size, msg.rank
        if not 1 <= size <= MAX_RANKS or rank >= size or len(msg.tokens) not in (1, size):
            raise InvalidArgument(f"bad group: rank {rank} of {size} with {len(msg.tokens)} tokens")
        first = self._check_tokens(s, rank, size, list(msg.tokens))
        timeout = min(msg.timeout_seconds, MAX_TIMEOUT) if msg.timeout_seconds > 0 else DEFAULT_TIMEOUT
        group = Group(s.lease_id, rank, size, timeout, self.transport, self.ports, self.own)
        # The scheduler's tokens carry the lease's group secret, the same in every renewal: ranks whose processes
        # renewed at different moments send different tokens. Hand-minted tokens have none: rank 0's token then.
        basis = first.group or msg.tokens[0]
        owner = hashlib.sha256(b"gpupool-group:" + basis.encode()).hexdigest()
        secret = group.secret = group_secret(basis)
        if rank == 0:
            if msg.store_address:
                raise InvalidArgument("rank 0 hosts the group's store; it takes no store_address")
            if msg.port_handle == 0:  # (round 36: `bind` said "handle 0x0 belongs to another session")
                raise InvalidArgument(
                    "rank 0's GroupJoin names port_handle 0: it needs a handle of this session, where the daemon puts "
                    "the port of the group's store"
                )
            s.check_handle(msg.port_handle)  # before the store opens a port
        else:
            host, port_num = _peer_address(msg.store_address)
        if size > 1:
            _check_network()
            if rank > 0 and not seclink.in_range(port_num, self.ports):  # (after: a worker without network says so)
                raise InvalidArgument(
                    f"group store port {port_num} is outside this daemon's --collective-ports "
                    f"{self.ports[0]}-{self.ports[1]}: rank 0's daemon put its store there (every daemon of a job "
                    "needs the same range)"
                )
        if rank == 0:
            if size > 1:
                group.store, group.front = seclink.bind_in(
                    self.own,
                    lambda port: _store_master(
                        self.store_host, port, size, timeout, _front_key(secret), self.own, s.lease_id
                    ),
                )
            port = torch.tensor(group.front.port if group.front is not None else 0, dtype=torch.int64)
            s.admit(8)
            s.bind(msg.port_handle, port)
        s.group = group
        dev = s.device.torch_device
        if self.transport != "secure" and dev.type == "cuda" and size > 1:
            group.nccl = use_nccl(dev, self.confined)
            if not group.nccl:
                log.info(
                    "session %d: its collectives run over gloo, not NCCL: this worker is confined, and Landlock and "
                    "seccomp refuse NCCL's /dev/shm files and unix sockets (--landlock off --seccomp off for NCCL)",
                    s.number,
                )  # fmt: skip
        if size == 1:  # a one-rank job (DDP on a single-device lease): nothing to talk to, no socket
            group.pg = _Solo()
            group.ready.set()
            return

        deadline = group.store_deadline = time.monotonic() + timeout

        def run() -> None:
            if group.store is None:
                try:
                    addresses = _resolve_store(host, port_num)  # once: the IPs checked are the IPs connected to
                    group.store = _connect_store(
                        addresses, port_num, size, timeout, group.stop, self.own, _front_key(secret)
                    )
                    _check_owner(group.store, s.lease_id, owner, group.stop, deadline)
                except Exception as exc:
                    # One message, one status, at the group's deadline, whatever the address's state: the daemon
                    # connects where the client names, and distinct errors or timings let a tenant map which
                    # ports and hosts of the daemon's network are open. The detail is for the operator's log.
                    _STORE_LOG.warning(
                        "session %d, %s: the group's store at %s: %s",
                        s.number, group.describe(), msg.store_address, _short(exc),
                    )  # fmt: skip
                    group.store = None
                    group.stop.wait(max(0.0, deadline - time.monotonic()))
                    group.broken = group.broken or group.not_formed()
                    group.ready.set()
                    return
            group.form(group.store, owner, secret, self.host, dev)

        threading.Thread(target=run, name=f"gpupool-group-{s.number}", daemon=True).start()
        log.info(
            "session %d joins the collective group of lease %s as rank %d of %d (%s)",
            s.number, s.lease_id, rank, size, self.transport,
        )  # fmt: skip

    def _join_subgroup(self, s: WorkerSession, msg: device_pb2.GroupJoin) -> None:
        """Join a subgroup of the session's group (round 45; `dist.new_group(ranks)`, a DeviceMesh dimension: until
        then its collectives were one FailedPrecondition): a group of its own, numbered by the session
        (`msg.subgroup`), of the members' ranks of the session's group, this session's own among them (a rank
        outside it is refused here, and never holds its number: a collective naming a subgroup the session has not
        joined is refused). It forms in the session's group's thread, in the order the session joined its subgroups
        (every member makes them in one order, as torch's new_group), over that group's store: its keys and links
        from a secret of its own, derived from the group's secret, its members and how many subgroups of the same
        members the session joined before, so that no two groups of a job share keys and a process of another
        lease cannot compute them. Its transport and checks are its group's (agreement, quotas, the group's ports);
        the session holds at most MAX_SUBGROUPS."""
        parent: Group | None = s.group
        if parent is None or parent.closed:
            raise FailedPrecondition("a subgroup's join before the session joined its group (init_process_group)")
        if msg.tokens or msg.store_address or msg.port_handle:
            raise InvalidArgument(
                "a subgroup's join names no tokens, store address or port handle: it forms over the session's group"
            )
        members, number = list(msg.members), msg.subgroup
        if not number or not members:
            raise InvalidArgument(f"a subgroup's join names its number (> 0) and its members; got {number}, {members}")
        if number in parent.subgroups:
            raise InvalidArgument(f"this session joined a subgroup numbered {number} already")
        if len(parent.subgroups) >= MAX_SUBGROUPS:
            raise ResourceExhausted(
                f"a session joins at most {MAX_SUBGROUPS} subgroups of its group at once "
                "(dist.destroy_process_group(subgroup) leaves one)"
            )
        if len(parent.leaving) >= MAX_LEAVING:
            raise ResourceExhausted(
                f"{len(parent.leaving)} subgroups this session left still wait for their members to form them"
            )
        if members[-1] >= parent.size or any(b <= a for a, b in zip(members, members[1:], strict=False)):
            raise InvalidArgument(
                f"a subgroup's members are distinct ranks of its group of {parent.size}, ascending; got {members}"
            )
        if parent.rank not in members:
            raise PermissionDenied(
                f"rank {parent.rank} of the group is not a member of subgroup {members}: only its members join it"
            )
        # how many subgroups of these members the session joined before, left or not (until round 46 those it held:
        # with leaves, a subgroup made again would have taken the keys of the one it replaced, whose values the store
        # still holds): the same count on every member, which all make the same groups in one order
        digest = hashlib.sha256(repr(members).encode()).digest()
        ordinal = parent.made.get(digest, 0)
        if not ordinal and len(parent.made) >= MAX_MEMBER_LISTS:
            raise ResourceExhausted(f"a session joins subgroups of at most {MAX_MEMBER_LISTS} distinct member lists")
        parent.made[digest] = ordinal + 1
        timeout = min(msg.timeout_seconds, MAX_TIMEOUT) if msg.timeout_seconds > 0 else parent.timeout
        sub = Group(
            parent.lease_id,
            members.index(parent.rank),
            len(members),
            timeout,
            parent.transport,
            parent.ports,
            parent.own,
        )
        sub.parent, sub.members, sub.nccl = parent, tuple(members), parent.nccl
        sub.secret = hmac.new(
            parent.secret.encode(), f"gpupool-subgroup:{members}:{ordinal}".encode(), hashlib.sha256
        ).hexdigest()
        parent.subgroups[number] = sub
        if sub.size == 1:  # a dimension of one rank: its collectives are the identity
            sub.pg = _Solo()
            sub.ready.set()
            return
        dev = s.device.torch_device

        def form() -> None:
            try:
                parent.wait_ready()
            except GpupoolError as exc:
                sub.broken = f"subgroup {members}: its group did not form ({exc})"
                sub.ready.set()
                return
            # (round 46) NCCL only where the group itself runs on it: a group whose NCCL failed and fell back to gloo
            # (`_process_group`) has gloo subgroups, not members that try NCCL again one by one
            sub.nccl = sub.nccl and _is_nccl(parent.pg)
            sub.form(parent.store, "", sub.secret, self.host, dev)

        parent.submit(form, f"gpupool-collective-{s.number}", torch.get_num_threads())
        log.info("session %d joins subgroup %s of lease %s as its rank %d", s.number, members, s.lease_id, sub.rank)

    def leave(self, s: WorkerSession, msg: device_pb2.GroupLeave) -> None:
        """Leave a subgroup the session joined (round 46; `dist.destroy_process_group(subgroup)`: until then the
        daemons were not told, and its links stayed, and counted against MAX_SUBGROUPS, until the session ended). Its
        number is free at once; its links (gloo's or NCCL's process group) close now where it formed, as every
        collective the session called on it has ended (a session runs one command after another, and a collective's
        command ends with the call); else its close waits in the group's thread behind its formation, which its
        members may still be running with this rank (closing it now would hold them up to the group's timeout)."""
        parent: Group | None = s.group
        if parent is None or parent.closed:
            raise FailedPrecondition("a subgroup's leave before the session joined its group (init_process_group)")
        number = msg.subgroup
        if not number:
            raise InvalidArgument("a leave names a subgroup (> 0): the session's own group ends with the session")
        sub = parent.subgroups.pop(number, None)
        if sub is None:
            raise FailedPrecondition(f"leave of subgroup {number}, which this session never joined or left already")
        log.info("session %d leaves subgroup %s of lease %s", s.number, list(sub.members), s.lease_id)
        if sub.ready.is_set():  # formed, or failed to: nothing of it runs in the group's thread
            self._close_left(s, sub)
            return
        parent.leaving.append(sub)

        def close() -> None:
            parent.leaving.remove(sub)
            self._close_left(s, sub)

        parent.submit(close, f"gpupool-collective-{s.number}", torch.get_num_threads())

    @staticmethod
    def _close_left(s: WorkerSession, sub: Group) -> None:
        device = s.device.torch_device
        if device.type == "cuda" and not isinstance(sub.pg, seclink.SecureGroup):  # pragma: no cover - real GPUs
            with torch.cuda.device(device):  # NCCL's shutdown on the device its communicator is on
                sub.close()
        else:
            sub.close()

    def _check_tokens(self, s: WorkerSession, rank: int, size: int, tokens: list[str]) -> TokenClaims:
        """Every rank's token is of this session's lease, one device each, this rank's is this session's; rank
        0's claims are returned. Or (clients since round 35) this rank's token alone (its claims returned), checked
        alike, of this session's lease and
        device, with the lease's `group` claim, from which the group is keyed: a lease token is a bearer credential
        for its device, and a rank's daemon needs no other rank's (distinct devices: one session per device)."""
        assert self.verify is not None
        alone = len(tokens) < size  # this rank's own token (`join` let through one or `size`)
        seen: set[tuple[str, int]] = set()
        first: TokenClaims | None = None
        for i, token in zip([rank] if alone else range(size), tokens, strict=True):
            claims = self.verify(token)  # Unauthenticated for forged or expired tokens
            first = first or claims
            if claims.group != first.group:
                raise PermissionDenied(f"rank {i}'s token names another group secret than rank 0's")
            if claims.lease_id != s.lease_id:
                raise PermissionDenied(f"rank {i}'s token is of lease {claims.lease_id}, not this session's lease")
            where = (claims.host, claims.device)
            if where in seen:
                raise InvalidArgument(f"ranks share device {claims.device} of host {claims.host}: one GPU per rank")
            seen.add(where)
            if i == rank and where != (s.host_id, s.device.index):
                raise PermissionDenied(f"rank {rank}'s token is not this session's device")
        if alone and first is not None and not first.group:
            raise InvalidArgument(
                f"a join with one token for {size} ranks needs the lease's `group` claim in it (the scheduler's"
                " tokens of a lease of several devices have one); this token has none (hand-minted): send every"
                " rank's token, rank 0's first"
            )
        assert first is not None  # 1 <= len(tokens)
        return first

    # ---- collectives ----

    def run(self, s: WorkerSession, msg: device_pb2.Collective) -> None:
        """Check the call, then wait for the group and the peers in its group's thread (`Group.submit`), here in steps
        of `POLL_SECONDS` for as long as no other session of the device waits to run (`contended`), then no longer:
        a collective still waiting stays the session's `waiting` (slices.run_slice ends the slice with it
        unexecuted, and its next slice runs it again: this call then looks again), so the device's thread serves
        the device's other sessions meanwhile, and nothing else of this session runs before it."""
        pending: _Waiting | None = s.waiting
        if pending is None:
            pending = self._start(s, msg)
        elif pending.key != msg.SerializeToString():  # a session's commands run in order: the same comes again
            raise FailedPrecondition(f"collective {msg.kind} while another collective of the session waits")
        while not pending.done.wait(POLL_SECONDS):
            if self.contended():
                s.waiting = pending
                return
        s.waiting = None
        if pending.error is not None:
            raise pending.error

    def _start(self, s: WorkerSession, msg: device_pb2.Collective) -> _Waiting:
        group: Group | None = s.group
        if group is None or group.closed:
            raise FailedPrecondition(f"collective {msg.kind} before joining a group (init_process_group)")
        if msg.subgroup:
            if msg.kind == P2P:
                raise InvalidArgument("p2p names its peers' ranks in the session's group, and no subgroup")
            group = group.subgroups.get(msg.subgroup)
            if group is None:
                raise FailedPrecondition(
                    f"collective {msg.kind} on subgroup {msg.subgroup}, which this session never joined"
                )
        call: Callable[[], None]
        if msg.kind == P2P:
            msg = device_pb2.Collective.FromString(msg.SerializeToString())  # (as below)
            call = functools.partial(self._p2p, group, _transfers(s, msg, group))
            return self._submit(s, group, msg, call)
        if msg.kind not in KINDS:
            raise InvalidArgument(f"unknown collective {msg.kind!r} (known: {', '.join(KINDS)})")
        if msg.reduce_op not in _OPS:
            raise InvalidArgument(f"unknown reduce op {msg.reduce_op!r}")
        device = s.device.torch_device
        # (round 38) a call this daemon refuses still takes its part in the agreement (`_agree`), marked refused: a
        # refusal raised here, before it, left the peers waiting for this rank until the group's timeout
        # (UNAVAILABLE, the group broken); now every rank fails (this one with its own error, the peers with
        # INVALID_ARGUMENT) and the group goes on. So does a handle that does not resolve here (freed, poisoned by
        # an op that failed on this rank only, half uploaded): its error, PoisonedInput's included, after the
        # agreement
        refused: Exception | None = None
        try:
            tensors = [s.resolve(h) for h in msg.tensors]
            inputs = [s.resolve(h) for h in msg.inputs]
            for h, t in zip([*msg.tensors, *msg.inputs], tensors + inputs, strict=True):
                _check_quota(s, t, h, msg.kind)
        except GpupoolError as exc:  # (PoisonedInput is one)
            tensors, inputs, refused = [], [], exc
        if refused is None:
            try:
                _check_shape(msg, tensors, inputs, group.size, group.transport)
            except InvalidArgument as exc:
                refused = exc
        # its own copy: the command's message may be a view of the slice's buffer, which the next slice refills
        msg = device_pb2.Collective.FromString(msg.SerializeToString())
        call = functools.partial(self._call, group, msg, tensors, inputs, device, refused)
        return self._submit(s, group, msg, call)

    @staticmethod
    def _submit(s: WorkerSession, group: Group, msg: device_pb2.Collective, call: Callable[[], None]) -> _Waiting:
        """Run `call` in the group's thread; its outcome in the returned `_Waiting`."""
        pending = _Waiting(msg)
        threads = torch.get_num_threads()
        device = s.device.torch_device

        def wait() -> None:
            try:
                if device.type == "cuda":  # pragma: no cover - needs real GPUs
                    with torch.cuda.device(device):
                        call()
                else:
                    call()
            except Exception as exc:
                pending.error = exc
            finally:
                pending.done.set()

        group.submit(wait, f"gpupool-collective-{s.number}", threads)
        return pending

    @staticmethod
    def _p2p(group: Group, transfers: list[tuple[seclink.Transfer, torch.Tensor | None]]) -> None:
        """A rank's batch of sends and receives (round 44): over the secure group's rank-to-rank links
        (seclink.SecureGroup.p2p), or gloo's own send and recv (`_gloo_p2p`). A refusal is this call's alone (the
        links stay in step, the group goes on); any other failure breaks the group, as a collective's does."""
        pg = group.wait_ready()
        if _is_nccl(pg):  # pragma: no cover - real GPUs (tests/unit/test_server_collectives_nccl.py)
            raise FailedPrecondition(
                "send/recv in a group of three or more do not run over NCCL (--collectives gloo on real GPUs with "
                "--landlock off --seccomp off): NCCL ignores their tags and takes no host buffer; run the daemons "
                "with --collectives secure (the default), or confined (gloo)"
            )
        try:
            if isinstance(pg, seclink.SecureGroup):
                pg.p2p([t for t, _ in transfers]).wait()
            else:
                _gloo_p2p(pg, [t for t, _ in transfers])
        except GpupoolError:
            raise
        except Exception as exc:
            group.broken = f"send/recv of {group.describe()} failed: {_short(exc)}"
            raise Unavailable(group.broken) from None
        finally:  # a receive into a copy (a conjugate view, a strided one): its values go back, received or not
            for t, original in transfers:
                if original is not None and t.tensor is not None and not t.sending and t.tensor is not original:
                    original.copy_(t.tensor)

    def _call(
        self,
        group: Group,
        msg: device_pb2.Collective,
        tensors: list[Any],
        inputs: list[Any],
        device: torch.device,
        refused: Exception | None = None,
    ) -> None:
        pg = group.wait_ready()
        agreement: seclink.Agreement | None = None
        if isinstance(pg, seclink.SecureGroup):  # (round 40) the agreement travels in the transfer's first frames
            agreement = self._agreement(msg, tensors, inputs, refused)
        else:
            try:
                self._agree(group, pg, msg, tensors, inputs, device, refused)
            finally:
                group.forget_ids()  # (store56) an NCCL subgroup's communicator formed in the agreement's allgather
        started = time.perf_counter()
        try:
            if agreement is not None and refused is not None:
                pg.agree(agreement)  # raises `refused` here, the peers' InvalidArgument there
            _run_kind(pg, msg, tensors, inputs, group, agreement)
            if tensors and tensors[0].dtype is torch.bool:  # (one dtype: _check_shape)
                _check_bools(msg, tensors, group)
            if self.speed is not None:
                self.speed.hold_collective(
                    msg.kind, sum(t.numel() * t.element_size() for t in tensors), group.size, started
                )
        except GpupoolError:
            raise
        except Exception as exc:
            group.broken = f"collective {msg.kind} of {group.describe()} failed: {_short(exc)}"
            raise Unavailable(group.broken) from None

    def _agree(
        self,
        group: Group,
        pg: Any,
        msg: device_pb2.Collective,
        tensors: list[Any],
        inputs: list[Any],
        device: torch.device,
        refused: Exception | None = None,
    ) -> None:
        """All-gather each rank's signature of this call; refuse (on every rank alike) when they differ, or when a
        rank's daemon refused its call (`refused`, its signature's kind `_REFUSED`: its peers are told which). The
        plaintext transport's check, a round trip of its own; the secure one's travels in the transfer
        (`_agreement`)."""
        dev = device if device.type == "cuda" else torch.device("cpu")  # (a refused call's tensors may be elsewhere)
        mine = torch.tensor(_signature(msg, tensors, inputs, refused), dtype=torch.int64, device=dev)
        rows = [torch.empty_like(mine) for _ in range(group.size)]
        try:
            pg.allgather([rows], [mine]).wait()
        except Exception as exc:
            group.broken = f"collective {msg.kind} of {group.describe()} failed: {_short(exc)}"
            raise Unavailable(group.broken) from None
        error = _verdict(msg, [r.tolist() for r in rows], refused)
        if error is not None:
            raise error

    @staticmethod
    def _agreement(
        msg: device_pb2.Collective, tensors: list[Any], inputs: list[Any], refused: Exception | None
    ) -> seclink.Agreement:
        """The same check for the secure transport, folded into the transfer (seclink.Agreement: each rank's
        signature in its first frame of the call, the hub's verdict before any tensor byte is used)."""
        signature = _SIGNATURE.pack(*_signature(msg, tensors, inputs, refused))
        return seclink.Agreement(
            signature, lambda rows: _verdict(msg, [list(_SIGNATURE.unpack(r)) for r in rows], refused)
        )


def _transfers(
    s: WorkerSession, msg: device_pb2.Collective, group: Group
) -> list[tuple[seclink.Transfer, torch.Tensor | None]]:
    """A p2p call's transfers, each with the session's tensor it reads or writes (None: refused). A malformed call
    (lists of other lengths, a peer that is not another rank of the group) is refused at once, with no part taken:
    its peers cannot be known. A transfer refused here (a handle that does not resolve, a tensor received into twice
    or both sent and received in one batch) still takes its part, marked refused (seclink.SecureGroup.p2p)."""
    n = len(msg.tensors)
    if not n or msg.inputs or not len(msg.peers) == len(msg.tags) == len(msg.sending) == n:
        raise InvalidArgument(
            f"p2p takes tensors and, for each, a peer, a tag and a direction; got {n} tensors, {len(msg.inputs)} "
            f"inputs, {len(msg.peers)} peers, {len(msg.tags)} tags, {len(msg.sending)} directions"
        )
    for peer in msg.peers:
        if peer >= group.size or peer == group.rank:
            raise InvalidArgument(f"p2p: rank {group.rank} of {group.size} cannot send to or receive from rank {peer}")
    handles = list(msg.tensors)
    written = {h for h, sending in zip(handles, msg.sending, strict=True) if not sending}
    out: list[tuple[seclink.Transfer, torch.Tensor | None]] = []
    for h, peer, tag, sending in zip(handles, msg.peers, msg.tags, msg.sending, strict=True):
        refused: Exception | None = None
        t: torch.Tensor | None = None
        try:
            t = s.resolve(h)
            if h in written and handles.count(h) > 1:
                raise InvalidArgument(f"p2p names tensor {h:#x} twice in one batch, once to receive into")
            _check_quota(s, t, h, P2P)
        except GpupoolError as exc:  # (PoisonedInput is one)
            t, refused = None, exc
        buf = None if t is None else _plain(t)
        code = -1 if t is None else _dtype_code(t.dtype)
        out.append((seclink.Transfer(int(peer), int(tag), bool(sending), buf, code, refused), t))
    return out


def _gloo_p2p(pg: Any, transfers: list[seclink.Transfer]) -> None:
    """Sends and receives on the plaintext transport: gloo's own send and recv (NCCL's on real GPUs), each transfer a
    header (`seclink._P2P`'s four integers, a tensor of its own) and then its bytes as uint8, both under its tag, so
    that a receiver checks dtype and size before it takes a byte (gloo aborts a process whose receive meets more
    bytes than its buffer holds); where they disagree it takes the bytes into a scratch buffer and drops them. Sends
    are posted first and waited for last, so a ring drains."""
    sent: list[Any] = []
    first: Exception | None = None
    keep: list[torch.Tensor] = []  # the buffers of sends in flight
    for t in transfers:
        if not t.sending:
            continue
        if t.tensor is None:
            head = torch.tensor([t.tag, -1, -1, -1], dtype=torch.int64)
            first = first or t.refused
        else:
            host = seclink._host(t.tensor)
            head = torch.tensor([t.tag, t.code, host.numel(), host.numel() * host.element_size()], dtype=torch.int64)
            keep.append(host)
        sent.append(pg.send([head], t.peer, t.tag))
        keep.append(head)
        if t.tensor is not None and host.numel():
            sent.append(pg.send([host.reshape(-1).view(torch.uint8)], t.peer, t.tag))
    for t in transfers:
        if t.sending:
            continue
        head = torch.empty(4, dtype=torch.int64)
        pg.recv([head], t.peer, t.tag).wait()
        _, code, numel, nbytes = head.tolist()
        error: Exception | None = None
        if numel < 0:
            error = InvalidArgument(
                f"recv on gpupool: rank {t.peer}'s daemon refused its send (tag {t.tag}; its own error there says why)"
            )
        elif t.tensor is None:
            error = t.refused
        elif code != t.code or numel != t.tensor.numel():
            error = InvalidArgument(
                f"send/recv on gpupool disagree (tag {t.tag}): rank {t.peer} sends {numel} elements of dtype code "
                f"{code}; this rank receives {t.tensor.numel()} elements of {t.tensor.dtype} (code {t.code})"
            )
        if error is not None:
            if nbytes > 0:
                pg.recv([torch.empty(nbytes, dtype=torch.uint8)], t.peer, t.tag).wait()
            first = first or error
            continue
        assert t.tensor is not None
        host = seclink._host(t.tensor)
        if host.numel():
            pg.recv([host.reshape(-1).view(torch.uint8)], t.peer, t.tag).wait()
        if host.dtype is torch.bool and bool((host.view(torch.uint8) > 1).any()):  # (as `_check_bools`)
            host.zero_()
            first = first or InvalidArgument(f"recv on gpupool: rank {t.peer} sent bool bytes other than 0 and 1")
        if host is not t.tensor:
            t.tensor.copy_(host)
    for work in sent:
        work.wait()
    if first is not None:
        raise first


def _signature(
    msg: device_pb2.Collective, tensors: list[Any], inputs: list[Any], refused: Exception | None
) -> list[int]:
    """A call's signature: what every rank's call must agree on (kind, op, root, counts, numels, dtype), its kind
    `_REFUSED` where this rank's daemon refused it."""
    all_t = tensors + inputs
    dtype = _dtype_code(all_t[0].dtype) if all_t else -1
    kind = _REFUSED if refused is not None else KINDS.index(msg.kind)
    return [kind, _OPS.index(msg.reduce_op), msg.root, len(tensors), len(inputs),
            sum(t.numel() for t in tensors), sum(t.numel() for t in inputs), dtype]  # fmt: skip


def _verdict(msg: device_pb2.Collective, rows: list[list[int]], refused: Exception | None) -> Exception | None:
    """The outcome of the agreement on every rank alike: None (go on), this rank's own refusal, or an
    INVALID_ARGUMENT naming each rank's signature."""
    if refused is not None:
        return refused
    if any(r != rows[0] for r in rows):
        parts = "; ".join(f"rank {i}: {_describe(r)}" for i, r in enumerate(rows))
        return InvalidArgument(f"ranks disagree on a collective {msg.kind}: {parts}")
    return None


def _always() -> bool:
    return True


class _Waiting:
    """A collective under way in its own thread: its command, and its outcome once `done`."""

    def __init__(self, msg: device_pb2.Collective) -> None:
        self.key = msg.SerializeToString()
        self.done = threading.Event()
        self.error: Exception | None = None


def _dtype_code(dtype: torch.dtype) -> int:
    """`dtype`'s number in a call's signature: `_DTYPES`', else 100 + its element size."""
    code = _DTYPES.get(dtype)
    return code if code is not None else 100 + dtype.itemsize


def _describe(sig: list[int]) -> str:
    kind, op, root, nt, ni, numel_t, numel_i, dtype = sig
    if kind == _REFUSED:
        return "a call its daemon refused (its own error there says why)"
    names = {v: str(k).removeprefix("torch.") for k, v in _DTYPES.items()}
    return (
        f"{KINDS[kind] if 0 <= kind < len(KINDS) else '?'}({_OPS[op] if 0 <= op < len(_OPS) else '?'}) "
        f"root {root}, {nt} tensor(s) of {numel_t} elements, {ni} input(s) of {numel_i}, {names.get(dtype, dtype)}"
    )


def _check_shape(
    msg: device_pb2.Collective, tensors: list[Any], inputs: list[Any], size: int, transport: str = "secure"
) -> None:
    """Refuse (INVALID_ARGUMENT, before any byte moves) every call the transport or the copies after it would raise
    on mid-call: such a raise broke the group (UNAVAILABLE) and failed its peers' sessions."""
    kinds_dtypes = {t.dtype for t in tensors + inputs}
    if len(kinds_dtypes) > 1:
        raise InvalidArgument(f"collective {msg.kind} mixes dtypes {sorted(str(d) for d in kinds_dtypes)}")
    if transport != "secure" and kinds_dtypes == {torch.int16}:
        # (round 38) neither gloo nor NCCL has int16 ("Invalid scalar type" mid-call: UNAVAILABLE, the group broken)
        raise InvalidArgument(
            f"collective {msg.kind} of int16 tensors: the {transport} transport has no int16 (the secure one has)"
        )
    devices = {t.device for t in tensors + inputs}
    if len(devices) > 1:
        raise InvalidArgument(f"collective {msg.kind} mixes devices {sorted(map(str, devices))}")
    if msg.kind in ("allreduce", "broadcast") and (not tensors or inputs):
        raise InvalidArgument(f"{msg.kind} takes tensors and no inputs")
    if msg.kind == "broadcast" and msg.root >= size:
        raise InvalidArgument(f"broadcast root {msg.root} is not a rank of a group of {size}")
    if msg.kind == "broadcast" and len(tensors) > 1:
        # (round 35, red35) one gloo broadcast per tensor: ranks whose tensors agreed in all (`_agree`) but were
        # split otherwise, 10 + 20 elements against 20 + 10, sent 80 bytes where gloo's receiving thread expected 40
        # (gloo::EnforceNotMet, std::terminate: the daemon under --isolation thread). torch's callers send one
        raise InvalidArgument("broadcast takes one tensor per rank (one device per process)")
    if msg.kind == "allgather":
        if len(inputs) != 1 or len(tensors) != size or any(t.numel() != inputs[0].numel() for t in tensors):
            raise InvalidArgument(f"allgather takes 1 input and {size} outputs of its size")
        if any(t.shape != inputs[0].shape for t in tensors):
            # (round 38) the transport refused an output of the input's size but another shape mid-call
            # (UNAVAILABLE, the group broken); torch.distributed's all_gather refuses it as well
            raise InvalidArgument(
                f"allgather takes outputs of its input's shape {list(inputs[0].shape)}, not "
                f"{[list(t.shape) for t in tensors]}"
            )
    if msg.kind == "reduce_scatter":
        total = sum(t.numel() for t in inputs)
        if len(tensors) != 1 or total != size * tensors[0].numel() or len(inputs) not in (1, size):
            raise InvalidArgument(f"reduce_scatter takes 1 output and 1 or {size} inputs of {size}x its size")
    if len({id(t) for t in tensors}) != len(tensors):
        raise InvalidArgument(f"{msg.kind} names one tensor twice")
    if msg.reduce_op == "avg" and kinds_dtypes == {torch.bool}:
        # (round 38) the sum's floor division by the group's size raised on bools after the transport (UNAVAILABLE,
        # the group broken); torch.distributed's gloo refuses AVG for every dtype
        raise InvalidArgument(f"{msg.kind} with reduce op avg is not defined for bool tensors")
    if msg.reduce_op in ("min", "max", "product") and kinds_dtypes and next(iter(kinds_dtypes)).is_complex:
        # (round 36) gloo refused it mid-call ("all_reduce does not support on complex tensors"; the secure hub's
        # `torch.maximum` raised), an UNAVAILABLE that broke the group; torch.distributed refuses it before calling
        raise InvalidArgument(
            f"{msg.kind} with reduce op {msg.reduce_op} is not defined for complex tensors "
            f"({next(iter(kinds_dtypes))}): sum and avg are"
        )


def _check_bools(msg: device_pb2.Collective, tensors: list[Any], group: Group) -> None:
    """The bool tensors a collective wrote hold only 0 and 1, as every upload's (gpupool/wire.py
    `check_bool_bytes`: any other byte is undefined behaviour in torch's kernels). A rank is anyone holding the
    group's secret, which every holder of the lease's tokens can compute: round 35 (red35) posed as rank 1 from a
    plain process, no daemon session of its own, and broadcast bytes of 7 into rank 0's session's bool tensor, on
    both transports and isolations. Refused after the fact (the bytes came from the peer, whole or reduced): the
    collective fails, its outputs are poisoned (unbound, the executor's failure path) and the group is broken."""
    for t in tensors:
        if t.numel() and int(t.view(torch.uint8).max()) > 1:
            group.broken = (
                f"collective {msg.kind} of {group.describe()}: a peer sent bool bytes other than 0 and 1 (undefined "
                "in torch's kernels); its outputs are dropped and the group is over"
            )
            raise InvalidArgument(group.broken)


def _run_kind(
    pg: Any,
    msg: device_pb2.Collective,
    tensors: list[Any],
    inputs: list[Any],
    group: Group,
    agreement: seclink.Agreement | None = None,
) -> None:
    """One call of the transport (`_check_shape` let through one tensor a broadcast), with the secure transport's
    `agreement` where there is one."""
    kind = msg.kind
    extra: dict[str, Any] = {} if agreement is None else {"agreement": agreement}
    if kind == "barrier":
        pg.barrier(**extra).wait()
    elif kind in ("allreduce", "reduce_scatter"):
        if kind == "allreduce":
            flat = torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else _plain(tensors[0])
        else:
            flat = torch.cat([t.reshape(-1) for t in inputs])
        op = msg.reduce_op or "sum"
        if flat.dtype is torch.bool:  # (round 38) a bool sum is an or, a product an and, as gloo's: the secure hub
            # summed bytes (1 + 1 = 2), which `_check_bools` then refused as a peer's forgery and the group broke
            op = {"sum": "max", "product": "min"}.get(op, op)
        opts = dist.AllreduceOptions()
        opts.reduceOp = _REDUCE[op]  # type: ignore[assignment]
        pg.allreduce([flat], opts, **extra).wait()
        if msg.reduce_op == "avg":
            exact = flat.is_floating_point() or flat.is_complex()  # (complex: floor_divide_ raised after the sum)
            flat.div_(group.size) if exact else flat.floor_divide_(group.size)
        if kind == "reduce_scatter":
            n = tensors[0].numel()
            tensors[0].copy_(flat[group.rank * n : (group.rank + 1) * n].view_as(tensors[0]))
        else:
            _scatter_back(flat, tensors)
    elif kind == "broadcast":
        for t in tensors:
            buf = _plain(t)
            bopts = dist.BroadcastOptions()
            bopts.rootRank = msg.root
            pg.broadcast([buf], bopts, **extra).wait()
            if buf is not t:
                t.copy_(buf)
    elif kind == "allgather":
        outs = [_plain(t) for t in tensors]
        mine = _plain(inputs[0])
        if mine.is_complex():  # (round 36) gloo has no complex allgather ("Invalid scalar type": UNAVAILABLE, the
            # group broken): their real views (the same bytes), as torch.distributed's all_gather sends them
            pg.allgather([[torch.view_as_real(o) for o in outs]], [torch.view_as_real(mine)], **extra).wait()
        else:
            pg.allgather([outs], [mine], **extra).wait()
        for t, o in zip(tensors, outs, strict=True):
            if o is not t:
                t.copy_(o)


def _check_quota(s: WorkerSession, t: torch.Tensor, handle: int, kind: str) -> None:
    """ResourceExhausted for a tensor whose values are more bytes than the session's quota: an expanded view (a few
    bytes of memory, any logical size), whose dense copy (`_plain`, `seclink._host`) no quota counts. Until the round
    44 review a p2p send of one element expanded to 2**36 allocated 256 GiB of host memory outside the quota (where
    the allocator gave less, the call failed before taking its part, and the peer's group broke at its timeout), and
    so did a collective's tensor (as executor.py refuses such a download)."""
    n = t.numel() * t.element_size()
    if n > s.quota:
        raise ResourceExhausted(
            f"{kind} of tensor {handle:#x}: its {n} bytes of values (an expanded view?) exceed the session's "
            f"{s.quota} byte quota"
        )


def _plain(t: torch.Tensor) -> torch.Tensor:
    """`t` where the transport may move its bytes as they are (contiguous, no conjugate bit), else a copy of its
    values (copied back by the caller). A conjugate view (`aten::_conj`, allowed) holds the bytes of the tensor it
    views: until round 36's review the view itself went to the transport, which raised on it (gloo's `view_as_real`,
    the secure hub's byte view): UNAVAILABLE, the group broken. The cat of several tensors and `copy_` back into
    them read and write values already."""
    return t if t.is_contiguous() and not t.is_conj() else t.resolve_conj().contiguous()


def _scatter_back(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        if flat.data_ptr() != t.data_ptr() or len(tensors) > 1:
            t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def _check_network() -> None:
    """Whether this worker may open sockets at all (its seccomp filter answers EPERM when its token grants no
    network, or the daemon runs --worker-network off): a clear PERMISSION_DENIED instead of gloo's error."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except PermissionError:
        raise PermissionDenied(
            "this session's worker may not open network sockets: collectives between daemons need a lease of "
            "several devices (its tokens grant network) on daemons started with --worker-network on"
        ) from None


class _Done:
    def wait(self, *_: Any) -> bool:
        return True


class _Solo:
    """The process group of a one-rank job: every collective is the identity (allgather copies its input)."""

    def allreduce(self, *_: Any) -> _Done:
        return _Done()

    def broadcast(self, *_: Any) -> _Done:
        return _Done()

    def barrier(self, *_: Any) -> _Done:
        return _Done()

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], *_: Any) -> _Done:
        for out, inp in zip(outputs, inputs, strict=True):
            out[0].copy_(inp)
        return _Done()


def _peer_address(address: str) -> tuple[str, int]:
    """HOST and PORT of a group store's address, checked for its form only (INVALID_ARGUMENT), and, where HOST is an
    IP address, refused unless it is on a loopback or private network (the daemon must not be pointed at arbitrary
    hosts of the internet by its client). A host name is resolved in the join's thread (`_resolve_store`), where
    every failure is the one uniform answer of a join (`Group.not_formed`)."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"bad group store address {address!r} (HOST:PORT)")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host, int(port)  # a name: `_resolve_store`
    if not _private(ip):
        raise PermissionDenied(f"group store {address} is not on a private network ({ip})")
    return host, int(port)


def _private(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_private or ip.is_loopback


def _resolve_store(host: str, port: int) -> list[str]:
    """The IP addresses a rank connects to for its group's store at HOST:PORT, resolved once, here: every one is on
    a loopback or private network, or none is used. Round 21 checked the addresses and handed on the NAME, which the
    TCP probe and TCPStore resolved again at connect: a hostile DNS server answering a private address first and a
    public one (or any host of the daemon's network) second pointed the daemon past the check (DNS rebinding).
    Raises with the detail (the resolver's error, the address refused), which goes to the operator's log only: a
    tenant told "cannot resolve" for some names and not others learns which names the daemon's resolver knows."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise Unavailable(f"cannot resolve {host!r}: {exc}") from None
    addresses: list[str] = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if not _private(ip):
            raise PermissionDenied(f"{host!r} resolves to {ip}, not on a private network")
        if str(ip) not in addresses:
            addresses.append(str(ip))
    if not addresses:
        raise Unavailable(f"{host!r} resolves to no address")
    return addresses


def _short(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
