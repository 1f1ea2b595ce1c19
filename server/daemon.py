"""The daemon's domain object: devices, sessions, their fair queues and device threads, expiry, draining.

Each session's tensors live in its own worker process (worker.py, forked by the zygote): the daemon keeps
admission, the per-device fair queue (which sends a session's next slice of commands to its worker and charges
the time the worker measured) and the accounting behind Status and metrics. A worker that dies ends its
session alone. gRPC lives in service.py; this module speaks plain Python and protobuf values only. It also
implements `RegistrationSource`, what the scheduler registrar reads (devices, usage) and tells (revoked leases).
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import pwd
import queue
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from grpc import StatusCode

from gpupool import certrevoke, tokens
from gpupool._proto import device_pb2
from gpupool.errors import (
    FailedPrecondition,
    GpupoolError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    error_class,
)
from gpupool.protocol import COLLECTIVE_PORTS
from gpupool.tls import TlsConfig

from . import bulk, landlock, slices
from .clocksteps import ClockSteps
from .devices import Device, discover
from .fairqueue import DeviceWorker, Entry, FairQueue, HostQueued
from .front import FrontSession, Unread, reply_bytes
from .metrics import Ledger, Metrics
from .portshare import PORTS_PER_TENANT, PortShares
from .registration import (
    RegistrationSource as RegistrationSource,  # the one definition, beside its consumer
)
from .revocations import Heard, RevocationFile
from .sandbox import (
    DEFAULT_WORKER_UIDS,
    GPU_DEVICE_GLOB,
    UidLocksUnusable,
    WorkerUids,
    gpu_device_groups,
    worker_tasks,
)
from .sessions import MAX_GRAPH_BYTES, MAX_HANDLES, DeviceMemory
from .slices import SliceRequest
from .speedmodel import SpeedModel
from .worker import BIG_PART, SMALL, InlineRunner, Runner, WorkerDied, WorkerSpec, spin_default
from .zygote import Zygote, shared_zygote

log = logging.getLogger(__name__)
GiB = 1024**3
KEEP_USER = "keep"  # --worker-user keep: workers of a root daemon stay root (an explicit, logged opt-out)
RECENTLY_CLOSED = 4096
REPLY_SLACK = 16 * 1024 * 1024  # a worker's result may hold its quota of downloads and this much more (framing)
# The longest the daemon waits for a closing session's worker to report its GPU time (`Daemon._flush`): at most
# devices.RUN_AHEAD slices of kernels to finish.
FLUSH_SECONDS = 10.0
# A worker's start refused for want of memory or processes (ENOMEM, EAGAIN: the zygote's fork, or this process's own
# mapping of the worker's shared memory): tried again after each of these pauses (seconds; ~5 s in all, a burst of
# other sessions' allocations may pass meanwhile), then the Attach fails RESOURCE_EXHAUSTED naming the host's memory.
SPAWN_RETRIES = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0)
_SHORT_OF = {errno.ENOMEM: "memory", errno.EAGAIN: "processes"}
# A daemon that registers with a scheduler serves no Attach (nor a Status token) before its scheduler's first
# heartbeat reply has named the ended leases whose tokens to refuse (a restarted daemon's list is empty; until round
# 44 every such token attached there for a heartbeat interval): a call waits up to this long for it, then fails
# UNAVAILABLE (the scheduler unreachable: nothing revoked can be told apart from the rest).
REVOCATIONS_WAIT = 5.0
# At most this many calls wait so at once (each holds a gRPC thread of --max-workers' 256); the next is refused
# UNAVAILABLE at once. Until the round 44 review any holder of a token of the pool (another host's too: the host was
# checked after the wait) held up to every thread of a daemon that had not heard from its scheduler yet.
REVOCATIONS_WAITERS = 16
END_OF_STREAM = object()  # queued after a client's last frame: the stream ends once everything before it ran


class LeaseClock:
    """The daemon's time for lease ends and token expiries: the wall clock (`time.time`, the scheduler's `expires_at`
    is a unix time), never stepped back. A backward step of the wall clock by X (round 47: until then) kept every open
    session X past its lease's end and attached, refreshed and showed tokens that expired within X before the step;
    after one this clock runs on from where it was at half the monotonic clock's rate (`SLEW`; a warning says so),
    until the wall clock meets it, 2X later. Half, not the full rate (sec47's): at the full rate it never met the wall
    clock again, so a daemon whose clock was X ahead and then corrected (an NTP step: the usual backward step) refused
    every token with less than X to run, and ended every session X early, until it restarted (secrev47). At half the
    rate no token is taken that either clock calls expired (this clock never goes back, and is never behind the wall
    clock), a token's remaining life is stretched at most twofold (by at most X), and sessions keep their monotonic
    ends. A forward step is taken as it comes (the scheduler's lease ends are on a clock that was ahead of this one).
    Each session also holds a monotonic end taken at its attach and each renewal (`FrontSession.ends_mono`), checked
    at its frames (`Daemon.lapsed`) and by the reaper."""

    SLEW = 0.5  # this clock's rate, of the monotonic clock's, while the wall clock is behind it

    def __init__(self) -> None:
        self._anchor = (time.time(), time.monotonic())  # (a tuple: one assignment, whichever thread writes it)
        self._behind = 0.0  # how far the wall clock was behind when last logged (seconds); 0: it is not

    def now(self) -> float:
        wall, mono = time.time(), time.monotonic()
        then, then_mono = self._anchor
        ran = mono - then_mono
        held = then + ran * 0.5 if ran > 0 else then  # (`SLEW`, inline: read at every Attach, RefreshToken, Status)
        if wall >= held:
            self._anchor = (wall, mono)
            if self._behind:
                self._behind = 0.0
                log.warning("the wall clock met this daemon's lease clock again: lease ends are the wall clock's")
            return wall
        self._anchor = (held, mono)
        behind = held - wall
        if behind > self._behind + 1.0 or behind < self._behind / 2:  # (a new step; then each halving of the gap)
            self._behind = behind
            log.warning(
                "the wall clock is %.1f s behind this daemon's lease clock (it stepped back): token expiries and new "
                "lease ends keep this clock, which runs at half speed until the wall clock meets it (in %.0f s); no "
                "step back lengthens a session or revives an expired token, and a token fewer than %.0f s from its "
                "expiry is refused meanwhile (restart the daemon to take the wall clock at once)",
                behind,
                behind / (1.0 - self.SLEW),
                behind,
            )
        return held

    def ends_mono(self, expires_at: float) -> float:
        """A lease's end (unix seconds) on the monotonic clock, from now."""
        now = self.now()
        return time.monotonic() + (expires_at - now)


# A reader's last item may also be the error that ended its frames (a malformed frame, a broken side socket: the
# GpupoolError itself, `DeviceServicer._fail`): queued like END_OF_STREAM, it reaches the outbox once the commands
# queued before it ran and replied, and ends the session there (until round 34 it went to the outbox at once and
# passed the replies of the frames still queued for the device's thread).


@dataclass(frozen=True)
class DaemonConfig:
    """Everything `gpupool serve` can be told (see server/cli.py for the flags)."""

    listen: str = "127.0.0.1:50051"
    host_id: str = field(default_factory=socket.gethostname)
    fake_gpus: int = 0
    fake_gpu_memory: int = 8 * GiB
    fake_speed: SpeedModel = field(default_factory=SpeedModel)  # modelled GPU and link speed of fake GPUs (off)
    token_key: tokens.KeyLike = field(default=b"", repr=False)  # a Verifier of public keys (bytes: a test seed)
    tls: TlsConfig = TlsConfig()
    health_listen: str = ""  # plaintext grpc.health.v1 only, for probes that cannot speak TLS
    metrics_listen: str = "127.0.0.1:9450"  # HTTPS to scrapers' client certificates (gpupool/metrics_http.py)
    metrics_plaintext: bool = False  # serve them in plaintext HTTP instead (so does `tls.insecure`)
    scheduler: str = ""
    advertise: str = ""
    heartbeat_interval: float = 2.0
    max_message_bytes: int = 16 * 1024 * 1024
    queue_commands: int = 8192
    queue_bytes: int = 64 * 1024 * 1024
    # Commands queued past fairqueue.PARKED_BYTES (4 MiB) a session, all sessions of the host together (host RAM;
    # `fairqueue.HostQueued`): past it a session's reader waits, as at its own queue's `queue_bytes`. 0: no limit.
    max_queued_bytes: int = 256 * 1024 * 1024
    # Replies (downloads) produced but not yet taken by a client that does not read: past this, the session's
    # Get and Sync commands wait, its command queue fills, and gRPC flow control pushes back on the client.
    outbox_bytes: int = 16 * 1024 * 1024
    # Unread replies of all sessions together (host RAM): a slice whose replies would take them past this ends
    # the session holding the most unread bytes (usually the one producing them) with RESOURCE_EXHAUSTED.
    max_unread_bytes: int = 1 * GiB
    slice_seconds: float = 0.005
    drain_seconds: float = 10.0
    # The longest the lease reaper sleeps on an idle daemon (no session open): it wakes at the first session's lease
    # end, for a new session and for a changed expiry hold (until round 45 every 0.5 s, ~2.9k instructions a wake).
    reap_interval: float = 10.0
    # ... and while any session is open: a step of the wall clock (an NTP step, a resumed VM) can bring a lease's end
    # on it nearer at any moment, and nothing wakes a sleeper on the monotonic clock for it, so this bounds how late an
    # idle session (one that sends no frame: `Daemon.lapsed` ends the others at their next) is closed after its end.
    # Until round 48 `reap_interval` (10 s) bounded it. A look took 115-130 us of CPU at load ~20
    # (bench/reaper_looks.py): ~0.1 ms a second while sessions are open.
    clock_look: float = 1.0
    # torch intra-op threads (process-wide; 0 leaves torch's default, so results match a local torch bit for
    # bit). 1 keeps fake GPUs' busy time honest on a loaded host, where OpenMP teams spin and stretch a 0.2 ms
    # matmul past 20 ms.
    cpu_threads: int = 0
    # "process": each session in its own sandboxed worker process (a crash ends that session only);
    # "thread": sessions in the daemon process (no isolation; for measuring its cost, or hosts without fork).
    isolation: str = "process"
    max_sessions: int = 64  # each session is a process: bound them
    max_streams_per_tenant: int = 16
    max_handles: int = MAX_HANDLES  # per session: live and failed handles, views and zero-byte tensors included
    max_graph_memory: int = MAX_GRAPH_BYTES  # per session: host bytes of its captured graphs (estimated)
    max_frame_commands: int = 4096
    max_op_flops: int = 0  # multiply-adds one op may do (server/cost.py); 0: 1e12 on fake GPUs, 1e15 on real
    # RLIMIT_DATA of a worker beyond what it holds at birth: 0 = the quota (fake GPUs hold tensors in host RAM)
    # plus 1 GiB of headroom, or 4 GiB on real GPUs.
    worker_memory: int = 0
    # Real GPUs: bytes a worker's CUDA caching allocator may hold beyond the session's quota (server/worker.py
    # `cap_gpu_memory`); -1: an eighth of the quota plus 256 MiB.
    worker_gpu_margin: int = -1
    # When started as root, run workers as this unprivileged user; KEEP_USER (an explicit opt-out) keeps root.
    worker_user: str = "nobody"
    # When started as root: a uid of its own for each worker instead (sandbox.WorkerUids): "auto" (the default range
    # sandbox.DEFAULT_WORKER_UIDS where nothing of the host's is in it, else `worker_user` with a warning),
    # "FIRST-LAST", or "off" (every worker runs as `worker_user`)
    worker_uids: str = "auto"
    seccomp: bool = True
    # A Landlock ruleset in each worker (server/landlock.py): reads of what it needs only, no writes, TCP only with
    # the network grant, scoped signals and abstract sockets; False is the operator's opt-out (--landlock off)
    landlock: bool = True
    worker_network: bool = False  # workers keep TCP sockets, for torch.distributed collectives between daemons
    # Transport of those collectives: "secure" (encrypted, authenticated: server/seclink.py) or "gloo"
    # (torch's plaintext gloo/NCCL, an explicit opt-in).
    collectives: str = "secure"
    # --collective-ports: the TCP ports (LOW, HIGH) its workers' collective groups listen on and connect to (the same
    # on every daemon of a pool); under Landlock ABI 4+ a worker granted network binds and connects to no other
    collective_ports: tuple[int, int] = COLLECTIVE_PORTS
    # --gloo-connect-anywhere: the operator accepts that under --collectives gloo a worker granted network connects to
    # any TCP port of any host (gloo's pairs dial ports their peers' kernels picked), which Landlock ABI 4+ would
    # refuse; without it such a daemon does not start there (`check_gloo_network`, round 43)
    gloo_connect_anywhere: bool = False
    # --collective-ports-per-tenant: the most ports of the range one tenant's sessions granted network hold on this
    # host at once (portshare.PORTS_PER_SESSION each, a block of their own; 0: no share but the range's)
    collective_ports_per_tenant: int = PORTS_PER_TENANT
    bulk_listen: str = ""  # the bulk side port (server/bulkside.py), named in AttachReply; "": none
    # --state-dir: where the daemon keeps the revocations it heard from its scheduler (server/revocations.py), so that
    # a restart while the scheduler cannot be reached refuses revoked tokens and serves the others; "": nowhere
    state_dir: str = ""
    # --revocations-max-age: the scheduler's last answer may be at most this old (seconds) for a restarted daemon to
    # serve Attach on the revocations of its state dir while the scheduler cannot be reached; 0: never
    revocations_max_age: float = 300.0
    # Microseconds the front reads a worker's result without blocking before it sleeps on it (saves its wake-up
    # when the slice is that short); -1: the host decides at each worker's start (worker.spin_default); 0: never
    worker_spin_us: float = 0.0


def worker_user(name: str) -> str:
    """The user a worker drops to ("": it keeps the daemon's); checked once at start by `check_worker_user`."""
    return "" if name in ("", KEEP_USER) else name


def check_worker_uids(text: str) -> WorkerUids | None:
    """Parse --worker-uids; refuse a range holding a user or group of the host, or a subordinate range of
    /etc/subuid or /etc/subgid (a worker must be nobody's user); "auto" is the default range, or None with one
    warning where something of the host is in it. Not root: workers keep the daemon's user (a range is logged)."""
    auto = text == "auto"
    try:
        uids = WorkerUids.parse(DEFAULT_WORKER_UIDS if auto else text)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    if uids is None:
        return None
    if os.geteuid() != 0:
        if not auto:
            log.warning("--worker-uids %s: not running as root, so session workers keep this daemon's user", text)
        return None
    clashes = uids.clashes()
    if clashes and auto:
        log.warning("--worker-uids: the default range %s holds %s of this host: session workers share the user "
                    "--worker-user instead (pass --worker-uids FIRST-LAST, a free range, to keep them apart)",
                    DEFAULT_WORKER_UIDS, ", ".join(clashes[:3]))  # fmt: skip
        return None
    if clashes:
        raise InvalidArgument(f"--worker-uids {text} holds users of this host ({', '.join(clashes[:5])}): "
                              "name a range no account, group or subordinate range uses")  # fmt: skip
    try:
        uids.check_locks()
    except UidLocksUnusable as exc:
        raise InvalidArgument(f"--worker-uids {text}: {exc.strerror}") from None
    log.info("session workers run as uids %d-%d, one each (at most %d tasks a worker)", uids.first, uids.last,
             worker_tasks())  # fmt: skip
    return uids


def check_landlock(on: bool) -> str:
    """Say once, at start, what of Landlock the session workers lack on this kernel (server/landlock.py: they start
    without it, best effort); returns the warning ("" where there is none)."""
    if not on:
        log.warning("--landlock off: session workers may read every file of their user's and make TCP connections")
        return "off"
    lacking = landlock.describe(landlock.abi())
    if lacking:
        log.warning("%s (workers start anyway; --landlock off silences this)", lacking)
    return lacking


def check_collective_ports(config: DaemonConfig, bound: dict[str, int] | None = None) -> None:
    """Refuse to start where a port this daemon listens on (--listen, --bulk-listen, --metrics-listen,
    --health-listen) is in --collective-ports: a worker granted network may connect to every port of that range.
    `bound`: the ports the listeners got (flag: port), after they bound: a port-0 listener takes a port of the
    kernel's ephemeral range (net.ipv4.ip_local_port_range), which on some hosts holds the collective range (round 42
    review: such a daemon listened in the range; `ephemeral_overlap` warns of it at the start)."""
    low, high = config.collective_ports
    listens = {"--listen": config.listen, "--bulk-listen": config.bulk_listen,
               "--metrics-listen": config.metrics_listen, "--health-listen": config.health_listen}  # fmt: skip
    ports = {flag: address.rpartition(":")[2] for flag, address in listens.items() if address}
    ports.update({flag: str(port) for flag, port in (bound or {}).items() if port})
    for flag, port in ports.items():
        if port.isdigit() and low <= int(port) <= high:
            raise InvalidArgument(
                f"{flag} {listens[flag]}: its port {port} is in --collective-ports {low}-{high}, which session workers "
                "granted network may connect to; move one of them"
                + (" (a port the kernel picked: " + EPHEMERAL_HINT + ")" if listens[flag].endswith(":0") else "")
            )
    if bound is None:
        overlap = ephemeral_overlap(config.collective_ports)
        if overlap:
            log.warning("--collective-ports %d-%d: %s; %s", low, high, overlap, EPHEMERAL_HINT)
    if config.worker_network and bound is None:
        log.info("collective groups of session workers listen on and connect to TCP ports %d-%d", low, high)


def check_gloo_network(config: DaemonConfig, abi: int) -> None:
    """Refuse to start a daemon whose workers would be granted network under `--collectives gloo` on a kernel whose
    Landlock (ABI `abi`, 4+: TCP rules) could otherwise hold them to --collective-ports: gloo's listener binds a port
    its kernel picks (getaddrinfo with no service, no option of gloo, c10d or the environment names one) and each
    pair dials its peer's, so such a worker connects to any TCP port of any host (this daemon's, the scheduler's, any
    service's), and tenant code in it could too. --gloo-connect-anywhere on is the operator's opt-in (a warning)."""
    if config.collectives != "gloo" or not config.worker_network or not config.landlock or abi < 4:
        return
    if config.gloo_connect_anywhere:
        log.warning("--collectives gloo --gloo-connect-anywhere on: session workers granted network may connect to "
                    "any TCP port of any host (gloo's links); the default secure transport keeps them to "
                    "--collective-ports %d-%d", *config.collective_ports)  # fmt: skip
        return
    raise InvalidArgument(
        "--collectives gloo with --worker-network on: gloo's links dial the ports their peers' kernels picked, so "
        "Landlock cannot hold a session worker granted network to --collective-ports "
        f"{config.collective_ports[0]}-{config.collective_ports[1]}: it (and a tenant's code in it) could connect to "
        "any TCP port of any host, this daemon's and the scheduler's included. Use --collectives secure (the "
        "default: encrypted, and confined to the range), or pass --gloo-connect-anywhere on to accept it"
    )


EPHEMERAL_HINT = "reserve the range (sysctl net.ipv4.ip_local_reserved_ports=LOW-HIGH) or move it"


def ephemeral_overlap(ports: tuple[int, int], proc: str = "/proc/sys/net/ipv4") -> str:
    """What of `ports` the kernel may hand out as a port-0 listener's or an outgoing connection's own port (its
    ip_local_port_range, less ip_local_reserved_ports), or "" (none, or unreadable)."""
    try:
        with open(f"{proc}/ip_local_port_range") as f:
            first, last = (int(x) for x in f.read().split())
        with open(f"{proc}/ip_local_reserved_ports") as f:
            reserved = f.read().strip()
    except (OSError, ValueError):
        return ""
    taken: set[int] = set()
    for part in filter(None, reserved.split(",")):
        lo, _, hi = part.partition("-")
        taken.update(range(int(lo), int(hi or lo) + 1))
    free = [p for p in range(max(ports[0], first), min(ports[1], last) + 1) if p not in taken]
    if not free:
        return ""
    return (
        f"{len(free)} of its ports are in the kernel's ephemeral ports {first}-{last} (a port-0 listener of any "
        "program of the host may take one)"
    )


def check_worker_user(name: str) -> None:
    """Refuse to start with a worker user that does not exist; warn when a root daemon keeps root workers."""
    if os.geteuid() != 0:
        return
    if not worker_user(name):
        log.warning("running as root with --worker-user %s: session workers keep uid 0 (no user drop)", KEEP_USER)
        return
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise InvalidArgument(f"--worker-user {name}: no such user (or pass --worker-user {KEEP_USER})") from None
    if entry.pw_uid == 0:
        raise InvalidArgument(f"--worker-user {name} is uid 0: name an unprivileged user (or {KEEP_USER})")


def check_python_readable(name: str, uids: WorkerUids | None, python: str = "") -> str:
    """Warn once, at start, where the workers' own user cannot read Python's installation (`python`: os.py's
    folder unless given): each worker's uid of --worker-uids where there is a range, else --worker-user's. Returns
    the warning ("" where there is none, and for a daemon that is not root: its workers keep its user)."""
    if os.geteuid() != 0:
        return ""
    if uids is not None:  # a uid (and gid) of its own: no account, so neither owner nor group of the files
        uid, gid, who = uids.first, uids.first, f"uids of --worker-uids ({uids.first}-{uids.last})"
    elif worker_user(name):
        entry = pwd.getpwnam(name)
        uid, gid, who = entry.pw_uid, entry.pw_gid, name
    else:
        return ""
    python = python or os.path.dirname(os.__file__)
    unreadable = _unreadable_by(uid, gid, python)
    if not unreadable:
        return ""
    # What it means and what to do, in its one line (round 54: a root/pyenv box's demo printed it, its "fails"
    # alarming a user whose training was fine, and its fix, `--worker-user keep`, root workers without saying so)
    text = (f"session workers run as {who}, who cannot read {unreadable}, on the way to Python's files ({python}): "
            f"sessions run on the modules their zygote imported before the workers dropped privileges (all that "
            f"gpupool's demo and tests use; server/zygote.py PRELOAD), and one that needs another module of "
            f"Python's fails in its session (ModuleNotFoundError); a Python other users can read (installed outside "
            f"{unreadable}) avoids that; so would --worker-user {KEEP_USER} (`gpupool up`: "
            f"GPUPOOL_WORKER_USER={KEEP_USER} in its environment), but it keeps the workers root: no isolation "
            f"of sessions by user")  # fmt: skip
    log.warning("%s", text)
    return text


def _unreadable_by(uid: int, gid: int, path: str) -> str:
    """The first directory on the way to `path` that `uid` (group `gid`) cannot enter ("" when it can)."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        d = os.sep.join(parts[:i])
        try:
            st = os.stat(d)
        except OSError:
            return d
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return d
    return ""


def _quota_of(claims: tokens.TokenClaims, dev: Device) -> int:
    """The memory quota a token grants on `dev` (its `quota_bytes`, or its share of the device where that is 0)."""
    return min(claims.quota_bytes or int(claims.share * dev.capacity), dev.capacity)


def _contend(entry: Entry, contended: bool) -> None:
    """The fair queue says whether another session of the device waits while `entry`'s slice runs: its worker
    reads it (a collective waiting for its peers keeps the device until someone does: server/collectives.py)."""
    runner = entry.owner.runner
    if runner is not None:
        runner.contend(contended)


def _drop_replies(s: FrontSession) -> None:
    """Take a closing session's unread replies off its outbox (and its count)."""
    while True:
        try:
            item = s.outbox.get_nowait()
        except queue.Empty:
            return
        s.outbox.done()
        if isinstance(item, bytes | bytearray | list | device_pb2.ServerFrame):
            s.sent(item)


@dataclass(frozen=True)
class Closed:
    """Put in a session's outbox when the daemon closes it: the stream ends with this status."""

    code: StatusCode
    reason: str


class Daemon:
    def __init__(self, config: DaemonConfig, devices: list[Device] | None = None) -> None:
        config.tls.check_client_auth()  # (secrev50: "auto" left unresolved took bound tokens as a bearer's)
        self.config = config
        self.host_id = config.host_id
        self.device_list = devices or discover(config.host_id, config.fake_gpus, config.fake_gpu_memory)
        self.memory = {d.index: DeviceMemory(d) for d in self.device_list}
        self.ledger = Ledger()
        self.zygote: Zygote | None = None
        # Session workers verify the tokens of a collective group's other ranks themselves, with these keys.
        self._token_pems = tokens.public_pems(config.token_key)
        self.metrics = Metrics(self)
        queued = HostQueued(config.max_queued_bytes)  # one count for every device's queue
        self.queues = {d.index: FairQueue(config.queue_commands, config.queue_bytes, queued) for d in self.device_list}
        for fq in self.queues.values():
            fq.contend = _contend
        self.workers = [
            DeviceWorker(
                f"gpupool-device-{d.index}",
                self.queues[d.index],
                self._run_slice,
                slice_seconds=config.slice_seconds,
                threads=config.cpu_threads,
            )
            for d in self.device_list
        ]
        self._worker_of = {d.index: w for d, w in zip(self.device_list, self.workers, strict=True)}
        self._lock = threading.Lock()
        self._sessions: dict[str, FrontSession] = {}
        self.unread = Unread()  # the open sessions' unread reply bytes together (`_room_for_replies`)
        self._recently_closed: OrderedDict[str, Closed] = OrderedDict()  # why sessions ended, for late streams
        self._by_lease: dict[tuple[str, int], FrontSession] = {}  # (lease, device): one per device of a lease
        # Attaches whose worker is starting (outside the lock: a fork, retried for seconds when memory is short),
        # counted as sessions: two concurrent Attaches of one lease, or past --max-sessions, cannot both pass
        self._starting: set[tuple[str, int]] = set()
        self._streams: dict[str, int] = {}  # tenant -> open streams
        self._next_number = 1
        self._draining = False
        self._stop = threading.Event()
        self._reap_wake = threading.Event()  # a new session, a changed expiry hold, the stop: the reaper looks again
        self.clock = LeaseClock()  # lease ends and token expiries: the wall clock, never stepped back (round 47)
        self._expiry_hold = 0.0  # set by the registrar: no lease's end closes a session before this (monotonic s)
        # Set once the scheduler answered a heartbeat (told every revocation it holds for this host); at once for a
        # daemon that registers with none (its tokens' revocations have nowhere to come from).
        self._heard = threading.Event()
        self._bearer_said = False  # (check_bound: a bound token taken unchecked or refused under `none`, said once)
        if not config.scheduler:
            self._heard.set()
        self._waiting_heard = 0  # calls in `_await_revocations` now (`REVOCATIONS_WAITERS`), under `_lock`
        # Revoked client certificates (round 45), the scheduler's list from its heartbeat replies: refused on every call
        # and side-socket hello that shows one (`--tls-client-auth require`; server/service.py `RevokedCertsCheck`)
        self.revoked_certs = certrevoke.RevokedCerts()
        self._verifier = config.token_key if isinstance(config.token_key, tokens.Verifier) else None
        # --state-dir: the revocations heard, on disk (server/revocations.py); `_offline_ok`: those read at start are
        # recent enough to serve Attach on while the scheduler cannot be reached
        self._revfile: RevocationFile | None = None
        self._offline_ok = False
        self._offline_until = 0.0  # (time.time() after which the file is too old to serve on)
        self._heard_at = 0.0  # (time.time() of the scheduler's last answer)
        self._save_due = threading.Event()
        if config.state_dir and config.scheduler:
            self._revfile = RevocationFile(config.state_dir, config.host_id)
            self._load_revocations(self._revfile)
            threading.Thread(
                target=self._revocations_writer, args=(self._revfile,), name="gpupool-revocations", daemon=True
            ).start()
        self._started_at = time.monotonic()
        self._reaper = threading.Thread(target=self._reap, name="gpupool-reaper", daemon=True)
        self._clock_steps: ClockSteps | None = None  # (`start`: wakes the reaper at a step of the wall clock)
        self._uids: WorkerUids | None = None  # --worker-uids (as root): a uid of its own for each worker
        # each session granted network: a block of --collective-ports of its own, within its tenant's share
        self._port_shares = PortShares(config.collective_ports, config.collective_ports_per_tenant)
        self._worker_groups: tuple[int, ...] = ()  # supplementary groups of workers: the GPU device files'

    def start(self) -> None:
        if self.config.isolation == "process":
            check_worker_user(self.config.worker_user)
            keep = not worker_user(self.config.worker_user) and self.config.worker_uids == "auto"
            self._uids = None if keep else check_worker_uids(self.config.worker_uids)  # keep: root workers
            check_python_readable(self.config.worker_user, self._uids)
            self._worker_groups = self._check_gpu_files()
            check_landlock(self.config.landlock)
            check_collective_ports(self.config)
            check_gloo_network(self.config, landlock.abi())
            # Before gRPC threads exist (a fresh interpreter either way), and ready before the daemon says it
            # listens: an Attach never waits for torch to import.
            self.zygote = shared_zygote()
            self.zygote.wait_ready()
        elif self.config.isolation == "thread":
            import torch

            if self.config.cpu_threads > 0:
                torch.set_num_threads(self.config.cpu_threads)
            from .executor import CommandExecutor

            CommandExecutor(slices.SliceLedger()).warm_up()
        else:
            raise ValueError(f"isolation must be 'process' or 'thread', not {self.config.isolation!r}")
        for w in self.workers:
            w.start()
        self._reaper.start()
        # A step of the wall clock wakes the reaper at once (round 49), besides its `clock_look` looks.
        self._clock_steps = ClockSteps.open()
        if self._clock_steps is not None:
            self._clock_steps.watch(self._reap_wake.set)
        else:
            log.info("no timerfd: the reaper looks for steps of the wall clock every %g s", self.config.clock_look)

    def _check_gpu_files(self) -> tuple[int, ...]:
        """A root daemon's workers on real GPUs run as no account: CUDA needs the NVIDIA device files read-write
        for others, or for a group (not root's) that the workers then keep. Refuse to start where a file allows
        neither (docs/operations.md says what to change); no check without a real GPU."""
        if os.geteuid() != 0 or all(d.fake for d in self.device_list):
            return ()
        if self._uids is None and not worker_user(self.config.worker_user):
            return ()  # root workers
        paths = sorted({p for pattern in GPU_DEVICE_GLOB for p in glob.glob(pattern)})
        groups, unusable = gpu_device_groups(paths)
        if unusable:
            raise InvalidArgument(
                f"session workers (no account of their own, no groups) cannot open {', '.join(unusable[:4])}: make "
                "the NVIDIA device files read-write for others (the driver's default, 0666) or for a group other "
                "than root's (chgrp GROUP; chmod g+rw), see docs/operations.md, or pass --worker-uids off and a "
                "--worker-user who can"
            )
        if groups:
            log.info("session workers keep group(s) %s: the GPU device files'", ", ".join(map(str, groups)))
        return groups

    # ---- sessions ----

    def attach(self, token: str, conv_layout: bool = False, peer: bytes | None = None) -> FrontSession:
        """A new session for `token`; `conv_layout`: its client asked for that feature, which this daemon names
        (server/service.py `Attach`): its convolutions' outputs are laid out as cuDNN's (gpupool/protocol.py);
        `peer`: the caller's client certificate (PEM), where this daemon sees them (`check_bound`)."""
        claims = tokens.verify(self.config.token_key, token, now=self.clock.now())
        if claims.host != self.host_id:  # (before any wait: another host's token holds no thread here)
            raise PermissionDenied(f"token is for host {claims.host!r}, this is {self.host_id!r}")
        self.check_bound(claims, peer)
        if not self._heard.is_set():
            self._await_revocations("Attach")
            claims = tokens.verify(self.config.token_key, token, now=self.clock.now())  # (its lease may be just told)
        if self._draining:
            raise Unavailable(f"host {self.host_id} is draining")
        dev = next((d for d in self.device_list if d.index == claims.device), None)
        if dev is None:
            raise NotFound(f"token is for device {claims.device}; host {self.host_id} has {len(self.device_list)}")
        quota = _quota_of(claims, dev)
        key = (claims.lease_id, claims.device)
        with self._lock:
            # A copied token must not evict the session that holds it: one session per (lease, device).
            old = self._by_lease.get(key)
            if (old is not None and not old.closed) or key in self._starting:
                raise FailedPrecondition(
                    f"lease {claims.lease_id} already has a session on this device; detach it first"
                )
            held = len(self._sessions) + len(self._starting)
            if held >= self.config.max_sessions:
                raise ResourceExhausted(f"host {self.host_id} has {held} sessions, its limit (--max-sessions)")
            number = self._next_number
            self._next_number += 1
            self._starting.add(key)
        try:
            s = FrontSession(
                secrets.token_urlsafe(18), number, claims, dev, quota, claims.tenant or claims.lease_id, self.unread
            )
            s.ends_mono = self.clock.ends_mono(claims.expires_at)
            s.runner = self._new_runner(s, network=claims.network, conv_layout=conv_layout)
            try:
                s.entry = self.queues[dev.index].add(s, claims.share)
                with self._lock:
                    self._sessions[s.session_id] = s
                    self._by_lease[key] = s
                self._reap_wake.set()  # (its lease may end before the reaper's next look)
            except BaseException:  # (round 43 review: its worker, uid and block of ports were never given back)
                self._kill_worker(s)
                self._release_worker(s)
                raise
        finally:
            with self._lock:
                self._starting.discard(key)
        log.info(
            "attached session %d (lease %s, tenant %s) on device %d: quota %d bytes, share %.3f, worker %d",
            number,
            claims.lease_id,
            s.tenant,
            dev.index,
            quota,
            claims.share,
            s.worker_pid,
        )
        return s

    def _new_runner(self, s: FrontSession, network: bool = False, conv_layout: bool = False) -> Runner:
        """Start the session's worker. It gets network sockets only when its token grants them (a lease of
        several devices: collectives between daemons) and the daemon allows them (--worker-network)."""
        c = self.config
        if network and not c.worker_network:
            log.info("session %d: its token grants network but this daemon runs --worker-network off", s.number)
        d = s.device
        limit = c.worker_memory or (s.quota + GiB if d.fake else 4 * GiB)
        if network and c.worker_network:  # its block of --collective-ports, within its tenant's share
            s.port_share = self._port_shares.take(s.tenant)
        try:
            return self._start_runner(s, network, limit, conv_layout)
        except BaseException:
            if s.port_share is not None:
                self._port_shares.give_back(s.port_share, 0)  # no worker of it started
                s.port_share = None
            raise

    def _start_runner(self, s: FrontSession, network: bool, limit: int, conv_layout: bool = False) -> Runner:
        c = self.config
        d = s.device
        if self._uids is not None and self.zygote is not None:
            try:
                s.worker_uid = self._uids.take()
            except UidLocksUnusable as exc:  # (made unusable since the start's check: the operator's to mend)
                log.error("session %d: no worker uid: %s", s.number, exc.strerror)
                raise Unavailable(f"host {self.host_id} cannot start a session worker: {exc.strerror}") from None
            except OSError as exc:
                raise ResourceExhausted(f"host {self.host_id}: {exc.strerror}; try again later") from None
        spec = WorkerSpec(
            # the session's public tag, never its id: the id is a bearer credential (Stream, Detach), and a spec's
            # JSON stays in the zygote's memory, which every later worker inherits at its fork (round 41: a tenant's
            # code in its worker found earlier sessions' ids there)
            session_id=tokens.public_session_id(s.session_id),
            number=s.number,
            device={"index": d.index, "uuid": d.uuid, "model": d.model, "memory_bytes": d.capacity, "fake": d.fake},
            quota=s.quota,
            max_handles=c.max_handles,
            max_op_flops=c.max_op_flops,
            memory_limit=limit,
            cpu_threads=c.cpu_threads,
            user=worker_user(c.worker_user),
            seccomp=c.seccomp,
            landlock=c.landlock,
            lease_id=s.lease_id,
            host_id=self.host_id,
            network=network and c.worker_network,
            collectives=c.collectives,
            collective_ports=c.collective_ports,
            collective_share=s.port_share.ports if s.port_share is not None else (0, 0),
            peer_host=(c.advertise or c.listen).rpartition(":")[0].strip("[]"),
            token_keys=tuple(self._token_pems),
            speed=(c.fake_speed.tflops, c.fake_speed.gbps, c.fake_speed.link_gbps),
            gpu_margin=c.worker_gpu_margin,
            max_graph_bytes=c.max_graph_memory,
            uid=s.worker_uid,
            groups=self._worker_groups,
            conv_layout=conv_layout,
        )
        if self.zygote is None:
            return InlineRunner(spec)
        try:
            return self._spawn(s, spec)
        except BaseException:
            if self._uids is not None and s.worker_uid > 0:
                self._uids.give_back(s.worker_uid, 0)  # no worker of it started
            raise

    def _worker_spin(self) -> float:
        """Seconds a new worker's runner spins on its results (--worker-spin-us; -1: `spin_default`)."""
        us = self.config.worker_spin_us
        return spin_default() if us < 0 else us * 1e-6

    def _spawn(self, s: FrontSession, spec: WorkerSpec) -> Runner:
        assert self.zygote is not None
        pauses = iter(SPAWN_RETRIES)
        while True:
            try:
                # A result holds at most the session's quota of downloads beyond its reply room, plus framing.
                return self.zygote.spawn(spec, max_reply=s.quota + REPLY_SLACK, spin=self._worker_spin())
            except (OSError, RuntimeError) as exc:
                short = _SHORT_OF.get(exc.errno or 0) if isinstance(exc, OSError) else None
                pause = next(pauses, None) if short is not None else None
                if pause is not None:
                    log.warning("session %d: its worker could not start (%s): trying again in %.2f s", s.number, exc,
                                pause)  # fmt: skip
                    time.sleep(pause)
                    continue
                log.error("cannot start a worker for session %d: %s", s.number, exc)
                if short is not None:
                    raise ResourceExhausted(
                        f"host {self.host_id} is out of {short}: cannot start a session worker ({exc}); "
                        "try again later or on another host"
                    ) from None
                raise Unavailable(f"host {self.host_id} cannot start a session worker: {exc}") from None

    def session(self, session_id: str) -> FrontSession:
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

    def session_list(self) -> list[FrontSession]:
        with self._lock:
            return list(self._sessions.values())

    def claim_stream(self, s: FrontSession) -> None:
        """Give the session its one stream; a tenant's streams are bounded so that idle streams of many small
        leases cannot take every gRPC thread from everyone's Attach, RefreshToken and health checks."""
        with self._lock:
            if s.closed:
                raise FailedPrecondition(f"session closed: {s.close_reason}")
            if s.streaming:
                raise FailedPrecondition("session already has an open stream")
            open_streams = self._streams.get(s.tenant, 0)
            if open_streams >= self.config.max_streams_per_tenant:
                raise ResourceExhausted(f"tenant {s.tenant!r} has {open_streams} open streams on this host, its limit")
            self._streams[s.tenant] = open_streams + 1
            s.streaming = True

    def release_stream(self, s: FrontSession) -> None:
        with self._lock:
            if s.streaming:
                s.streaming = False
                left = self._streams.get(s.tenant, 1) - 1
                if left > 0:
                    self._streams[s.tenant] = left
                else:
                    self._streams.pop(s.tenant, None)

    def submit(self, s: FrontSession, commands: list[Any], nbytes: int) -> bool:
        """Queue commands of a session (blocks when its queue is full); False when it can take no more.

        When the device is idle, the first slice of the frame runs here, in the calling stream reader, instead
        of waking the device's thread for it (a thread wake-up less per round trip: what `loss.item()` pays):
        only a session in its own worker process (the device's thread sets torch's per-thread state for
        in-thread sessions), and only what the device's thread would run next anyway (`put_and_claim`: no
        other session waits or runs, and none can start until the slice is charged). The rest of the frame,
        if any, stays queued for the device's thread. A bulk upload's chunk read into an upload slot is always
        queued (round 35): its reader then reads the next chunk into the next slot while the device's thread has
        the worker copy this one; run here, the reader waited for each copy before it read on (one slot used, the
        receive and the copy in turns: BENCHMARKS.md, "Round 35, xfer35"). So are a side socket's frames of
        `bulk.SIDE_QUEUED` bytes or more (round 38): its reader reads and decrypts them itself (the stream's are read
        by gRPC's threads whatever its reader does), and run here, each frame's slice stopped the reading of the next
        (a captured step's 512 KiB batch: the reader and the worker took turns, the client's sends waited on a full
        socket, ~2-3x the stream's wall a step: BENCHMARKS.md, "Round 38, side38")."""
        first = commands[0]
        last = first is END_OF_STREAM or isinstance(first, GpupoolError)  # a reader's last item (a marker)
        if self._draining and not last:
            s.outbox.put(Closed(StatusCode.UNAVAILABLE, f"host {self.host_id} is draining"))
            return False
        queue = self.queues[s.device.index]
        if (
            last
            or s.runner is None
            or not s.runner.pid
            or (len(first[1]) >= bulk.BIG_UPLOAD and s.runner.holds(first[1]))
            or (nbytes >= bulk.SIDE_QUEUED and s.carrier == "side")
        ):
            # (a bulk upload's chunk in an upload slot, a side socket's big frame: the device's thread runs it
            # while its reader reads on)
            return queue.put(s.entry, commands, nbytes)
        worker = self._worker_of[s.device.index]
        taken = queue.put_and_claim(s.entry, commands, nbytes, worker.slice_commands)
        if not taken:
            return taken is None  # None: queued for the device's thread; []: the session is closed
        rest: list[Any] = []
        seconds = 0.0
        try:  # as DeviceWorker.run does it (the slice all of the frame's commands, the usual: they hold `nbytes`)
            rest, seconds = self._run_slice(s.entry, taken, worker.slice_seconds, nbytes if taken is commands else -1)
            s.hand_over()  # its replies to the stream's writer first, then the queue's bookkeeping (front.py)
        except Exception:  # the slice runner handles command errors; this is a last line of defence
            log.exception("stream reader of session %d: slice failed", s.number)
        finally:
            queue.done(s.entry, rest, seconds, claimed=True)
        return True

    def slice_commands(self, s: FrontSession) -> int:
        """The most commands a slice of `s` holds (its device's `DeviceWorker.slice_commands`)."""
        return self._worker_of[s.device.index].slice_commands

    def sync_now(self, s: FrontSession, request_id: int) -> bool:
        """Answer a lone Sync in the stream's reader when the session is idle (front.py); False: queue it."""
        return not self._draining and s.answer_sync(request_id, self.queues[s.device.index], self.config.outbox_bytes)

    def refresh(self, s: FrontSession, token: str) -> float:
        """Extend a session with a renewed token of its own lease; returns its new end (unix seconds). The token is
        checked as Attach checks one (signature, expiry, revocation: UNAUTHENTICATED; this host, the certificate it
        is bound to: PERMISSION_DENIED), and must name the session's lease, device and tenant, and grant the same
        network, collective group and certificate binding (PERMISSION_DENIED otherwise: those are fixed for the
        session's life); a refused token changes nothing. Its terms (quota, share) hold from now on where it is at
        least as new as the token whose terms the session holds (by expiry: the scheduler's renewals only move it
        later), so an older token shown again cannot bring back a quota the scheduler took away (tokq52: until round
        52 the first token's quota held for the session's life, whatever its lease's renewals said). A smaller quota
        refuses the session's allocations past it, and takes nothing it holds (`_take_terms`)."""
        claims = tokens.verify(self.config.token_key, token, now=self.clock.now())
        if claims.host != self.host_id:
            raise PermissionDenied(f"refreshed token is for host {claims.host!r}, this is {self.host_id!r}")
        if (claims.lease_id, claims.device) != (s.lease_id, s.device.index):
            raise PermissionDenied(
                f"refreshed token is for another lease or device (lease {claims.lease_id[:40]!r} device "
                f"{claims.device}; this session's: lease {s.lease_id[:40]!r} device {s.device.index})"
            )
        if (claims.tenant or claims.lease_id) != s.tenant:
            raise PermissionDenied(f"refreshed token names tenant {claims.tenant!r}, this session's is {s.tenant!r}")
        held = s.claims
        if (claims.network, claims.group, claims.cert) != (held.network, held.group, held.cert):
            raise PermissionDenied(
                "refreshed token changes the session's network grant, collective group or client certificate binding, "
                "which hold for its life: attach a new session with it"
            )
        self.check_bound(claims, s.cert_pem)  # (the caller is the session's certificate: `check_holder`)
        ends_mono = self.clock.ends_mono(claims.expires_at)
        with self._lock:  # (two refreshes at once: the newer token's terms hold, whichever comes last)
            s.ends_mono = max(s.ends_mono, ends_mono)
            s.expires_at = max(s.expires_at, claims.expires_at)
            newer = claims.expires_at >= s.claims.expires_at  # (not older than the token whose terms hold)
            if newer:
                s.claims = claims
        if newer:
            if s.lock.acquire(blocking=False):  # else the running slice's end leaves it to the next slice's start
                try:
                    self._take_terms(s)
                finally:
                    s.lock.release()
        return s.expires_at

    def terms(self, s: FrontSession) -> tuple[int, float]:
        """The quota and share `s` holds from now on: its newest token's (`refresh`; its next slice takes them)."""
        claims = s.claims
        return _quota_of(claims, s.device), claims.share

    def _take_terms(self, s: FrontSession) -> None:
        """Under the session's lock: the terms of its newest token (`refresh`) hold from here on: its quota here
        and, with its next slice (`SliceRequest.quota`), in its worker; its share in its device's queue. What it
        holds past a smaller quota stays its own (`s.kept`, `_apply`) until freed; its worker refuses allocations
        past the quota, with the quota's words. (`s.claims` is read once: a refresh meanwhile is taken next time.)"""
        claims = s.claims
        if claims is s.terms_of or s.closed:
            return
        s.terms_of = claims
        quota, share = _quota_of(claims, s.device), claims.share
        s.kept = s.used if s.used > quota else 0
        if quota != s.quota:
            s.quota = s.tell_quota = quota
            if s.runner is not None:
                s.runner.reply_bound(quota + REPLY_SLACK)
        if share != s.share:
            s.share = share
            self.queues[s.device.index].reweigh(s.entry, share)

    def lapsed(self, s: FrontSession) -> bool:
        """Whether `s`'s lease has ended (its session then closed here, as the reaper closes it): checked at each of its
        frames, before anything of it is queued or answered (round 47: a session after a forward step of the wall clock
        ran up to the reaper's sleep, 10 s, past its end; after a backward step, by the step). Its end on the monotonic
        clock (taken at its attach and renewals) or the wall clock's, whichever comes first; not while the registrar
        holds expiries (the scheduler unreachable: nobody can renew)."""
        if s.ends_mono > time.monotonic() and s.expires_at > time.time():
            return False
        if time.monotonic() < self._expiry_hold:
            return False
        self.close_session(s, f"lease {s.lease_id} expired")
        return True

    def close_session(
        self,
        s: FrontSession,
        reason: str,
        code: StatusCode = StatusCode.FAILED_PRECONDITION,
        drop_replies: bool = False,
    ) -> None:
        """End a session: its worker, its memory, its queue; its stream ends with `code` after the replies
        queued before (none with `drop_replies`: their memory goes back at once)."""
        with self._lock:
            if s.closed:
                return
            s.closed = True
            s.close_reason = reason
            self._sessions.pop(s.session_id, None)
            self.unread.leave(s)  # with its place in the sessions: what it still holds counts no more
            self._recently_closed[s.session_id] = Closed(code, reason)
            while len(self._recently_closed) > RECENTLY_CLOSED:
                self._recently_closed.popitem(last=False)
            key = (s.lease_id, s.device.index)
            if self._by_lease.get(key) is s:
                del self._by_lease[key]
        self.queues[s.device.index].remove(s.entry)
        # Never in a device's thread (a session its own slice ends: replies past --max-unread-bytes, a dead worker;
        # the session's lock is an RLock, held there): the device's other sessions would wait for the flush.
        mine = isinstance(threading.current_thread(), DeviceWorker)
        if s.device_busy and s.runner is not None and not mine and s.lock.acquire(blocking=False):
            try:  # an idle session's GPU time still unreported (a CUDA device's run-ahead): booked before its end
                # (a running slice's session is ended at once, as before: what its worker had not reported is lost)
                self._book(s, self._flush(s))
            finally:
                s.lock.release()
        s.end_bulk()  # a transfer blocked on its side socket fails now; a frames socket carries the end first
        self._kill_worker(s)  # its memory goes back now, and a running slice ends with it
        with s.lock:  # waits for a running slice of this session to finish
            self._release_worker(s)
            self._set_used(s, 0)
        if drop_replies:
            _drop_replies(s)
        s.outbox.put(Closed(code, reason))
        log.info("closed session %d (lease %s): %s", s.number, s.lease_id, reason)

    def _kill_worker(self, s: FrontSession) -> None:
        if s.runner is not None and s.runner.pid and self.zygote is not None:
            self.zygote.kill(s.runner.pid)

    def _release_worker(self, s: FrontSession) -> None:
        """Close a session's (killed) worker; its uid and its block of --collective-ports are free once it is gone."""
        if s.runner is not None:
            s.runner.close()
            if self._uids is not None and s.worker_uid > 0:
                self._uids.give_back(s.worker_uid, s.runner.pid)  # free once that worker is gone
        if s.port_share is not None:  # (a worker that never started: _new_runner gave it back)
            self._port_shares.give_back(s.port_share, s.runner.pid if s.runner is not None else 0)
            s.port_share = None

    def detach(self, session_id: str) -> None:
        """Close a session; detaching one that is already closed is a no-op (retries are safe)."""
        with self._lock:
            if session_id in self._recently_closed:
                return
        self.close_session(self.session(session_id), "detached")

    def _reap(self) -> None:
        """Close the sessions whose lease ended (not before the registrar's expiry hold). It sleeps until the first
        open session's end (a Refresh only moves an end later), at most `clock_look` while any session is open (a
        step of the wall clock moves a lease's end on it; round 48: until then `reap_interval`, 10 s, so an idle
        session ran that long past its end after a forward step), and is woken by a new session, a changed hold,
        the daemon's stop and (round 49) a step of the kernel's wall clock (server/clocksteps.py, a timerfd, where
        Linux has one): an idle daemon's reaper wakes every `reap_interval` alone."""
        while not self._stop.is_set():
            self._reap_wake.clear()
            now = self.clock.now()
            mono = time.monotonic()
            hold = self._expiry_hold
            sessions = self.session_list()
            look = min(self.config.reap_interval, self.config.clock_look) if sessions else self.config.reap_interval
            first = mono + look
            for s in sessions:
                # (its wall-clock end on the monotonic clock from now: a forward step since its attach brings it nearer)
                ends = min(s.ends_mono, mono + (s.expires_at - now))
                if ends <= mono and mono >= hold:
                    self._close_aside(s, f"lease {s.lease_id} expired")
                else:
                    first = min(first, max(ends, hold))
            # (measured from now: a close above may have taken long, an inline one waits for its session's slice)
            self._reap_wake.wait(min(max(first - time.monotonic(), 0.01), look))

    def _close_aside(self, s: FrontSession, reason: str) -> None:
        """Close one of several sessions (the reaper's expired ones, a revoked lease's): a session whose close
        first waits for its worker's GPU time (`_flush`, up to FLUSH_SECONDS, which the session makes long by
        queuing kernels) is closed by a thread of its own, so that the sessions after it do not wait behind it."""
        if s.device_busy:
            threading.Thread(target=self.close_session, args=(s, reason), name="gpupool-close", daemon=True).start()
        else:
            self.close_session(s, reason)

    # ---- execution ----

    def _run_slice(self, entry: Entry, items: list[Any], budget: float, bound: int = -1) -> tuple[list[Any], float]:
        """Send the session's next commands to its worker; returns (the unexecuted rest, seconds to charge). Every
        slice is booked once (`_book`: the session's busy time, the ledger, the slice histogram), whatever happens;
        one that reached its worker before its replies are queued (`_apply`), so that a client that saw a reply
        sees what its slice did in Status and the metrics. `bound`: at least the bytes of `items`' spans, where
        known (`submit`: its frame's), else -1."""
        s: FrontSession = entry.owner
        try:
            rest, seconds, booked = self._slice(s, items, budget, bound)
        except BaseException:
            self._book(s, 0.0)
            raise
        if not booked:
            self._book(s, seconds)
        return rest, seconds

    def _slice(
        self, s: FrontSession, items: list[Any], budget: float, bound: int = -1
    ) -> tuple[list[Any], float, bool]:
        """`_run_slice`'s work; the third value: whether `_apply` booked the slice. `bound`: see `_run_slice`."""
        with s.lock:
            if s.closed or s.runner is None:
                return [], 0.0, False
            if s.claims is not s.terms_of:  # a refresh's, while a slice ran (`refresh`)
                self._take_terms(s)
            first = items[0]
            if first is END_OF_STREAM or isinstance(first, GpupoolError):  # everything before it ran: the end
                s.outbox.put(first)
                return items[1:], 0.0, False
            # END_OF_STREAM (or a reader's error) is the last thing a reader queues: only a slice's last item can be it
            last = items[-1]
            n = len(items) - 1 if last is END_OF_STREAM or isinstance(last, GpupoolError) else len(items)
            head = items[:n] if n < len(items) else items
            spans = [span for _, span in head]
            if 0 <= bound < BIG_PART and n == len(items):
                # a small frame's slice (an eager step's), all of it: not counted here (~80 instructions a span),
                # the runner's join counts its bytes (`worker.SMALL`; round 48)
                size = SMALL
                uploads = False
            elif (size := sum(map(len, spans))) < bulk.BIG_UPLOAD:  # (counted once: the runner takes it from the
                # request) no big upload, and less than SLICE_BYTES in all
                uploads = False  # what slice_length says of them, without its loop: the usual slice, all of it
            else:
                n, uploads = bulk.slice_length([k for k, _ in head], list(map(len, spans)))
                if n > 1 and uploads and s.runner.holds(spans[0]):  # read into its upload slot: run from there
                    n = 1
                if n < len(spans):
                    spans = spans[:n]
                    size = -1
            batch, after = items[:n], items[n:]
            room = self.config.outbox_bytes - s.outbox_bytes
            if room <= 0 and batch[0][0] in slices.ANSWERED and self._parked(s):
                return items, 0.0, False
            # (device_free, reply_room, budget, payload, uploads, slot, size: by position, no keyword matched a slice)
            req = SliceRequest(self._device_free(s), room, budget, b"", uploads, -1, size, s.tell_quota)
            s.tell_quota = -1  # (told once: a worker that did not run it is ended)
            start = time.perf_counter()
            try:
                res = s.runner.run(req, len(batch), spans)
                if res.executed == 0 and not res.partial and not res.malformed:
                    raise WorkerDied("the session's worker made no progress")
            except WorkerDied as exc:
                self._worker_died(s, batch, exc)
                return [], time.perf_counter() - start, False
            now = time.perf_counter()
            wall = now - start
            # A piece that answers nothing (of a graph's definition) pays its wall time: a worker claiming pieces
            # forever, none of them progress the daemon can see, pays for each in its share of the device. A CUDA
            # device's results report earlier slices' GPU seconds (devices.SliceTimer): capped by the session's
            # clock instead (front.GpuClock), and a piece pays them on top of its wall time.
            if s.device.fake:
                seconds = wall if res.partial and not res.replies else min(res.seconds, wall)
            else:
                seconds = s.gpu_clock.take(res.seconds, start, now)
                if res.partial and not res.replies:
                    seconds += wall
            self._apply(s, res, seconds)
            if res.malformed:  # after the replies of the commands before it
                self._malformed(s, batch[res.executed][1])
            if s.closed:  # its replies would take the host past --max-unread-bytes, or a command was malformed
                return [], seconds, True
            return (batch[res.executed :] + after if res.executed < n else after), seconds, True

    def _malformed(self, s: FrontSession, span: Any) -> None:
        """End `s` with INVALID_ARGUMENT: its worker found the command `span` malformed (protobuf refuses it), a
        command of a frame whose commands the front left to the worker's parse (`service.DeviceServicer._frame`).
        Nothing at or after it ran, nor runs: the session closes here, and its stream ends after the replies queued
        before (as when the front's own check refused a frame)."""
        try:
            device_pb2.ClientFrame.FromString(bytes(span))
            why = "its worker could not parse it"  # (a worker that says so of a command protobuf takes: its own end)
        except DecodeError as exc:
            why = str(exc)
        reason = f"malformed ClientFrame (a command of {len(span)} bytes): {why}"
        self.close_session(s, reason, StatusCode.INVALID_ARGUMENT)

    def _device_free(self, s: FrontSession) -> int:
        """What `s`'s worker is told it may still allocate (`SliceRequest.device_free`): the bytes its device has left
        beyond what its sessions hold now, or its quota's room (`s.quota - s.used`), whichever is fewer. Its worker
        checks every allocation against both (sessions.py `WorkerSession.admit`, the executor's and the native
        runner's inline checks), so the smaller one refuses exactly what the device's free bytes refused: where the
        quota's room is the smaller the quota refuses first anyway. Until round 51 (free51) the free bytes were sent
        every slice, and a worker (code a tenant may influence) knew its co-tenants' total use (the device's size
        less its own and the free bytes) at every slice; now only where they are the binding limit, which any refusal
        of an allocation discloses (docs/security.md, "What a tenant can learn of other tenants"). Under the
        session's lock (`s.used` changes under it only)."""
        return min(s.device.capacity - self.memory[s.device.index].used, s.quota - s.used)

    def _flush(self, s: FrontSession) -> float:
        """The GPU seconds of a closing session's slices still unreported (`device_busy`: a CUDA device's
        run-ahead, devices.SliceTimer): a slice of no commands, which waits for its GPU and reports them all
        (`slices.run_commands`), given FLUSH_SECONDS. Under the session's lock, before its worker is ended. A
        worker that does not answer in time (or answers what an empty slice cannot) pays the wall time. (Not at
        a stream's end: the session lives on, and its next slice or its close reports them.)"""
        assert s.runner is not None
        req = slices.SliceRequest(device_free=self._device_free(s), reply_room=0, budget=0.0, payload=b"")
        start = time.perf_counter()
        s.device_busy = False
        try:
            res = s.runner.flush(req, FLUSH_SECONDS)
        except WorkerDied as exc:
            log.warning("session %d (lease %s): no GPU time from its closing worker (%s)", s.number, s.lease_id, exc)
            return time.perf_counter() - start
        now = time.perf_counter()
        if res.executed or res.replies:
            return now - start
        return s.gpu_clock.take(res.seconds, start, now)

    def _apply(self, s: FrontSession, res: slices.SliceResult, seconds: float) -> None:
        """Mirror a slice's outcome: memory, counters, ledger, replies (a worker may lie only about itself); the
        slice is booked (`seconds`) before its replies are queued."""
        # (what it held past a smaller quota at a refresh stays its own until freed: `_take_terms`)
        used = min(res.used, max(s.quota, s.kept))
        s.kept = used if s.kept and used > s.quota else 0
        self._set_used(s, used)
        ops = max(0, res.ops - s.ops)
        s.ops, s.handles, s.graph_bytes = max(s.ops, res.ops), res.handles, res.graph_bytes
        s.busy_seconds += seconds
        self.ledger.slice_done(s, ops, res.errors, res.uploaded, res.downloaded, res.events, seconds)
        s.error_pending = res.error_pending
        s.device_busy = res.busy
        replies = res.replies
        if not replies:
            return
        sizes = [len(r) if type(r) is bytes else reply_bytes(r) for r in replies]  # once a reply: room, then send
        if not self._room_for_replies(s, sum(sizes)):
            return
        for item, size in zip(replies, sizes, strict=True):
            s.send(item, size)

    def _room_for_replies(self, s: FrontSession, n: int) -> bool:
        """Whether the host may hold `n` more bytes of `s`'s unread replies (--max-unread-bytes): the open
        sessions' unread bytes (`Unread`, one number, not a sum over the sessions a slice), `s`'s own (counted
        there while it is open) and `n`. Past the limit the session holding the most unread bytes, counting
        these, ends with RESOURCE_EXHAUSTED: `s` itself (False: its replies are dropped), or another one, closed
        by a thread of its own (never two sessions' locks at once) while these replies are kept: a session that
        reads its replies is never the one."""
        cap = self.config.max_unread_bytes
        if cap <= 0:
            return True
        unread = self.unread
        with unread.lock:
            total = unread.total + n + (0 if s.counted else s.outbox_bytes)
        if total <= cap:
            return True
        others = [x for x in self.session_list() if x is not s]  # past the limit only: who holds the most
        hog = max(others, key=lambda x: x.outbox_bytes, default=None)
        if hog is None or s.outbox_bytes + n >= hog.outbox_bytes:
            self._exhausted(s, s.outbox_bytes + n, total)
            return False
        threading.Thread(
            target=self._exhausted, args=(hog, hog.outbox_bytes, total), name="gpupool-unread", daemon=True
        ).start()
        return True

    def _exhausted(self, s: FrontSession, own: int, total: int) -> None:
        """End `s` for the host's unread replies. Its client is told its own bytes and the limit, not the host's
        total (round 49, sec49: until then the reason named it, and with one other tenant on the host the total less
        its own was that tenant's unread bytes); the log has the total."""
        reason = (
            f"its client left {own} bytes of replies unread, the most of this host's sessions, and this host's unread "
            f"replies would pass its limit of {self.config.max_unread_bytes} bytes (--max-unread-bytes): read "
            "replies as they come"
        )
        log.warning("session %d (lease %s): %s (the host's unread replies: %d bytes)", s.number, s.lease_id, reason,
                    total)  # fmt: skip
        self.ledger.add(s, 0, {StatusCode.RESOURCE_EXHAUSTED: 1}, 0, 0)
        self.close_session(s, reason, StatusCode.RESOURCE_EXHAUSTED, drop_replies=True)

    def _set_used(self, s: FrontSession, used: int) -> None:
        if used == s.used:  # (most slices: nothing to move; `s.used` changes under the session's lock only)
            return
        mem = self.memory[s.device.index]
        with mem.lock:
            mem.used += used - s.used
            s.used = used

    def _worker_died(self, s: FrontSession, batch: list[Any], exc: WorkerDied) -> None:
        if s.closed:
            return  # closed on purpose (detach, expiry): the worker was killed for it
        runner = s.runner
        assert runner is not None
        index = min(max(runner.progress(), 0), len(batch) - 1)
        what = slices.describe_command(batch[index][1])
        cause = str(exc)
        if self.zygote is not None and runner.pid:
            self.zygote.kill(runner.pid)
            cause = f"{self.zygote.wait_ended(runner.pid, 2.0)} ({exc})"
        reason = f"the session's worker process {runner.pid} {cause} while running {what}; its tensors are lost"
        log.error("session %d (lease %s): %s", s.number, s.lease_id, reason)
        self.ledger.add(s, 0, {StatusCode.INTERNAL: 1}, 0, 0)
        self.close_session(s, reason, StatusCode.INTERNAL)

    def _outbox_full(self, s: FrontSession) -> bool:
        return s.outbox_bytes >= self.config.outbox_bytes

    def _parked(self, s: FrontSession) -> bool:
        """Whether the session must wait for its client to read replies before it may produce more."""
        return self._outbox_full(s) and self.queues[s.device.index].block(s.entry, lambda: self._outbox_full(s))

    def replied(self, s: FrontSession, item: Any) -> None:
        """gRPC took a reply off the session's outbox: a parked session may run again."""
        s.sent(item)
        if s.entry.blocked:
            self.queues[s.device.index].unblock(s.entry, lambda: self._outbox_full(s))

    def _book(self, s: FrontSession, seconds: float) -> None:
        """Book a slice that did nothing the daemon saw (its session closed, a worker that died, the stream's end)."""
        s.busy_seconds += seconds
        self.ledger.charge(s, seconds)

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
                worker_pid=s.worker_pid,
                handles=s.handles,
                graph_bytes=s.graph_bytes,
                graph_limit_bytes=self.config.max_graph_memory,
            )
            for s in self.session_list()
        ]
        busy = self.ledger.snapshot()["device_busy"]
        devs = []
        for d in self.device_list:
            used = self.memory[d.index].used
            u = device_pb2.DeviceUsage(info=d.info(), used_bytes=used, busy_seconds=busy.get(d.index, 0.0))
            free = d.measured_free(used, self.config.isolation == "thread")  # (terms54: what a raise must fit)
            if free is not None:
                u.free_bytes = free
            devs.append(u)
        return sessions, devs

    def draining(self) -> bool:
        return self._draining

    def hold_expiry(self, until: float) -> None:
        """While the scheduler is unreachable nobody can renew a lease: keep expired sessions until `until` (unix
        seconds; held on the monotonic clock from now, so that no step of the wall clock lengthens it)."""
        self._expiry_hold = time.monotonic() + max(0.0, until - time.time())
        self._reap_wake.set()

    def revocations_heard(self) -> None:
        """The registrar's word: the scheduler answered a heartbeat as this host's, naming every revocation it holds
        for it (and when status tokens were last revoked): Attach is served from now on. With `--state-dir` what the
        daemon holds is written there when it changed (or `revocations.REWRITE` seconds passed)."""
        if not self._heard.is_set():
            self._heard.set()
            log.info("revocations heard from the scheduler: serving Attach")
        if self._revfile is not None:
            self._heard_at = time.time()
            changes = self._verifier.changes if self._verifier is not None else 0
            if self._revfile.due((changes, self.revoked_certs.version)):
                self._save_due.set()  # (written by `_revocations_writer`: not in the registrar's heartbeat loop)

    def _load_revocations(self, revfile: RevocationFile) -> None:
        """Take what `revfile` holds (only ever more refusals), and whether it is recent enough to serve on."""
        heard = revfile.load()
        if heard is None:
            return
        if self._verifier is not None:
            self._verifier.revoke(list(heard.leases), until=list(heard.leases.values()))
            self._verifier.status_not_before(heard.status_not_before)
        if heard.certs_version:
            self.revoked_certs.replace(heard.certs, heard.certs_version)
        age = time.time() - heard.heard_at
        # (a daemon without a Verifier, a test's, keeps no lease revocations: never served on). `--revocations-max-age
        # 0` is never (secrev45: a file written up to 60 s "ahead", the clock stepped back since, passed `age <= 0`);
        # the age is checked again when the scheduler is found unreachable (`_offline_until`): a scheduler that
        # answered Register and then failed otherwise for an hour did not leave a start-time check standing.
        self._offline_ok = (
            self._verifier is not None
            and heard.heard_at > 0
            and self.config.revocations_max_age > 0
            and -60 <= age <= self.config.revocations_max_age
        )
        self._offline_until = heard.heard_at + self.config.revocations_max_age if self._offline_ok else 0.0
        log.info(
            "revocations file %s: %d lease(s), %d certificate(s) revoked, as the scheduler said %.0f s ago%s",
            revfile.path,
            len(heard.leases),
            len(heard.certs),
            age,
            ""
            if self._offline_ok
            else f" (older than --revocations-max-age {self.config.revocations_max_age:g} s: "
            "Attach waits for the scheduler's first answer)",
        )

    def _revocations_writer(self, revfile: RevocationFile) -> None:
        """A thread of its own writes the file when a heartbeat made it due: at 200,000 revocations a write takes
        seconds on a loaded host, which in the registrar's loop would delay heartbeats past the host timeout."""
        while not self._stop.is_set():
            if self._save_due.wait(1.0):
                self._save_due.clear()
                self._write_revocations(revfile)

    def _write_revocations(self, revfile: RevocationFile) -> None:
        # The answer's time first (secrev45): a heartbeat between reading the revocations and it made the file say
        # "heard at T" without what was heard at T, and a restart within --revocations-max-age served that lease.
        heard_at = self._heard_at
        changes = self._verifier.changes if self._verifier is not None else 0
        stamp = (changes, self.revoked_certs.version)
        leases, not_before = self._verifier.revocations() if self._verifier is not None else ({}, 0.0)
        certs = self.revoked_certs.fingerprints()
        try:
            revfile.save(Heard(self.host_id, heard_at, leases, not_before, certs, stamp[1]), stamp)
        except OSError as exc:
            log.error("cannot write the revocations file %s: %s", revfile.path, exc)

    def scheduler_unreachable(self) -> None:
        """The registrar's word: the scheduler cannot be reached. A daemon that has not heard from it since it started
        serves Attach on the revocations of its state dir where they are recent (`_load_revocations`): a revoked
        token is refused, the others attach. Until round 45 it served none until the scheduler answered."""
        if self._offline_ok and not self._heard.is_set():
            if time.time() > self._offline_until:
                self._offline_ok = False
                log.error("revocations file older than --revocations-max-age by now: Attach waits for the scheduler")
                return
            self._heard.set()
            log.warning(
                "scheduler %s cannot be reached: serving Attach on the revocations of %s (a lease ended since it was "
                "written is refused from the scheduler's first answer on)",
                self.config.scheduler,
                self._revfile.path if self._revfile is not None else "",
            )

    def revoked_certificates_version(self) -> str:
        return self.revoked_certs.version

    def revoke_certificates(self, fingerprints: list[str], version: str) -> None:
        """The scheduler's list of revoked client certificates (whole): refused from now on."""
        if self.revoked_certs.replace(fingerprints, version):
            log.warning("revoked client certificates: now %d", len(fingerprints))
            for s in self.session_list():
                self._end_if_revoked(s)

    def note_certificate(self, s: FrontSession, pem: bytes | None) -> None:
        """The client certificate `s` was attached with: its revocation ends the session (round 45, secrev45: until
        then a session attached before the revocation, its op stream and side socket ran on until the lease ended).
        Checked once more here: a revocation heard between the call's check and now ends it at once."""
        s.cert_pem = pem
        if pem is not None:
            try:
                s.cert_der = certrevoke.der_of_pem(pem)
            except InvalidArgument:
                s.cert_der = None
        self._end_if_revoked(s)

    def _end_if_revoked(self, s: FrontSession) -> None:
        gone = self.revoked_certs.refused_pem(s.cert_pem)
        if gone:
            self.close_session(s, f"client certificate {gone} is revoked", StatusCode.UNAUTHENTICATED)

    def _await_revocations(self, what: str) -> None:
        """Wait (`REVOCATIONS_WAIT` at most) for the scheduler's first heartbeat reply; else UNAVAILABLE, at once
        where `REVOCATIONS_WAITERS` calls wait already."""
        with self._lock:
            crowded = self._waiting_heard >= REVOCATIONS_WAITERS
            if not crowded:
                self._waiting_heard += 1
        if crowded:
            raise Unavailable(
                f"host {self.host_id} has not heard from its scheduler ({self.config.scheduler}) since it started, so "
                f"it cannot tell which leases were revoked, and {REVOCATIONS_WAITERS} calls wait for it already: "
                f"{what} refused; retry in a few seconds"
            )
        try:
            heard = self._heard.wait(REVOCATIONS_WAIT)
        finally:
            with self._lock:
                self._waiting_heard -= 1
        if heard:
            return
        raise Unavailable(
            f"host {self.host_id} has not heard from its scheduler ({self.config.scheduler}) since it started "
            f"{time.monotonic() - self._started_at:.0f} s ago, so it cannot tell which leases were revoked: {what} "
            "refused until its first heartbeat is answered; retry in a few seconds"
        )

    def revoke_leases(self, lease_ids: list[str]) -> None:
        for lease_id in lease_ids:
            with self._lock:
                of_lease = [s for (lease, _), s in self._by_lease.items() if lease == lease_id]
            for s in of_lease:
                self._close_aside(s, f"lease {lease_id} was released or revoked by the scheduler")

    def status(self, sees: Callable[[device_pb2.SessionUsage], bool] | None = None) -> device_pb2.StatusReply:
        """The host's devices and sessions: every session (`sees` None, an operator's view) or those `sees` admits."""
        sessions, devs = self.usage()
        if sees is not None:
            # A caller's view: its own sessions, and a device's memory and busy time as theirs alone (the device's
            # totals less its own would be the other tenants' usage, one tenant's exactly where two share it).
            sessions = [u for u in sessions if sees(u)]
            for d in devs:
                d.used_bytes = sum(u.used_bytes for u in sessions if u.device == d.info.index)
                d.ClearField("free_bytes")  # (terms54: the device's free memory would tell the others' use)
                d.busy_seconds = sum(u.busy_seconds for u in sessions if u.device == d.info.index)
        return device_pb2.StatusReply(host_id=self.host_id, devices=devs, sessions=sessions, draining=self._draining)

    def lease_named(self, token: str, peer: bytes | None = None) -> str:
        """The lease of a token presented to Status, checked as Attach checks it (signature, expiry, revocation,
        this host, the certificate it is bound to): its holder may see that lease's sessions."""
        claims = tokens.verify(self.config.token_key, token, now=self.clock.now())
        if claims.host != self.host_id:
            raise PermissionDenied(f"token is for host {claims.host!r}, this is {self.host_id!r}")
        self.check_bound(claims, peer)
        return claims.lease_id

    def check_bound(self, claims: tokens.TokenClaims, peer: bytes | None) -> None:
        """A lease token bound to a client certificate (`TokenClaims.cert`: the scheduler binds the tokens of a lease
        allocated with a certificate to it) is honoured only for a caller presenting that certificate (`peer`, PEM),
        where this daemon sees client certificates (`--tls-client-auth require`); PERMISSION_DENIED otherwise. Until
        round 46 a token was a bearer credential: a session attached with another tenant's certificate (or none)
        using a revoked certificate holder's token. An unbound token (an API token's lease, a hand-minted or older
        token) is anyone's. A daemon under `none` sees no certificate to compare: where `--tls-client-auth auto` chose
        `none` (`TlsConfig.client_auth_auto`: a join token, no scheduler, `--insecure`) it refuses a bound token,
        PERMISSION_DENIED (round 49: the token is genuine, so not UNAUTHENTICATED; what it may do is held to a
        certificate no call here can show, as a wrong certificate's is under `require`), and says why once in its log;
        where the operator named `none` it takes it as a bearer's and says so once (a WARNING naming `--tls-client-auth
        require`; round 48 did so under `auto`'s `none` too, and said nothing before): a certificate pool's daemon
        under a named `none` is a configuration the docs keep (docs/security.md, round 46: a revocation ends its bound
        leases at the next heartbeat)."""
        if not claims.cert:
            return
        if not self.config.tls.verifies_clients and self.config.tls.client_auth_auto:
            if not self._bearer_said:
                self._bearer_said = True
                log.warning(
                    "lease %s's token is bound to client certificate %s..., and this daemon asks no client for a "
                    "certificate (--tls-client-auth %s -> none): refused (PERMISSION_DENIED; said once); serve with "
                    "--tls-client-auth require (and a --tls-ca or --tls-client-ca) to attach bound tokens for their "
                    "certificates, or name --tls-client-auth none to take them as bearer tokens",
                    claims.lease_id,
                    claims.cert[:23],
                    self.config.tls.client_auth_auto,
                )
            raise PermissionDenied(
                f"lease {claims.lease_id}'s token is bound to client certificate {claims.cert[:23]}..., and this "
                "daemon asks no client for a certificate (its --tls-client-auth auto chose none), so no call here can "
                "show it: refused; its operator serves bound tokens with --tls-client-auth require"
            )
        if not self.config.tls.verifies_clients:
            if not self._bearer_said:
                self._bearer_said = True
                log.warning(
                    "lease %s's token is bound to client certificate %s..., but this daemon verifies no client "
                    "certificate (%s): the token attaches here as a bearer's, whoever presents it (said once); serve "
                    "with --tls-client-auth require (and a --tls-ca or --tls-client-ca) to hold bound tokens to "
                    "their certificates",
                    claims.lease_id,
                    claims.cert[:23],
                    "--insecure" if self.config.tls.insecure else "--tls-client-auth none",
                )
            return
        shown = certrevoke.fingerprint_pem(peer) if peer is not None else "none"
        if shown != claims.cert:
            raise PermissionDenied(
                f"lease {claims.lease_id}'s token is bound to client certificate {claims.cert[:23]}..., the one it was "
                f"allocated with; this call presents {shown[:23]}{'...' if peer is not None else ''}"
            )

    def check_holder(self, s: FrontSession, peer: bytes | None) -> None:
        """A call naming session `s` by its id (Stream, Detach, RefreshToken) comes with the client certificate `s`
        was attached with, where this daemon sees them (round 46: a session id is no bearer credential for another
        certificate); PERMISSION_DENIED otherwise."""
        if s.cert_pem is not None and peer != s.cert_pem and self.config.tls.verifies_clients:
            raise PermissionDenied(f"session {s.number} was attached with another client certificate")

    def operator_status(self, token: str) -> None:
        """Check a status token presented to Status (the scheduler's grant to an operator of this host's full view:
        `tokens.mint_status`): signed by the scheduler's key, unexpired, for this host; raises otherwise."""
        host = tokens.verify_status(self.config.token_key, token, now=self.clock.now())
        if host != self.host_id:  # (before any wait, as Attach's)
            raise PermissionDenied(f"status token is for host {host!r}, this is {self.host_id!r}")
        if not self._heard.is_set():
            self._await_revocations("a status token")
            tokens.verify_status(
                self.config.token_key, token, now=self.clock.now()
            )  # (revoked since: the scheduler's reply says)

    # ---- shutdown ----

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new work and wait for what was received to run; True when everything finished."""
        self._draining = True
        deadline = time.monotonic() + (self.config.drain_seconds if timeout is None else timeout)
        return all(q.wait_idle(max(0.0, deadline - time.monotonic())) for q in self.queues.values())

    def stop(self) -> None:
        self._draining = True
        self._stop.set()
        if self._revfile is not None and self._heard_at:  # (its last answer's time: the file's age starts there)
            self._write_revocations(self._revfile)
        self._reap_wake.set()
        if self._clock_steps is not None:
            self._clock_steps.close()
        for s in self.session_list():
            self.close_session(s, f"host {self.host_id} is shutting down", StatusCode.UNAVAILABLE)
        for q in self.queues.values():
            q.stop()
        for w in self.workers:
            if w.is_alive():
                w.join(timeout=5)
        if self._uids is not None:
            self._uids.close()
        self._port_shares.close()
        self.metrics.stop()
