"""The daemon's domain object: devices, sessions, their fair queues and worker threads, expiry, draining.

gRPC lives in service.py; this module speaks plain Python and protobuf values only. It also implements
`RegistrationSource`, what the scheduler registrar reads (devices, usage) and tells (revoked leases).
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from gpupool.server.devices import Device, discover
from gpupool.server.executor import CommandExecutor
from gpupool.server.fairqueue import DeviceWorker, Entry, FairQueue
from gpupool.server.metrics import Ledger, Metrics
from gpupool.server.registration import (
    RegistrationSource as RegistrationSource,  # the one definition, beside its consumer
)
from gpupool.server.sessions import DeviceMemory, Poison, Session
from gpupool.server.speedmodel import SpeedModel

from gpupool import tokens
from gpupool._proto import device_pb2
from gpupool.errors import (
    FailedPrecondition,
    GpupoolError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    error_class,
)
from gpupool.tls import TlsConfig

log = logging.getLogger(__name__)
GiB = 1024**3
RECENTLY_CLOSED = 4096
END_OF_STREAM = object()  # queued after a client's last frame: the stream ends once everything before it ran


@dataclass(frozen=True)
class Config:
    """Everything `gpupool serve` can be told (see server/cli.py for the flags)."""

    listen: str = "127.0.0.1:50051"
    host_id: str = field(default_factory=socket.gethostname)
    fake_gpus: int = 0
    fake_gpu_memory: int = 8 * GiB
    fake_speed: SpeedModel = field(default_factory=SpeedModel)  # modelled GPU and link speed of fake GPUs (off)
    token_key: tokens.KeyLike = field(default=b"", repr=False)  # a Verifier of public keys (bytes: a test seed)
    tls: TlsConfig = TlsConfig()
    health_listen: str = ""  # plaintext grpc.health.v1 only, for probes that cannot speak TLS
    metrics_listen: str = "127.0.0.1:9450"
    scheduler: str = ""
    advertise: str = ""
    heartbeat_interval: float = 2.0
    max_message_bytes: int = 16 * 1024 * 1024
    queue_commands: int = 8192
    queue_bytes: int = 64 * 1024 * 1024
    # Replies (downloads) produced but not yet taken by a client that does not read: past this, the session's
    # Get and Sync commands wait, its command queue fills, and gRPC flow control pushes back on the client.
    outbox_bytes: int = 64 * 1024 * 1024
    slice_seconds: float = 0.005
    drain_seconds: float = 10.0
    reap_interval: float = 0.5
    # torch intra-op threads (process-wide; 0 leaves torch's default, so results match a local torch bit for
    # bit). 1 keeps fake GPUs' busy time honest on a loaded host, where OpenMP teams spin and stretch a 0.2 ms
    # matmul past 20 ms.
    cpu_threads: int = 0


@dataclass(frozen=True)
class Closed:
    """Put in a session's outbox when the daemon closes it: the stream ends with this status."""

    code: str
    reason: str


class Daemon:
    def __init__(self, config: Config, devices: list[Device] | None = None) -> None:
        self.config = config
        self.host_id = config.host_id
        self.device_list = devices or discover(config.host_id, config.fake_gpus, config.fake_gpu_memory)
        self.memory = {d.index: DeviceMemory(d) for d in self.device_list}
        self.ledger = Ledger()
        self.executor = CommandExecutor(self.ledger)
        key = config.token_key  # collectives verify the tokens of a job's other ranks with the same key
        peer_host = (config.advertise or config.listen).rpartition(":")[0].strip("[]")
        self.executor.collectives.configure(lambda token: tokens.verify(key, token), peer_host)
        if any(d.fake for d in self.device_list) and (config.fake_speed.active or config.fake_speed.link_gbps > 0):
            self.executor.speed = self.executor.collectives.speed = config.fake_speed
        self.metrics = Metrics(self)
        self.queues = {d.index: FairQueue(config.queue_commands, config.queue_bytes) for d in self.device_list}
        self.workers = [
            DeviceWorker(
                f"gpupool-device-{d.index}",
                self.queues[d.index],
                self._run_slice,
                d.timed,
                self._charged,
                slice_seconds=config.slice_seconds,
                threads=config.cpu_threads,
            )
            for d in self.device_list
        ]
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._recently_closed: OrderedDict[str, Closed] = OrderedDict()  # why sessions ended, for late streams
        self._by_lease: dict[tuple[str, int], Session] = {}  # (lease, device): a multi-GPU lease has one per device
        self._next_number = 1
        self._draining = False
        self._stop = threading.Event()
        self._expiry_hold = 0.0  # set by the registrar: no token expiry ends a session before this (unix s)
        self._reaper = threading.Thread(target=self._reap, name="gpupool-reaper", daemon=True)

    def start(self) -> None:
        if self.config.cpu_threads > 0:
            import torch

            torch.set_num_threads(self.config.cpu_threads)
        self.executor.warm_up()
        for w in self.workers:
            w.start()
        self._reaper.start()

    # ---- sessions ----

    def attach(self, token: str) -> Session:
        claims = tokens.verify(self.config.token_key, token)
        if self._draining:
            raise Unavailable(f"host {self.host_id} is draining")
        if claims.host != self.host_id:
            raise PermissionDenied(f"token is for host {claims.host!r}, this is {self.host_id!r}")
        dev = next((d for d in self.device_list if d.index == claims.device), None)
        if dev is None:
            raise NotFound(f"token is for device {claims.device}; host {self.host_id} has {len(self.device_list)}")
        quota = min(claims.quota_bytes or int(claims.share * dev.capacity), dev.capacity)
        with self._lock:
            # A copied token must not evict the session that holds it: one session per (lease, device).
            old = self._by_lease.get((claims.lease_id, claims.device))
            number = self._next_number
            self._next_number += 1
        if old is not None and not old.closed:
            raise FailedPrecondition(f"lease {claims.lease_id} already has a session on this device; detach it first")
        session = Session(secrets.token_urlsafe(18), number, claims, dev, self.memory[dev.index], quota)
        session.entry = self.queues[dev.index].add(session, claims.share)
        with self._lock:
            self._sessions[session.session_id] = session
            self._by_lease[(claims.lease_id, claims.device)] = session
        log.info(
            "attached session %d (lease %s, tenant %s) on device %d: quota %d bytes, share %.3f",
            number,
            claims.lease_id,
            session.tenant,
            dev.index,
            quota,
            claims.share,
        )
        return session

    def session(self, session_id: str) -> Session:
        with self._lock:
            s = self._sessions.get(session_id)
            closed = self._recently_closed.get(session_id)
        if s is not None:
            return s
        if closed is not None:  # e.g. a stream that arrives after its session expired or the host began draining
            raise error_class(closed.code)(f"session closed: {closed.reason}")
        if self._draining:
            raise Unavailable(f"host {self.host_id} is draining")
        raise NotFound("unknown session (never attached, or closed long ago)")

    def session_list(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def claim_stream(self, s: Session) -> None:
        with self._lock:
            if s.closed:
                raise FailedPrecondition(f"session closed: {s.close_reason}")
            if s.streaming:
                raise FailedPrecondition("session already has an open stream")
            s.streaming = True

    def submit(self, s: Session, commands: list[Any], nbytes: int) -> bool:
        """Queue commands of a session (blocks when its queue is full); False when it can take no more."""
        if self._draining and commands and commands[0] is not END_OF_STREAM:
            s.outbox.put(Closed("UNAVAILABLE", f"host {self.host_id} is draining"))
            return False
        return self.queues[s.device.index].put(s.entry, commands, nbytes)

    def refresh(self, s: Session, token: str) -> float:
        """Extend a session with a renewed token of its own lease; returns its new end (unix seconds)."""
        claims = tokens.verify(self.config.token_key, token)
        if (claims.lease_id, claims.host, claims.device) != (s.lease_id, self.host_id, s.device.index):
            raise Unauthenticated("refreshed token is for another lease or device")
        s.expires_at = max(s.expires_at, claims.expires_at)
        return s.expires_at

    def refresh_in_stream(self, s: Session, token: str) -> None:
        """The stream's Refresh command: a refused token becomes the session's pending error."""
        try:
            self.refresh(s, token)
        except GpupoolError as exc:
            with s.lock:
                s.record_error(Poison(exc.code.name, "", f"refresh refused: {exc}"))

    def close_session(self, s: Session, reason: str, code: str = "FAILED_PRECONDITION") -> None:
        with self._lock:
            if s.closed:
                return
            s.closed = True
            s.close_reason = reason
            self._sessions.pop(s.session_id, None)
            self._recently_closed[s.session_id] = Closed(code, reason)
            while len(self._recently_closed) > RECENTLY_CLOSED:
                self._recently_closed.popitem(last=False)
            key = (s.lease_id, s.device.index)
            if self._by_lease.get(key) is s:
                del self._by_lease[key]
        self.queues[s.device.index].remove(s.entry)
        s.release_all()  # waits for a running slice of this session to finish
        s.outbox.put(Closed(code, reason))
        log.info("closed session %d (lease %s): %s", s.number, s.lease_id, reason)

    def detach(self, session_id: str) -> None:
        """Close a session; detaching one that is already closed is a no-op (retries are safe)."""
        with self._lock:
            if session_id in self._recently_closed:
                return
        self.close_session(self.session(session_id), "detached")

    def _reap(self) -> None:
        while not self._stop.wait(self.config.reap_interval):
            now = time.time()
            for s in self.session_list():
                if s.expires_at <= now and now >= self._expiry_hold:
                    self.close_session(s, f"lease {s.lease_id} expired")

    # ---- execution ----

    def _run_slice(self, entry: Entry, commands: list[Any], budget: float) -> list[Any]:
        s: Session = entry.owner
        start = time.perf_counter()
        with s.lock:
            if s.closed:
                return []
            for i, cmd in enumerate(commands):
                if cmd is END_OF_STREAM:
                    s.outbox.put(END_OF_STREAM)
                    continue
                if cmd.WhichOneof("cmd") in ("get", "sync") and self._parked(s):
                    return commands[i:]
                self.executor.execute(s, cmd, s.send)
                if time.perf_counter() - start > budget and i + 1 < len(commands):
                    return commands[i + 1 :]
        return []

    def _outbox_full(self, s: Session) -> bool:
        return s.outbox_bytes >= self.config.outbox_bytes

    def _parked(self, s: Session) -> bool:
        """Whether the session must wait for its client to read replies before it may produce more."""
        return self._outbox_full(s) and self.queues[s.device.index].block(s.entry, lambda: self._outbox_full(s))

    def replied(self, s: Session, item: Any) -> None:
        """gRPC took a reply off the session's outbox: a parked session may run again."""
        s.sent(item)
        if s.entry.blocked:
            self.queues[s.device.index].unblock(s.entry, lambda: self._outbox_full(s))

    def _charged(self, entry: Entry, seconds: float) -> None:
        s: Session = entry.owner
        s.busy_seconds += seconds
        self.ledger.charge(s, seconds)
        self.metrics.batch_duration.labels(self.host_id, str(s.device.index)).observe(seconds)

    # ---- RegistrationSource and Status ----

    def devices(self) -> list[device_pb2.DeviceInfo]:
        return [d.info() for d in self.device_list]

    def usage(self) -> tuple[list[device_pb2.SessionUsage], list[device_pb2.DeviceUsage]]:
        sessions = [
            device_pb2.SessionUsage(
                session_id=tokens.public_session_id(s.session_id),
                lease_id=s.lease_id,
                device=s.device.index,
                tenant=s.tenant,
                used_bytes=s.used,
                limit_bytes=s.quota,
                share=s.share,
                busy_seconds=s.busy_seconds,
                ops=s.ops,
            )
            for s in self.session_list()
        ]
        busy = self.ledger.snapshot()["device_busy"]
        devs = [
            device_pb2.DeviceUsage(
                info=d.info(), used_bytes=self.memory[d.index].used, busy_seconds=busy.get(d.index, 0.0)
            )
            for d in self.device_list
        ]
        return sessions, devs

    def draining(self) -> bool:
        return self._draining

    def hold_expiry(self, until: float) -> None:
        """While the scheduler is unreachable nobody can renew a lease: keep expired sessions until `until`."""
        self._expiry_hold = until

    def revoke_leases(self, lease_ids: list[str]) -> None:
        for lease_id in lease_ids:
            with self._lock:
                of_lease = [s for (lease, _), s in self._by_lease.items() if lease == lease_id]
            for s in of_lease:
                self.close_session(s, f"lease {lease_id} was released or revoked by the scheduler")

    def status(self) -> device_pb2.StatusReply:
        sessions, devs = self.usage()
        return device_pb2.StatusReply(host_id=self.host_id, devices=devs, sessions=sessions, draining=self._draining)

    # ---- shutdown ----

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new work and wait for what was received to run; True when everything finished."""
        self._draining = True
        deadline = time.monotonic() + (self.config.drain_seconds if timeout is None else timeout)
        return all(q.wait_idle(max(0.0, deadline - time.monotonic())) for q in self.queues.values())

    def stop(self) -> None:
        self._draining = True
        self._stop.set()
        for s in self.session_list():
            self.close_session(s, f"host {self.host_id} is shutting down", "UNAVAILABLE")
        for q in self.queues.values():
            q.stop()
        for w in self.workers:
            if w.is_alive():
                w.join(timeout=5)
        self.metrics.stop()
