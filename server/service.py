"""The gRPC face of the daemon: a thin servicer (protobuf in, one call into Daemon, protobuf out) and
`create_server(daemon, address) -> (server, port, health)`.

The Stream handler takes raw bytes and parses ClientFrames itself, so a malformed frame ends the stream
with INVALID_ARGUMENT instead of an opaque deserialization failure. Handlers raise gpupool errors; the server's
`errors.ErrorInterceptor` turns them into statuses (the one translation at this edge).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from functools import partial
from typing import Any

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from gpupool import certrevoke, config, protocol, tls, tokens
from gpupool._proto import device_pb2
from gpupool.callguard import RequestGuard
from gpupool.errors import (
    ErrorInterceptor,
    GpupoolError,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
    error_class,
)

from . import bulk, bulkside, slices
from .bulk import STRIP_MIN
from .bulkside import BulkPort
from .daemon import END_OF_STREAM, Closed, Daemon
from .front import FrontSession, Unsent

log = logging.getLogger(__name__)
lone_sync = protocol.lone_sync
split_graphs = slices.split_graphs
unread_bulk = slices.unread_bulk
SERVICE = "gpupool.v1.Device"
MAX_WORKERS = 256  # one thread per open stream plus unary calls; streams are long-lived, so be generous
KEEPALIVE_TIME = 10.0  # seconds between the daemon's pings of a connection that is quiet
# Seconds a ping may go unanswered before the daemon drops the connection, and with it the sessions whose streams it
# carries. A client stopped by Ctrl-Z (a debugger, a sleeping laptop) answers no ping while its kernel still
# acknowledges every byte, and its user expects `fg` to carry on after minutes: until round 27 five seconds (gRPC's
# own ping timeout of a minute in effect) ended such a session. gRPC makes this the connection's TCP_USER_TIMEOUT
# too (bytes sent but not acknowledged), so a vanished host is found this late on the stream; a session with a side
# socket learns it from that socket's keepalive within about 3 minutes (server/bulkside.py `PEER_*`), and every
# session ends with its lease.
PING_WAIT = 3600.0
# The client certificates' roles whose Status shows every session (smi run by an operator; a metrics scraper reads
# every tenant's usage on /metrics anyway). A tenant's shows its own tenant's; a host's or a server's none
# (`DeviceServicer._status_view`).
STATUS_ALL = ("admin", "metrics")


class DeviceServicer:
    def __init__(self, daemon: Daemon, bulk_port: BulkPort | None = None) -> None:
        self.daemon = daemon
        self._max_commands = daemon.config.max_frame_commands  # (its config is frozen: read once, not per frame)
        self.bulk_port = bulk_port.port if bulk_port is not None else 0
        # AttachReply.features: all of gpupool/protocol.py FEATURES but what $GPUPOOL_WITHHOLD_FEATURES withholds
        # (the workers' guards refuse those: server/guards.py `WITHHELD`)
        withheld = config.withheld_features()
        self.features = [name for name in protocol.FEATURES if name not in withheld]

    def Attach(self, request: device_pb2.AttachRequest, context: grpc.ServicerContext) -> device_pb2.AttachReply:
        # the one feature a client asks for (AttachRequest.features): applied where this daemon names it too
        layout = protocol.FEATURE_CONV_LAYOUT in request.features and protocol.FEATURE_CONV_LAYOUT in self.features
        peer = self._peer(context)  # (a token bound to a certificate attaches for it only: `Daemon.check_bound`)
        s = self.daemon.attach(request.token, conv_layout=layout, peer=peer)
        if self.daemon.config.tls.verifies_clients:  # (a certificate revoked later ends the session)
            self.daemon.note_certificate(s, peer)
        return device_pb2.AttachReply(
            session_id=s.session_id,
            handle_base=s.handle_base,
            device=s.device.info(),
            quota_bytes=s.quota,
            share=s.share,
            bulk_port=self.bulk_port,
            features=self.features,
        )

    def Detach(self, request: device_pb2.DetachRequest, context: grpc.ServicerContext) -> device_pb2.DetachReply:
        self._check_holder(request.session_id, context)
        self.daemon.detach(request.session_id)
        return device_pb2.DetachReply()

    def _check_holder(self, session_id: str, context: grpc.ServicerContext) -> None:
        """An open session named by its id (Detach) is the caller's certificate's (`Daemon.check_holder`); a closed or
        unknown id is left to the call. (Status's `gpupool-session` ids are not held to it: they show usage only, and
        round 42's tests name another certificate's sessions by their ids on purpose.)"""
        if not self.daemon.config.tls.verifies_clients:
            return
        try:
            s = self.daemon.session(session_id)
        except GpupoolError:
            return
        self.daemon.check_holder(s, self._peer(context))

    def _peer(self, context: grpc.ServicerContext) -> bytes | None:
        """The caller's client certificate (PEM) where this daemon sees them (`--tls-client-auth require`)."""
        return certrevoke.peer_pem(context) if self.daemon.config.tls.verifies_clients else None

    def Status(self, request: device_pb2.StatusRequest, context: grpc.ServicerContext) -> device_pb2.StatusReply:
        return self.daemon.status(self._status_view(context))

    def _status_view(self, context: grpc.ServicerContext) -> Callable[[device_pb2.SessionUsage], bool] | None:
        """Which sessions a Status caller sees: every one (None) with an operator's client certificate (`STATUS_ALL`:
        admin, metrics; a daemon sees certificates under `--tls-client-auth require` only); else those it shows it
        holds: a tenant certificate's tenant's, the sessions whose secret ids it names (`gpupool-session` metadata,
        one id each, as Attach returned them) and the leases whose tokens it presents (`gpupool-lease-token`,
        checked as Attach checks them: a bad one is refused). A status token (`gpupool-status-token`: the scheduler
        signs one for this host to an operator's ListPool, `gpupool smi` presents it) shows every session, under
        either --tls-client-auth; a bad one (another host's, expired, a lease token) is refused. An anonymous caller
        (none of these: any caller of a daemon under `--tls-client-auth none`, its default, that names nothing) sees
        no session and zeros: the devices' inventory (model, capacity) is no tenant's, and smi and old clients keep
        their answer."""
        role, name = self._certified(context)
        if role in STATUS_ALL:
            return None
        tenant = name if role == "tenant" else ""
        tags: set[str] = set()
        leases: set[str] = set()
        for key, value in context.invocation_metadata():
            if key == protocol.SESSION_METADATA:
                tags.add(tokens.public_session_id(str(value)))
            elif key == protocol.LEASE_TOKEN_METADATA:
                leases.add(self.daemon.lease_named(str(value), self._peer(context)))
            elif key == protocol.STATUS_TOKEN_METADATA:
                self.daemon.operator_status(str(value))
                return None
        return lambda u: (bool(tenant) and u.tenant == tenant) or u.session_id in tags or u.lease_id in leases

    def _certified(self, context: grpc.ServicerContext) -> tuple[str, str]:
        """The (role, name) the caller's client certificate names, or ("", ""): none seen (a daemon under
        `--tls-client-auth none` never asks for one: round 41's probe found no x509_pem_cert in auth_context even
        when the client presents one), or one naming no or several gpupool identities."""
        if not self.daemon.config.tls.verifies_clients:
            return "", ""
        pem = certrevoke.peer_pem(context)
        if pem is None:
            return "", ""
        named = self.daemon.config.tls.believed(x509.load_pem_x509_certificate(pem))  # (an admin one: its CA's)
        return named.pop() if len(named) == 1 else ("", "")

    def RefreshToken(
        self, request: device_pb2.RefreshTokenRequest, context: grpc.ServicerContext
    ) -> device_pb2.RefreshTokenReply:
        s = self.daemon.session(request.session_id)
        self.daemon.check_holder(s, self._peer(context))
        expires_at = self.daemon.refresh(s, request.token)
        quota, share = self.daemon.terms(s)
        return device_pb2.RefreshTokenReply(expires_at=expires_at, quota_bytes=quota, share=share)

    def Stream(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[device_pb2.ServerFrame | bytes]:
        session_id = dict(context.invocation_metadata()).get(protocol.SESSION_METADATA, "")
        if not session_id:
            raise Unauthenticated(f"missing '{protocol.SESSION_METADATA}' metadata: Attach first")
        s = self.daemon.session(str(session_id))
        self.daemon.check_holder(s, self._peer(context))
        self.daemon.claim_stream(s)
        reader = threading.Thread(target=self._read, args=(s, requests), name=f"gpupool-read-{s.number}", daemon=True)
        reader.start()
        try:
            yield from self._replies(s, context)
        finally:
            self.daemon.release_stream(s)
            self.daemon.close_session(s, "stream ended")

    def _read(self, s: FrontSession, requests: Iterator[bytes]) -> None:
        """Check frames and queue their commands (as byte spans, for the session's worker to parse); blocks
        while the session's queue is full (back-pressure)."""
        try:
            for raw in requests:
                if not s.frames_on(side=False):  # its client opened its side socket for frames
                    s.outbox.put(InvalidArgument("a frame on the stream of a session whose frames use its side socket"))
                    return
                if not self._frame(s, raw):
                    return
            # The client's half-close: the end of a stream session's frames (it ends once they ran). A session whose
            # frames use its side socket has one reader queueing its commands, that socket's: an end queued from here
            # could land between two of its frames (the slice then met it mid-batch: "slice failed", the frames
            # lost), so its half-close ends nothing; its socket's close, a Detach or the call's end end it.
            if s.frames_on(side=False):
                self.daemon.submit(s, [END_OF_STREAM], 0)
        except grpc.RpcError:
            s.outbox.put(END_OF_STREAM)  # the client went away; nothing to answer
        except Exception:  # never let a reader thread die silently
            log.exception("stream reader of session %d failed", s.number)
            s.outbox.put(END_OF_STREAM)

    def read_side(self, s: FrontSession, link: bulkside.BulkLink) -> None:
        """The reader of a session whose frames travel on its side socket (`BulkPort` runs it in the socket's
        thread once bound): the stream's reader's checks, frame by frame, on length-prefixed records read with
        the stream's message limit (`BulkLink.recv_frame`). A bad record, or a socket closed or dead (its peer's
        kernel stopped answering) mid-record, ends this session (INVALID_ARGUMENT or UNAVAILABLE, with the reason);
        so does a socket closed between frames while the session is open (its client went away: its Detach closes
        the session first). A live client that stops writing mid-record (Ctrl-Z) is waited for.

        Frames that are already on the socket when the one before them was checked (`BulkLink.ready`: a client
        running ahead of its daemon) are read and checked before that one is queued, and their commands queued
        together (`_Batch`): one slice, one hand-off to the worker and back, for up to a slice's commands, where
        each frame made its own (round 29). Each frame is checked as before; one that fails queues the frames
        read before it first, then its error, behind them in the session's queue (`_fail`), so replies and errors keep
        the order of the frames, whichever thread runs them. A frame whose bulk
        bytes follow queues the frames held before it before those bytes are read (`_take_bulk`'s `flush`): what
        came first runs while they come."""
        limit = self.daemon.config.max_message_bytes
        batch = _Batch(self.daemon.slice_commands(s))
        try:
            while not s.closed:
                raw = link.recv_frame(limit)
                if raw is None:
                    if not s.closed:  # (a half-close: the replies of what it sent still go out first)
                        self._fail(s, batch, Unavailable(f"session {s.number}'s side socket closed by its client"))
                    return
                if not self._frame(s, raw, batch):
                    return
                if batch.commands and not link.ready() and not self._flush(s, batch):
                    return
        except GpupoolError as exc:
            self._fail(s, batch, exc)
        except Exception:  # never let a reader thread die silently
            log.exception("side socket reader of session %d failed", s.number)
            self._fail(s, None, Unavailable(f"session {s.number}'s side socket reader failed"))

    def _fail(self, s: FrontSession, batch: _Batch | None, exc: GpupoolError) -> None:
        """End the session with `exc` (a reader's: its frames broke the rules, or its side socket broke) after
        everything its reader queued before: the commands `batch` holds are queued first, then `exc` itself, as the
        reader's last item (`Daemon.submit`; daemon.py END_OF_STREAM), so the replies of the frames before it (still
        queued for a busy device's thread, say) reach the client first, and then the error ends the session (until
        round 34 it went to the outbox at once and could pass them: the client lost answers it had asked for)."""
        self._flush(s, batch)
        if not self.daemon.submit(s, [exc], 0):  # the session is closed (its own end is queued) or the daemon stops
            s.outbox.put(exc)

    def _flush(self, s: FrontSession, batch: _Batch | None) -> bool:
        """Queue the commands of the frames a side reader holds (`_Batch`), if any; False when the session can take
        no more (`Daemon.submit`)."""
        if batch is None or not batch.commands:
            return True
        commands, nbytes = batch.commands, batch.nbytes
        batch.commands, batch.nbytes = [], 0
        return self.daemon.submit(s, commands, nbytes)

    def _frame(self, s: FrontSession, raw: bytes | memoryview, batch: _Batch | None = None) -> bool:
        """One frame of the session (from either carrier): checked, split and queued (with `batch`, a side
        reader's, held there to be queued with the frames after it: `read_side`); False when it ended the session
        (its error is queued after the commands `batch` held: `_fail`) or the session is gone."""
        # its lease ended: the session is closed now (its stream ends saying so). `Daemon.lapsed` reads the clocks
        # (not a copy of them here: the daemon's clock is the one sec47's tests step)
        if self.daemon.lapsed(s):
            return False
        rid = lone_sync(raw)  # a round trip: no split, no protobuf, answered here when idle
        if rid is not None:
            if not self._flush(s, batch):  # what came before it runs first (then the session is idle, usually)
                return False
            if self.daemon.sync_now(s, rid):
                s.hand_over()
                return True
        parsed: Any = None
        marked: list[int] = []  # the positions of its Uploads and Gets
        try:
            commands, graphs = split_graphs(raw, self._max_commands, marked)  # counted first
            if not graphs and len(raw) < STRIP_MIN:
                # A small frame without a RunGraph (an eager step's): its commands go to the worker as they are, and
                # the worker's parse, which comes before any of them runs, checks them (`slices.run_commands`: the
                # commands before a malformed one run, then the session ends with INVALID_ARGUMENT,
                # `Daemon._malformed`), where this parse read them all again (round 44: ~0.6k instructions an eager
                # op). Its Uploads and Gets are checked here, as `_take_bulk` reads them, but for the Uploads the
                # native runner's build reads whole (round 49: `slices.unread_bulk`, no upb; they ask nothing of the
                # side channel). (A RunGraph's frame is checked here: its worker may run it from its bytes, with no
                # parse first: `slices.split_graphs`.)
                if marked:
                    marked = unread_bulk(commands, marked)
                    if marked:
                        parsed = device_pb2.ClientFrame.FromString(b"".join([commands[n][1] for n in marked])).commands
            elif not (len(raw) >= bulk.BIG_UPLOAD and bulk.uploads_only([span for _, span in commands])):
                # a batch's upload among other commands: checked without copying its bytes, the rest by protobuf
                stripped = bulk.strip_uploads(commands) if len(raw) >= STRIP_MIN else None
                if stripped is None:
                    # malformed commands end it here (a side socket's frame buffer: protobuf takes the view)
                    whole = device_pb2.ClientFrame.FromString(raw).commands  # type: ignore[arg-type]
                    if marked and len(whole) == len(commands):  # (no empty command skipped: one for one)
                        parsed = [whole[n] for n in marked]
                else:
                    device_pb2.ClientFrame.FromString(stripped[0])
        except (DecodeError, InvalidArgument) as exc:
            self._fail(s, batch, InvalidArgument(f"malformed ClientFrame ({len(raw)} bytes): {exc}"))
            return False
        except GpupoolError as exc:
            self._fail(s, batch, exc)
            return False
        if not commands:  # an empty frame asks for nothing; queueing it would grow memory for free
            return True
        nbytes = len(raw)
        if marked:
            try:
                flush = None if batch is None else partial(self._flush, s, batch)
                nbytes += _take_bulk(s, commands, marked, parsed, self.daemon.config.queue_bytes, flush)
            except _Ended:
                return False
            except GpupoolError as exc:  # a transfer that broke the side channel's rules ends the session
                self._fail(s, batch, exc)  # (its socket stays open until then: downloads queued before may use it)
                return False
        if batch is None:
            return self.daemon.submit(s, commands, nbytes)
        if batch.commands and (
            len(batch.commands) + len(commands) > batch.cap or batch.nbytes + nbytes > COALESCE_BYTES
        ):
            if not self._flush(s, batch):
                return False
        if batch.commands:
            batch.commands += commands
        else:
            batch.commands = commands
        batch.nbytes += nbytes
        if len(batch.commands) >= batch.cap or batch.nbytes >= COALESCE_BYTES:  # full: no frame read on holds it
            return self._flush(s, batch)
        return True

    def _replies(self, s: FrontSession, context: grpc.ServicerContext) -> Iterator[device_pb2.ServerFrame | bytes]:
        """Hand the session's replies to gRPC as they come, in order. The wait is untimed: a client that goes
        away (a cancelled or broken RPC) wakes it through gRPC's termination callback, which queues the end."""
        if not context.add_callback(lambda: s.outbox.put(END_OF_STREAM)):
            return  # the RPC already ended
        while True:
            item: Any = s.outbox.get()
            link = s.bulk
            if link is not None and link.frames:  # its replies go on its side socket; its end goes on both
                if not self._reply_side(s, link, item):
                    return
                continue
            s.outbox.done()  # (only a frames socket's replies may skip the queue: FrontSession.send)
            if type(item) is bytes:  # most replies: a serialized frame (a sync's answer, a download chunk)
                if s.bulk is None:
                    yield item
                else:
                    yield from _send(s, item)
                self.daemon.replied(s, item)
            elif item is END_OF_STREAM:
                return
            elif isinstance(item, bytes):
                yield from _send(s, item)
                self.daemon.replied(s, item)
            elif isinstance(item, slices.SideChunk):
                try:
                    yield from _send_side(s, item)
                finally:
                    item.release()
                self.daemon.replied(s, item)
            elif isinstance(item, device_pb2.ServerFrame):
                yield item
                self.daemon.replied(s, item)
            elif isinstance(item, Closed):
                raise error_class(item.code)(f"session closed: {item.reason}")
            elif isinstance(item, GpupoolError):
                raise item
            else:
                for frame in item:  # a download's chunk frames, already serialized
                    yield from _send(s, frame)
                self.daemon.replied(s, item)

    def _reply_side(self, s: FrontSession, link: bulkside.BulkLink, item: Any) -> bool:
        """One outbox item of a session whose frames use its side socket, written there as records (a bulk Get's
        bytes after their announcement, as on the stream). The session's end goes as a BULK_END record (where the
        socket takes it), then the socket closes and the stream's status is raised here; False at the stream's end.
        A session closed by a Detach or its lease's end (`Daemon.close_session`) keeps its socket open for the
        replies queued before its end and the BULK_END (`bulkside.END_GRACE` at most: until round 28 the close shut
        the socket first, and its client read neither); a reply the socket no longer takes then is moot."""
        with s.reply_lock:  # a reply written by the thread that produced it (`FrontSession.send`) waits for this one
            try:
                return self._reply_side_locked(s, link, item)
            finally:
                s.outbox.done()

    def _reply_side_locked(self, s: FrontSession, link: bulkside.BulkLink, item: Any) -> bool:
        # The rest of a record a direct write began (`FrontSession.unsent`) goes before anything else: its `Unsent`
        # may be queued behind this item (put by another thread between that write's check and its queueing)
        rest, s.unsent = s.unsent, None
        if item is END_OF_STREAM:
            return False
        if rest is not None and isinstance(item, Closed | GpupoolError):
            link.send_raw(rest, 1.0, quiet=True)  # (as the end after it: where the socket still takes it)
        if isinstance(item, Closed):
            reason = f"session closed: {item.reason}"
            link.send_end(item.code.value[0], reason)
            link.linger()  # (a plain close could reset it under the end: `linger`)
            raise error_class(item.code)(reason)
        if isinstance(item, GpupoolError):
            link.send_end(item.code.value[0], str(item))
            link.linger()
            raise item
        try:
            if rest is not None:
                link.send_raw(rest)
            if type(item) is bytes and not link.gets:
                link.send_frame(item)
            elif isinstance(item, Unsent):  # its bytes are `rest`: sent above, or with an item queued before it
                pass
            elif isinstance(item, slices.SideChunk):
                for frame in _send_side(s, item):
                    link.send_frame(frame)
            elif isinstance(item, device_pb2.ServerFrame):
                link.send_frame(item.SerializeToString())
            else:
                for whole in [item] if isinstance(item, bytes) else item:  # a download's chunk frames
                    for frame in _send(s, whole):
                        link.send_frame(frame)
        except Unavailable:
            if not s.closed:
                raise
            # closed, and its socket's grace is over (its client did not read): the end still goes on the stream
        finally:
            if isinstance(item, slices.SideChunk):
                item.release()
        self.daemon.replied(s, item)
        return True


# A side reader's batch (`read_side`) holds at most this many bytes of frames (their bulk uploads' bytes included)
# while it reads on: a batch that reaches it is queued at once, and a frame that would take one past it is queued
# after the batch, so a frame's bulk bytes are never held while the next frame is read (round 17's bound).
COALESCE_BYTES = 1 << 20


class _Batch:
    """The checked frames a side socket's reader holds while the next one is already on the socket (`read_side`):
    their commands and bytes, queued together once no frame waits, once they reach `cap` (a slice's commands,
    `Daemon.slice_commands`) or COALESCE_BYTES, or before the next frame's would take them past either."""

    __slots__ = ("cap", "commands", "nbytes")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.commands: list[Any] = []
        self.nbytes = 0


class _Ended(Exception):
    """The session took no more commands (`DeviceServicer._flush`) while a frame's bulk bytes were about to be read."""


def _take_bulk(
    s: FrontSession,
    commands: list[tuple[int, memoryview]],
    marked: list[int],
    parsed: Any = None,
    limit: int = 64 << 20,
    flush: Callable[[], bool] | None = None,
) -> int:
    """The side channel's part of a frame's commands (server/bulkside.py): an Upload with `bulk_bytes` becomes
    the canonical span of its bytes, read from the session's side socket here; a Get with `bulk` is noted for
    the writer. `marked`: the positions of the frame's Uploads and Gets, in order (`slices.split_frame`'s `bulk`).
    Returns the bytes read; raises InvalidArgument for a transfer that breaks the rules.

    A frame's bulk uploads carry at most `limit` bytes in all (the session's queue's bytes, `queue_bytes`; at
    least one chunk): they are read into the daemon's memory before the frame meets the queue's back-pressure,
    and a frame of 4,096 tiny commands each announcing 16 MiB made the daemon hold 64 GiB (round 17; clients
    send one chunk a frame).

    `parsed`: the frame's Uploads and Gets (`marked`'s commands, in order) as protobuf parsed them (the reader's
    check), or None. An Upload or Get that asks nothing of the side channel (the usual: an eager step's small
    inputs) is passed over on the parsed fields, in C, instead of reading its span again in Python.

    `flush`: queue the frames a side reader holds (`_Batch`) before the first bulk bytes are read: the reader may
    wait there (for a slow client's megabytes, or for an upload slot, which the held frames' own uploads may be
    holding), and what came before runs meanwhile; False (the session took no more) raises _Ended."""
    link = s.bulk
    extra = announced = 0
    cap = max(limit, protocol.CHUNK_BYTES)
    known = parsed if parsed is not None and len(parsed) == len(marked) else None
    for at, n in enumerate(marked):
        kind, span = commands[n]
        if known is not None:
            if kind == protocol.UPLOAD:
                if not known[at].upload.bulk_bytes:
                    continue
            elif kind == protocol.GET and not known[at].get.bulk:
                continue
        if kind == protocol.UPLOAD:
            parsed = bulk.parse_upload(span)
            cmd = parsed[0] if parsed is not None else device_pb2.ClientFrame.FromString(bytes(span)).commands[0]
            up = cmd.upload
            if not up.bulk_bytes:
                continue
            if parsed is None or len(parsed[1]):
                raise InvalidArgument("an Upload with bulk_bytes carries no data and no other command fields")
            if link is None or link.closed:
                raise InvalidArgument("an Upload asks for the bulk socket, but this session has none")
            if up.bulk_bytes > protocol.CHUNK_BYTES:
                raise InvalidArgument(
                    f"a bulk chunk of {up.bulk_bytes} bytes; at most {protocol.CHUNK_BYTES} (the worker's chunk size)"
                )
            announced += up.bulk_bytes
            if announced > cap:
                raise InvalidArgument(f"a frame's bulk uploads announce more than {cap} bytes in all (one a frame)")
            if flush is not None:
                if not flush():
                    raise _Ended
                flush = None
            runner = s.runner
            data = link.recv_upload(up, runner.upload_span if runner is not None else None)
            extra += len(data)
            commands[n] = (kind, data)
        elif kind == protocol.GET:
            get = device_pb2.ClientFrame.FromString(bytes(span)).commands[0].get
            if get.bulk:
                if link is None or link.closed:
                    raise InvalidArgument("a Get asks for the bulk socket, but this session has none")
                link.gets.add(get.request_id)
    return extra


def _send(s: FrontSession, frame: bytes) -> Iterator[bytes]:
    """A reply frame for the stream; a chunk of a bulk Get goes out as its announcement, its bytes then follow on
    the side socket (after gRPC took the announcement, so the client knows where they go)."""
    out, parts = bulkside.outgoing(s.bulk, frame)
    yield out
    if parts is not None:
        try:
            s.bulk.send_download(parts.request_id, parts.offset, parts.data)
        except Unavailable:
            if not s.closed:
                raise
            # the session's close shut its socket (a Detach, its lease's end): the bytes are moot, and the stream
            # still ends with the session's own status (until round 28 this UNAVAILABLE replaced it)


def _send_side(s: FrontSession, chunk: slices.SideChunk) -> Iterator[bytes]:
    """A bulk Get's chunk whose bytes the worker wrote into its download slot: the announcement on the stream,
    then the bytes on the side socket straight from the slot (no copy out of the worker's memory)."""
    link = s.bulk
    if link is None or link.closed or chunk.request_id not in link.gets:
        if s.closed:
            return  # the session's close shut its socket: the chunk is moot (its end follows, as in `_send`)
        # the worker wrote a side chunk for a Get that asked for none, or the socket is gone: end the session
        raise Unavailable(f"bulk socket of session {s.number} is gone (or was never asked for) mid-download")
    if chunk.last:
        link.gets.discard(chunk.request_id)
    parts = bulkside.ChunkParts(chunk.request_id, chunk.meta, chunk.offset, chunk.data, chunk.last)
    yield parts.announce()
    try:
        link.send_download(chunk.request_id, chunk.offset, chunk.data)
    except Unavailable:
        if not s.closed:
            raise


def _serialize_frame(frame: device_pb2.ServerFrame | bytes) -> bytes:
    return frame if isinstance(frame, bytes) else frame.SerializeToString()


def _handlers(servicer: DeviceServicer) -> grpc.GenericRpcHandler:
    pb = device_pb2
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Attach": grpc.unary_unary_rpc_method_handler(
                servicer.Attach, pb.AttachRequest.FromString, pb.AttachReply.SerializeToString
            ),
            "Detach": grpc.unary_unary_rpc_method_handler(
                servicer.Detach, pb.DetachRequest.FromString, pb.DetachReply.SerializeToString
            ),
            "Status": grpc.unary_unary_rpc_method_handler(
                servicer.Status, pb.StatusRequest.FromString, pb.StatusReply.SerializeToString
            ),
            "RefreshToken": grpc.unary_unary_rpc_method_handler(
                servicer.RefreshToken, pb.RefreshTokenRequest.FromString, pb.RefreshTokenReply.SerializeToString
            ),
            # No request deserializer: Stream parses frames itself to answer bad bytes with INVALID_ARGUMENT.
            "Stream": grpc.stream_stream_rpc_method_handler(servicer.Stream, None, _serialize_frame),
        },
    )


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        # Upload chunks are 4 MiB plus framing; anything much larger is refused by gRPC as RESOURCE_EXHAUSTED.
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Clients ping every few seconds to notice a dead daemon; allow that instead of answering GOAWAY.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
        # Ping idle clients too, so streams of vanished clients end and their sessions free memory; a paused
        # client (Ctrl-Z, a debugger) answers no ping while its kernel still acknowledges every byte (PING_WAIT).
        ("grpc.keepalive_time_ms", round(KEEPALIVE_TIME * 1000)),
        ("grpc.keepalive_timeout_ms", round(PING_WAIT * 1000)),
        ("grpc.http2.ping_timeout_ms", round(PING_WAIT * 1000)),
        # A second daemon on the same port must fail to start, not silently share it.
        ("grpc.so_reuseport", 0),
        tls.HANDSHAKE_OPTION,  # connections that never shake hands are closed within 10 s (round 37)
    ]


def _cert_check(daemon: Daemon) -> list[grpc.ServerInterceptor]:
    """The revoked client certificates' check, where the daemon sees client certificates (`--tls-client-auth
    require`): under `none` gRPC's Python server never asks for one (round 41), so there is nothing to refuse."""
    return [RevokedCertsCheck(daemon.revoked_certs)] if daemon.config.tls.verifies_clients else []


class RevokedCertsCheck(grpc.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call whose client certificate the scheduler revoked (`gpupool cert revoke`,
    heard in heartbeat replies; round 45), before its handler runs: Attach, Status, a stream, a token's refresh."""

    def __init__(self, revoked: certrevoke.RevokedCerts) -> None:
        self.revoked = revoked

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        revoked = self.revoked

        def checked(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                gone = revoked.refused_pem(certrevoke.peer_pem(context)) if len(revoked) else ""
                if gone:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, f"client certificate {gone} is revoked")
                return behavior(request, context)

            return call

        args = (handler.request_deserializer, handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(checked(handler.unary_unary), *args)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(checked(handler.unary_stream), *args)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(checked(handler.stream_unary), *args)
        return grpc.stream_stream_rpc_method_handler(checked(handler.stream_stream), *args)


def create_server(
    daemon: Daemon, address: str, bulk_port: BulkPort | None = None
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started gRPC server serving Device and grpc.health.v1 on `address` (port 0 picks one); `bulk_port`: the
    side port its AttachReply names."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="gpupool-grpc"),
        options=server_options(daemon.config.max_message_bytes),
        # Beyond this many RPCs at once, new ones fail fast with RESOURCE_EXHAUSTED instead of queueing forever.
        maximum_concurrent_rpcs=MAX_WORKERS - 8,
        # RequestGuard: calls whose request message never comes (callguard; round 37: 248 of them, from anyone who
        # completes a TLS handshake, refused every Attach of the host) wait boundedly, capped per source address.
        interceptors=[RequestGuard(), ErrorInterceptor(), *_cert_check(daemon)],
    )
    servicer = DeviceServicer(daemon, bulk_port)
    if bulk_port is not None and protocol.FEATURE_SIDE_FRAMES in servicer.features:
        bulk_port.frames = servicer.read_side  # sessions' frames may travel on their side sockets
    server.add_generic_rpc_handlers((_handlers(servicer),))
    health_servicer = health.HealthServicer()
    tls.add_health(server, health_servicer)  # Check; Watch UNIMPLEMENTED (tls.CheckOnly)
    port = tls.add_port(server, address, daemon.config.tls, "the daemon")
    if port == 0:
        raise OSError(tls.listen_refusal(address, "--listen", "daemon"))
    server.start()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer
