"""The daemon's side of a session: who it belongs to, its limits, its stream's replies, its place in the fair
queue, and the runner (its worker process) that holds its tensors. No tensor ever lives here.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

from gpupool import protocol
from gpupool.tokens import TokenClaims

from .devices import Device
from .fairqueue import FairQueue
from .portshare import Share
from .slices import SideChunk
from .worker import Runner


class Unread:
    """The unread reply bytes of a host's open sessions together (`Daemon._room_for_replies`, --max-unread-bytes),
    kept as replies are queued and taken: a slice's check reads one number instead of summing every session's.
    A session counts from its creation until `Daemon.close_session` takes it out of the daemon's sessions
    (`leave`): what a closed session still holds (a stream that ended with replies unread) counts no more, as
    when the check summed the daemon's open sessions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total = 0

    def leave(self, s: FrontSession) -> None:
        """Take the session's bytes out of the total, for good (it is closed)."""
        with self.lock:
            if s.counted:
                s.counted = False
                self.total -= s.outbox_bytes


# A reply frame of at most this many bytes may be written to a frames socket by the thread that produced it
# (`FrontSession.send`); a larger one (a download's) goes through the session's writer, as every reply did before.
DIRECT_MAX = 64 * 1024


class Outbox(queue.SimpleQueue[Any]):
    """A session's replies for its writer, in order, and how many of them the writer has not finished with
    (`pending`: put and not yet `done`). A reply may skip the queue (`FrontSession.send`'s direct write) only while
    none is pending, so that it never overtakes one queued before it."""

    def __init__(self) -> None:
        self.pending = 0
        self._count = threading.Lock()

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        with self._count:
            self.pending += 1
        super().put(item)

    def put_nowait(self, item: Any) -> None:  # (SimpleQueue's own would not count it)
        self.put(item)

    def done(self) -> None:
        """The writer finished with an item it took (sent it, or dropped it)."""
        with self._count:
            self.pending -= 1


class Unsent(bytes):
    """The rest of a reply record that a direct write (`FrontSession.send`) could not hand to the socket without
    waiting: bytes of the side socket's record stream, already framed, which the writer sends as they are (for TLS,
    from the same slice the write stopped at: OpenSSL's retry rule)."""


class FrontSession:
    """One attached lease on one device, as the daemon process sees it."""

    def __init__(
        self,
        session_id: str,
        number: int,
        claims: TokenClaims,
        device: Device,
        quota: int,
        tenant: str,
        unread: Unread | None = None,
    ) -> None:
        self.session_id = session_id
        self.number = number
        self.handle_base = number << 32
        self.lease_id = claims.lease_id
        self.tenant = tenant
        self.device = device
        self.quota = quota
        self.share = claims.share
        self.claims = claims  # the token whose terms it holds (its newest: `Daemon.refresh`)
        # the claims whose terms its count and queue have taken, under its lock (`Daemon._take_terms`); its worker's
        # new quota, told with its next slice (-1: none); what it held past a smaller quota at that refresh, still
        # its own
        self.terms_of = claims
        self.tell_quota = -1
        self.kept = 0
        self.expires_at = claims.expires_at
        # its lease's end on the monotonic clock, taken at its attach and each renewal (`Daemon.lapsed`: no step of the
        # wall clock lengthens it)
        self.ends_mono = float("inf")
        self.lock = threading.RLock()  # held while a slice of this session runs
        self.runner: Runner | None = None
        self.worker_uid = -1  # its worker's own uid (--worker-uids), given back when the session closes
        self.port_share: Share | None = None  # its block of --collective-ports (granted network), given back likewise
        # Mirrored from the worker after each slice (Status, metrics, the device's accounting).
        self.used = 0
        self.ops = 0
        self.handles = 0
        self.graph_bytes = 0  # host memory of its captured graphs, estimated (--max-graph-memory)
        self.busy_seconds = 0.0
        self.closed = False
        self.close_reason = ""
        # the client certificate (PEM) of the call that attached it, where the daemon sees them: a revocation of it
        # ends the session (`Daemon.revoke_certificates`; round 45, secrev45)
        self.cert_pem: bytes | None = None
        # its DER (the side port's hello compares the socket's with it: round 46, the session's id is no bearer
        # credential for another certificate)
        self.cert_der: bytes | None = None
        self.outbox = Outbox()  # replies for the stream (or its frames socket), in order
        # Held by whoever writes a reply to its frames socket: its writer, for each item it takes, or the thread
        # that produced a small reply while nothing is pending (`send`: no hand-off to the writer).
        self.reply_lock = threading.Lock()
        self.written_direct = 0  # replies `send` wrote to the frames socket itself (or began to: `Unsent`)
        # The rest of a record a direct write began (`Unsent`, under `reply_lock`): its writer sends it before
        # anything else it writes, even an item queued ahead of its `Unsent` (by another thread, meanwhile)
        self.unsent: Unsent | None = None
        self.outbox_bytes = 0  # bytes of replies produced but not yet handed to gRPC
        self.unread = unread if unread is not None else Unread()  # the host's total of them (under its lock)
        self.counted = True  # its outbox_bytes are in `unread.total` (until its session closes: `Unread.leave`)
        self._outbox_lock = threading.Lock()
        self.entry: Any = None  # its place in the device's fair queue
        self.streaming = False
        self.error_pending = False  # its worker holds an error for the next Sync (mirrored after each slice)
        # Its GPU may still run its slices (a CUDA device's run-ahead, devices.SliceTimer; mirrored after each
        # slice): a lone Sync then goes to the worker, which waits for the GPU before it answers.
        self.device_busy = False
        self.gpu_clock = GpuClock()  # caps the GPU seconds its worker reports (a CUDA device's)
        self.bulk: Any = None  # its bound side socket (server/bulkside.py BulkLink), if its client opened one
        # where its frames come from, fixed by the first: "stream" (its gRPC stream), "side" (its side socket
        # opened for frames), "" (none yet); one carrier per session, so its commands have one order
        self.carrier = ""

    def frames_on(self, side: bool) -> bool:
        """Whether a frame may come on this carrier (the side socket, or the stream): the first one fixes it."""
        want = "side" if side else "stream"
        if self.carrier == want:
            return True
        with self._outbox_lock:
            if not self.carrier:
                self.carrier = want
            return self.carrier == want

    def bind_bulk(self, link: Any) -> bool:
        """Bind the session's side socket: one per session, and none once it is closed; a socket for frames only
        while no frame came on the stream (it then fixes the session's carrier)."""
        with self._outbox_lock:
            if self.bulk is not None or self.closed:
                return False
            if getattr(link, "frames", False):
                if self.carrier == "stream":
                    return False
                self.carrier = "side"
            self.bulk = link
        if self.closed:  # closed while binding: close_session may have missed it
            link.close()
        return True

    def end_bulk(self) -> None:
        """The session closed: its side socket ends (`BulkLink.end`: a frames socket carries the replies queued before
        the end and the BULK_END first; any other closes now)."""
        with self._outbox_lock:
            link = self.bulk
        if link is not None:
            link.end()

    @property
    def worker_pid(self) -> int:
        return self.runner.pid if self.runner is not None else 0

    def send(self, item: Any, size: int = -1) -> None:
        """Queue a reply for the stream, counting its bytes (`size`: its `reply_bytes`, when the caller has them)
        until `sent` says gRPC took them. A small reply frame of a session whose frames use its side socket is
        written there by this thread instead where that needs no wait (`_write_now`)."""
        if type(item) is bytes and self._write_now(item):
            return
        n = reply_bytes(item) if size < 0 else size
        unread = self.unread
        with unread.lock:
            self.outbox_bytes += n
            if self.counted:
                unread.total += n
        self.outbox.put(item)

    def _write_now(self, frame: bytes) -> bool:
        """Write a reply frame to the session's frames socket from this thread (the stream's reader that ran its
        slice, the device's thread), where nothing queued for the writer is pending (nothing it would overtake), the
        writer is not writing (`reply_lock`), no bulk Get's chunks may be among the replies (their bytes follow their
        announcement: the writer's) and the frame is small: no hand-off to the writer thread, whose wake-up and GIL
        exchange cost more than the write (bench/daemon_syscalls.py: ~8 system calls and 2 context switches a round
        trip). The socket is never waited for: what it does not take at once is queued for the writer
        (`Unsent`, under the lock, before any later reply), as is everything when the socket failed. False: not
        written (queue it)."""
        link = self.bulk
        if link is None or not link.frames or len(frame) > DIRECT_MAX or self.closed:
            return False
        if not self.reply_lock.acquire(blocking=False):
            return False
        try:
            if self.outbox.pending or link.gets or link.closed:
                return False
            record = protocol.frame_record(frame)
            self.written_direct += 1  # (before the bytes go: a client that read them sees it counted)
            sent = link.send_now(record)
            if sent < len(record):
                # Its bytes must come next on the socket, but the queue may already hold an item another thread
                # put after the check above (a reader's error, a drain's end): `unsent` puts them first, and the
                # queued `Unsent` wakes the writer and counts them
                rest = self.unsent = Unsent(memoryview(record)[sent:])
                self.send(rest, len(rest))
            return True
        finally:
            self.reply_lock.release()

    def answer_sync(self, request_id: int, queue: FairQueue, outbox_limit: int) -> bool:
        """The fast path of a round trip: a lone Sync without scalars (`protocol.lone_sync`: the frame is exactly
        what a client's round trip sends), sent while everything before it has run and
        no error waits for it, is answered here, in the stream's reader, without a slice, a device-thread hop
        or a visit to the worker. Its answer is what the worker would give (an empty SyncReply) and it follows
        every earlier reply: those reach the outbox before the fair queue marks the session idle, and only this
        reader queues the session's commands. The worker must be alive: the kernel's view of it (`Runner.idle`,
        no wake-up) says so, or else it answers a ping (a process wake-up, not a slice); one that died, or has a
        fatal signal pending, does neither, and the ordinary path reports it. False: the Sync takes the ordinary
        path."""
        if self.error_pending or self.device_busy or self.closed or self.outbox_bytes >= outbox_limit:
            return False
        if not queue.idle(self.entry) or self.runner is None:
            return False
        with self.lock:  # no slice runs (the session is idle) and a close waits: the runner's socket is ours
            if self.closed or not (self.runner.idle() or self.runner.alive()):
                return False  # a worker that died (or is dying) is reported by the ordinary path
        self.send(protocol.sync_reply(request_id))
        return True

    def hand_over(self) -> None:
        """Called by the stream's reader after it queued replies itself (a fast Sync, a slice it ran, before
        that slice's bookkeeping): let the stream's writer take the GIL now, before this thread goes on. Without it the
        writer, woken by the outbox, waits for the GIL until the reader is back in gRPC's receive (tens of us of
        Python in grpc's request iterator), on every round trip: `sched_yield` (<1 us, no sleep; `time.sleep(0)`
        sleeps ~60 us of timer slack) halved the reply's hop to the writer (BENCHMARKS.md, round 16, front16)."""
        if not self.outbox.empty():
            os.sched_yield()

    def sent(self, item: Any) -> None:
        n = len(item) if type(item) is bytes else reply_bytes(item)
        unread = self.unread
        with unread.lock:
            self.outbox_bytes -= n
            if self.counted:
                unread.total -= n


class GpuClock:
    """What the daemon books of the GPU seconds a session's worker on a CUDA device reports. Its slices' times
    come late there (devices.SliceTimer: a slice's with a later slice's result), so one result's seconds may
    exceed that slice's wall time, and the per-slice cap a fake GPU's results get (`min(seconds, wall)`) would
    drop them. The bound that holds: a session's slices run on one stream, one after another, each inside the time
    between its slice's start here and the result that reports it, so what the worker reports in all is at most the
    time since its first slice started: `take` books a report up to what is left of that (a worker cannot book
    more device time than passed; under-reporting it could do before as well)."""

    __slots__ = ("origin", "taken")

    def __init__(self) -> None:
        self.origin = -1.0  # perf_counter at the start of the session's first slice (-1: none yet)
        self.taken = 0.0  # seconds booked so far

    def take(self, reported: float, started: float, now: float) -> float:
        """The seconds of a result that reported `reported`, its slice run from `started` to `now` (perf_counter)."""
        if self.origin < 0:
            self.origin = started
        got = min(reported, max(0.0, now - self.origin - self.taken))
        self.taken += got
        return got


def reply_bytes(item: Any) -> int:
    """What a queued reply holds in memory: a download's frames, or one serialized frame."""
    if type(item) is bytes:  # most replies: a serialized frame
        return len(item)
    if isinstance(item, list):
        return sum(len(b) for b in item)
    if isinstance(item, bytes | bytearray | SideChunk):  # a side chunk holds its download slot until sent
        return len(item)
    return 64
