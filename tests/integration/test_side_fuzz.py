"""Fuzzing the daemon's side socket (`--bulk-listen`, server/bulkside.py) as a multi-tenant boundary (hypothesis,
bounded), as test_daemon_fuzz.py fuzzes the gRPC Stream, whose frame strategies and oracle this reuses.

Each example attaches a fresh session (its gRPC stream open: the writer of a frames socket's replies) and first
opens hostile connections to the side port: hellos of a wrong magic, a session id longer than any, cut short, of
closed sessions, of random or mangled ids, of the neighbour's session (which has its socket: refused), TLS garbage.
Then it binds its own socket, for frames (GPBULK2) or for bulk bytes only (GPBULK1, its frames on the stream), asks
for a second one (refused), and sends drawn steps: valid syncs (some behind more commands than a slice holds: the
device's thread runs the rest while the reader reads on), fuzzed frames (test_daemon_fuzz.py's, mutated or not),
record headers of length 0, past the limit, 2^64-1, of other kinds, ids and offsets, frames cut short, bulk upload
announcements whose bytes come whole, short, long, under a wrong header or never, raw garbage, pauses, a half-close
or a close. The oracle: every refusal is the protocol's (an error answer, or a silent close for what is not a
gpupool hello) and never hangs; every end (BULK_END, the stream's status, a sync's error) carries a status a client
can act on or UNAVAILABLE, never INTERNAL or UNKNOWN; the syncs a client sent are answered in order, and those sent
before anything that may end the session are all answered before its end; throughout, a neighbour session on the
same device (its own frames socket) computes a fixed result bit-exact; at the end the daemon is SERVING and the
device's memory accounting holds only the neighbour's bytes.

GPUPOOL_SIDE_FUZZ_EXAMPLES (default 40, about 30 s here), GPUPOOL_FUZZ_RANDOM=1 (a fresh hunt) and
GPUPOOL_SIDE_FUZZ_ISOLATION=thread for a campaign (with `-o timeout=...` past pytest's 300 s)."""

from __future__ import annotations

import collections
import os
import secrets
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import ACTIONABLE, Healthy, tls_channel, wait_only_tenants
from test_daemon_fuzz import frame_bytes, frames

from gpupool import protocol, tls
from gpupool._proto import device_pb2, device_pb2_grpc

MiB = 1024**2
EXAMPLES = int(os.environ.get("GPUPOOL_SIDE_FUZZ_EXAMPLES", "40"))
DERANDOMIZE = not os.environ.get("GPUPOOL_FUZZ_RANDOM")
ISOLATION = os.environ.get("GPUPOOL_SIDE_FUZZ_ISOLATION", "process")  # or "thread": sessions in the daemon process
QUOTA = 32 * MiB
ENDS = ACTIONABLE | {"UNAVAILABLE"}  # how a session may end (UNAVAILABLE: its socket broke or closed)
OURS = 2**63 + (0x5EED << 16)  # request ids of the syncs the client sends as such (a fuzzed frame's are below 2^62)
WAIT = 30.0  # seconds any one answer may take (a loaded box): past it, the daemon hangs the client
POISON = 32 * 1024  # more than the rest of any record a step leaves cut (a bulk upload of 60,000 bytes sent half)
CODES = {c.value[0]: c.name for c in grpc.StatusCode}
F32 = 1  # TensorMeta.dtype of float32


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from gpupool.server.app import RunningDaemon
    from gpupool.server.daemon import DaemonConfig
    from support import TEST_HOST, DaemonHandle, operator_tls, verifier

    key = secrets.token_hex(32).encode()
    config = DaemonConfig(
        listen="127.0.0.1:0",
        host_id=TEST_HOST,
        fake_gpus=1,
        fake_gpu_memory=1024 * MiB,
        token_key=verifier(key),
        metrics_listen="127.0.0.1:0",
        tls=operator_tls(),  # the test's (admin) certificate sees every session in Status (`wait_only_tenants`)
        bulk_listen="127.0.0.1:0",
        isolation=ISOLATION,
    )
    running = RunningDaemon(config)
    try:
        yield DaemonHandle(running.address, key, TEST_HOST, running=running)
    finally:
        running.stop(grace=1.0, drain=False)


# ---- the raw side-socket client ----


def _connect(port: int, secure: bool = True) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not secure:
        return raw
    ctx = tls.socket_client_context()
    assert ctx is not None
    sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    sock.settimeout(WAIT)
    return sock


def _exact(sock: socket.socket, n: int) -> bytes | None:
    """`n` bytes, or None when the daemon closed (or broke) the connection first; AssertionError past WAIT."""
    out = bytearray()
    try:
        while len(out) < n:
            got = sock.recv(n - len(out))
            if not got:
                return None
            out += got
    except TimeoutError:
        raise AssertionError(f"the daemon sent nothing for {WAIT:.0f} s") from None
    except (OSError, ssl.SSLError):
        return None
    return bytes(out)


def _answer(sock: socket.socket) -> tuple[str, str]:
    """The hello's answer: ("ok", ""), ("error", its message) or ("closed", "")."""
    first = _exact(sock, 1)
    if first is None:
        return "closed", ""
    if first == protocol.BULK_OK:
        return "ok", ""
    assert first == b"\x01", f"a hello answered with {first!r}"
    head = _exact(sock, 2)
    assert head is not None, "an error answer cut short"
    (n,) = struct.unpack("<H", head)
    text = _exact(sock, n)
    assert text is not None, "an error answer cut short"
    return "error", text.decode()


def _record(sock: socket.socket, idle: float | None = None) -> tuple[Any, ...]:
    """The next record on a frames socket: ("frame", ServerFrame), ("end", status name, reason), ("closed",), or
    ("idle",) when `idle` s passed before it began (a timeout leaves a TLS connection usable)."""
    if idle is not None:
        sock.settimeout(idle)
        try:
            first = sock.recv(1)
        except TimeoutError:
            return ("idle",)
        except (OSError, ssl.SSLError):
            return ("closed",)
        finally:
            sock.settimeout(WAIT)
        if not first:
            return ("closed",)
        rest = _exact(sock, protocol.BULK_HEAD.size - 1)
        head = None if rest is None else first + rest
    else:
        head = _exact(sock, protocol.BULK_HEAD.size)
    if head is None:
        return ("closed",)
    kind, ident, offset, n = protocol.BULK_HEAD.unpack(head)
    assert kind in (protocol.BULK_FRAME, protocol.BULK_END) and n <= 64 * MiB, (kind, ident, offset, n)
    body = _exact(sock, n)
    if body is None:
        return ("closed",)
    if kind == protocol.BULK_END:
        return ("end", CODES.get(ident, f"code {ident}"), body.decode(errors="replace"))
    return ("frame", device_pb2.ServerFrame.FromString(body))


def _send(sock: socket.socket, data: bytes) -> bool:
    """False when the daemon no longer takes bytes (it closed the socket, or stopped reading for WAIT s)."""
    try:
        sock.sendall(data)
        return True
    except (OSError, ssl.SSLError):
        return False


def _half_close(sock: socket.socket) -> None:
    try:  # the kernel's, below TLS (an SSLSocket's own shutdown drops its TLS state)
        socket.socket.shutdown(sock, socket.SHUT_WR)
    except OSError:
        pass


# ---- what an example does ----

HELLOS = st.sampled_from(
    ["wrong_magic", "long_id", "cut_short", "closed_id", "random_id", "mangled_id", "neighbour_id", "tls_garbage"]
)
BULK = st.sampled_from(["exact", "short", "long", "never", "wrong_head", "zero"])
STEP = st.one_of(
    st.tuples(st.just("sync")),
    st.tuples(st.just("long")),
    st.tuples(st.just("frame"), frames()),
    st.tuples(st.just("length"), st.sampled_from([0, -1, 2**32, 2**64 - 1, 7])),
    st.tuples(st.just("header"), st.integers(0, 6), st.sampled_from([0, 1, 2**64 - 1]), st.sampled_from([0, 8])),
    st.tuples(st.just("cut"), st.integers(1, 200), st.integers(0, 199)),
    st.tuples(st.just("bulk"), BULK, st.sampled_from([4, 4096, 60_000])),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("pause"), st.sampled_from([0.0, 0.01, 0.1])),
)
FINISH = st.sampled_from(["sync", "sync", "half_close", "close"])
EXAMPLE = st.fixed_dictionaries(
    {
        "hellos": st.lists(HELLOS, max_size=3),
        "carrier": st.sampled_from(["side", "side", "stream"]),
        "second": st.booleans(),
        "steps": st.lists(STEP, max_size=8),
        "finish": FINISH,
    }
)
SAFE = ("sync", "long", "pause")  # steps that never end a session (a fuzzed frame may: RESOURCE_EXHAUSTED, malformed)
# A frame of more commands than a slice holds (128) and a sync: its reader runs the first slice, the device's thread
# the rest, while the reader reads on (what comes next may end the session: after this sync's answer)
LONG = 2000


class Stream:
    """A session's gRPC stream: its frames (a bulk-only socket's session sends them here), every reply, its status."""

    def __init__(self, channel: grpc.Channel, session_id: str) -> None:
        self._out: collections.deque[bytes | None] = collections.deque()
        self._more = threading.Condition()
        self.replies: list[device_pb2.ServerFrame] = []
        self.status: grpc.StatusCode | None = None
        self.details = ""
        self.ended = threading.Event()
        call = channel.stream_stream(
            "/gpupool.v1.Device/Stream",
            request_serializer=None,
            response_deserializer=device_pb2.ServerFrame.FromString,
        )
        self.call = call(self._requests(), metadata=((protocol.SESSION_METADATA, session_id),), timeout=300)
        threading.Thread(target=self._read, daemon=True).start()

    def _requests(self) -> Iterator[bytes]:
        while True:
            with self._more:
                while not self._out:
                    self._more.wait()
                item = self._out.popleft()
            if item is None:
                return
            yield item

    def put(self, frame: bytes | None) -> None:
        with self._more:
            self._out.append(frame)
            self._more.notify()

    def _read(self) -> None:
        try:
            for frame in self.call:
                self.replies.append(frame)
        except grpc.RpcError as exc:
            self.status, self.details = exc.code(), exc.details() or ""
        finally:
            self.ended.set()


def _bulk_steps(kind: str, size: int, handle: int) -> tuple[bytes, bytes]:
    """An Upload announcing `size` bulk bytes for `handle` (a frame's bytes), and what then goes on the socket."""
    up = device_pb2.Upload(handle=handle, offset=0, last=True, bulk_bytes=size)
    up.meta.dtype, up.meta.shape[:] = F32, [size // 4]  # type: ignore[assignment]
    frame = device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    head = protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, handle, 0, size)
    if kind == "short":
        return frame, head + data[: size // 2]
    if kind == "long":
        return frame, head + data + b"\x03" * 40
    if kind == "never":
        return frame, b""
    if kind == "wrong_head":
        return frame, protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, handle + 1, 0, size) + data
    if kind == "zero":
        return frame, protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, handle, 0, 0)
    return frame, head + data


class Example:
    """One drawn example against the daemon: its findings in `problems` (empty: the oracle holds)."""

    def __init__(self, daemon: Any, channel: grpc.Channel, neighbour_id: str, closed_ids: list[str]) -> None:
        self.daemon, self.channel = daemon, channel
        self.neighbour_id, self.closed_ids = neighbour_id, closed_ids
        self.stub = device_pb2_grpc.DeviceStub(channel)
        self.problems: list[str] = []
        self.broken = False  # a send failed: the client's TLS state with it (`check`)
        self.seen: collections.Counter[str] = collections.Counter()

    def hostile_hello(self, kind: str, port: int, own: str) -> None:
        secure = kind != "tls_garbage"
        try:
            sock = _connect(port, secure)
        except (OSError, ssl.SSLError) as exc:
            self.problems.append(f"{kind}: the side port refused a connection: {exc}")
            return
        with sock:
            if kind == "tls_garbage":
                _send(sock, b"\x16\x03\x01\x00\x05hello" + secrets.token_bytes(40))
                try:
                    sock.settimeout(WAIT)
                    got = sock.recv(4096)  # a TLS alert, or nothing: then the close
                    while got:
                        got = sock.recv(4096)
                except TimeoutError:
                    self.problems.append("tls garbage: the connection was left open")
                except OSError:
                    pass
                self.seen["hello:tls_garbage"] += 1
                return
            hello = {
                "wrong_magic": b"GPBULK9\n" + struct.pack("<H", len(own)) + own.encode(),
                "long_id": protocol.BULK_HELLO_FRAMES + struct.pack("<H", 129) + b"x" * 129,
                "cut_short": protocol.bulk_hello(own, True)[:5],
                "closed_id": protocol.bulk_hello(self.closed_ids[-1] if self.closed_ids else "gone", True),
                "random_id": protocol.bulk_hello(secrets.token_urlsafe(24), True),
                "mangled_id": protocol.bulk_hello(own[:-1] + ("A" if own[-1] != "A" else "B"), True),
                "neighbour_id": protocol.bulk_hello(self.neighbour_id, True),
            }[kind]
            _send(sock, hello)
            if kind == "cut_short":
                _half_close(sock)  # the rest never comes: the daemon closes it (its hello is due in 5 s)
            answer, text = _answer(sock)
            self.seen[f"hello:{kind}:{answer}"] += 1
            want = "closed" if kind in ("wrong_magic", "cut_short") else "error"
            if answer != want:
                self.problems.append(f"hello {kind}: answered {answer} {text!r}, not {want}")

    def run(self, plan: dict[str, Any]) -> None:
        reply = self.stub.Attach(device_pb2.AttachRequest(token=self.daemon.token(quota_bytes=QUOTA)), timeout=WAIT)
        own, base, port = reply.session_id, reply.handle_base, reply.bulk_port
        stream = Stream(self.channel, own)
        try:
            for kind in plan["hellos"]:
                self.hostile_hello(kind, port, own)
            self.session(plan, stream, own, base, port)
        finally:
            try:
                self.stub.Detach(device_pb2.DetachRequest(session_id=own), timeout=WAIT)
            except grpc.RpcError as exc:
                if exc.code().name not in ENDS:
                    self.problems.append(f"Detach: {exc.code().name} {exc.details()}")
            stream.put(None)
            if not stream.ended.wait(WAIT):
                self.problems.append("the session's stream outlived its Detach")
            elif stream.status is not None and stream.status.name not in ENDS:
                self.problems.append(f"the stream ended {stream.status.name}: {stream.details}")
            self.seen[f"stream:{stream.status.name if stream.status else None}"] += 1
            self.closed_ids.append(own)

    def session(self, plan: dict[str, Any], stream: Stream, own: str, base: int, port: int) -> None:
        side = plan["carrier"] == "side"
        sock = _connect(port)
        with sock:
            _send(sock, protocol.bulk_hello(own, side))
            answer, text = _answer(sock)
            if answer != "ok":
                self.problems.append(f"its own hello: {answer} {text!r}")
                return
            if plan["second"]:  # a second socket for the same session: refused with the protocol's error
                with _connect(port) as again:
                    _send(again, protocol.bulk_hello(own, True))
                    got = _answer(again)
                    if got[0] != "error":
                        self.problems.append(f"a second bind answered {got}")
            self.steps(plan, stream, sock, base, side)

    def steps(self, plan: dict[str, Any], stream: Stream, sock: socket.socket, base: int, side: bool) -> None:
        limit = self.daemon.running.daemon.config.max_message_bytes
        sent: list[int] = []  # our syncs' request ids, in order
        safe = 0  # how many of them went before the first step that may end the session
        unsafe = desync = False  # a step that may end it came; the socket's records may be out of step
        handle = base + 100
        alive = True

        def frame(raw: bytes) -> None:
            nonlocal alive
            if side:
                alive = alive and _send(sock, protocol.BULK_HEAD.pack(protocol.BULK_FRAME, 0, 0, len(raw)) + raw)
            else:
                stream.put(raw)

        def sync(long: bool = False) -> None:
            rid = OURS + len(sent)
            sent.append(rid)
            nonlocal safe
            safe += not unsafe
            if not long:
                frame(protocol.sync_frame(rid))
                return
            cmds = [device_pb2.Command(free=device_pb2.Free())] * LONG
            cmds.append(device_pb2.Command(sync=device_pb2.Sync(request_id=rid)))
            frame(device_pb2.ClientFrame(commands=cmds).SerializeToString())

        for step in plan["steps"]:
            if not alive:
                break
            what = step[0]
            unsafe = unsafe or what not in SAFE
            if what in ("sync", "long"):
                sync(what == "long")
            elif what == "frame":
                raw = frame_bytes(step[1], base)
                if raw or not side:
                    frame(raw)
            elif what == "pause":
                time.sleep(step[1])
            elif what == "bulk":
                announce, data = _bulk_steps(step[1], step[2], handle)
                handle += 1
                frame(announce)
                alive = alive and (not data or _send(sock, data))
                desync = desync or step[1] != "exact"
            elif not side:
                alive = _send(sock, b"\x00" * 7)  # a bulk-only socket: bytes before an upload's header are wrong
                desync = True
            elif what == "length":
                n = limit + 1 if step[1] == -1 else step[1]
                alive = _send(sock, protocol.BULK_HEAD.pack(protocol.BULK_FRAME, 0, 0, n) + b"\x0a" * min(n, 16))
                desync = True
            elif what == "header":
                alive = _send(sock, protocol.BULK_HEAD.pack(step[1], step[2], step[3], 8) + b"\x0a" * 8)
                desync = True
            elif what == "cut":
                alive = _send(sock, protocol.BULK_HEAD.pack(protocol.BULK_FRAME, 0, 0, step[1]) + b"\x0a" * step[2])
                desync = True
            elif what == "garbage":
                alive = _send(sock, step[1])
                desync = True
        finish = plan["finish"] if alive else "close"
        self.broken = not alive

        def poison() -> None:
            # The daemon may wait for the rest of a record (a frame or an upload cut short): bytes of no kind, more
            # than any rest, complete it and end the session with the protocol's error where nothing did yet
            sock.settimeout(5.0)
            self.broken = not _send(sock, b"\xff" * POISON) or self.broken
            sock.settimeout(WAIT)

        later = None  # on a frames socket out of step: sent once nothing more comes (`check`)
        if desync and finish == "sync" and side:
            later = poison
        elif desync and finish != "close":
            poison()
        if finish == "sync":
            if later is None:
                sync()
        elif finish == "half_close":
            if side:  # (the kernel's: TLS then breaks for both ends, and the replies may be lost with it)
                _half_close(sock)
            else:
                stream.put(None)  # the stream's half-close: its end once everything before it ran
        else:
            sock.close()
        self.seen[f"finish:{finish}"] += 1
        reads = finish == "sync" or not side  # the replies can be read (on the socket, or on the stream)
        # A bulk-only socket's close ends nothing while no upload reads it: its session goes on (no end to wait for)
        ends = side or finish != "close"
        self.check(
            stream,
            sock if side and reads else None,
            sent,
            safe if reads else 0,
            finish == "sync" and not later,
            ends,
            later,
        )

    def check(
        self,
        stream: Stream,
        sock: socket.socket | None,
        sent: list[int],
        safe: int,
        last: bool,
        ends: bool,
        later: Any = None,
    ) -> None:
        """Read the replies (on the frames socket `sock`, or on the stream) until the last sync's answer (`last`),
        the session's end (`ends`: one must come), or the socket's close, and check them. `later`: what to send
        once nothing more comes on the socket for a while (it may wait for a record's rest), then the last sync.

        A send that failed (the daemon closed the socket: after a BULK_END it does, and a close with bytes unread
        resets the connection) leaves the client's TLS state failed, so what the daemon sent before can no longer be
        read: the replies are not checked then (`broken`)."""
        answered: list[int] = []
        end = ""
        if sock is not None:
            while True:
                got = _record(sock, 1.0 if later is not None else None)
                if got[0] == "idle":
                    later()
                    later = None
                    continue
                if got[0] == "closed":
                    break
                if got[0] == "end":
                    end = got[1]
                    if end not in ENDS:
                        self.problems.append(f"BULK_END {end}: {got[2]}")
                    break
                self.reply(got[1], answered)
                if last and answered and answered[-1] == sent[-1]:
                    break
        else:
            deadline = time.monotonic() + WAIT
            seen = 0
            while time.monotonic() < deadline:
                for f in stream.replies[seen:]:
                    self.reply(f, answered)
                seen = len(stream.replies)
                if stream.ended.is_set() or (last and answered and answered[-1] == sent[-1]):
                    break
                if not ends and len(answered) >= safe:  # (no end comes: what must come came)
                    break
                time.sleep(0.01)
            else:
                self.problems.append("nothing ended the session's replies in time")
            end = stream.status.name if stream.status else ""
        self.seen[f"end:{end or 'none'}"] += 1
        if answered != sent[: len(answered)]:
            self.problems.append(f"syncs answered out of order: {answered} of {sent}")
        if len(answered) < safe and not self.broken:  # (it may end before the rest: a frame after them was bad)
            self.problems.append(f"only {len(answered)} of the {safe} syncs before any harm answered (end {end!r})")

    def reply(self, frame: device_pb2.ServerFrame, answered: list[int]) -> None:
        kind = frame.WhichOneof("reply")
        if kind == "error" and frame.error.code not in ACTIONABLE:
            self.problems.append(f"an error reply {frame.error.code}: {frame.error.message}")
        if kind == "sync":
            if frame.sync.HasField("error") and frame.sync.error.code not in ACTIONABLE:
                self.problems.append(f"a sync's error {frame.sync.error.code}: {frame.sync.error.message}")
            if frame.request_id >= OURS:
                answered.append(frame.request_id)


@pytest.mark.slow
def test_the_side_socket_takes_hostile_bytes_and_harms_nothing(served: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "1")
    neighbour = Healthy(served.address, served.token(tenant="neighbour", quota_bytes=QUOTA))
    assert neighbour.session._carrier is not None, "the neighbour's frames should travel on its side socket"
    channel = tls_channel(served.address)
    closed: list[str] = []
    seen: collections.Counter[str] = collections.Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=DERANDOMIZE,
    )
    @given(EXAMPLE)
    # what a random campaign found on round 33's code (the end passed the answer to a sync the device's thread ran),
    # on either carrier: always among the examples
    @example({"hellos": [], "carrier": "side", "second": False, "steps": [("long",), ("length", 0)], "finish": "sync"})
    @example(
        {
            "hellos": [],
            "carrier": "stream",
            "second": False,
            "steps": [("long",), ("frame", ([], "garbage", 0, 1, b"\xff\xff"))],
            "finish": "sync",
        }
    )
    def fuzz(plan: dict[str, Any]) -> None:
        example = Example(served, channel, neighbour.session.session_id, closed)
        example.run(plan)
        seen.update(example.seen)
        if example.problems:  # said at once: a campaign's shrinking may take long
            print("side fuzz found:", plan, example.problems, file=sys.stderr, flush=True)
        assert not example.problems, (plan, example.problems)
        assert not neighbour.failures, neighbour.failures

    try:
        fuzz()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert neighbour.iterations > 0 and not neighbour.failures, neighbour.failures
        wait_only_tenants(device_pb2_grpc.DeviceStub(channel), {"neighbour"})
    finally:
        neighbour.close()
        channel.close()
    assert not neighbour.failures, neighbour.failures
    print("side fuzz:", dict(sorted(seen.items())))
    # the fuzz reached the paths it is for: refused hellos, sessions ended by bad bytes, sessions that went on
    assert seen["hello:wrong_magic:closed"] or seen["hello:long_id:error"], seen
    assert any(k.startswith("end:INVALID_ARGUMENT") for k in seen), seen
