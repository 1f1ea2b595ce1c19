"""Where a session's commands run: its own worker process (`ProcessRunner`, the default), or a thread of the
daemon (`InlineRunner`, `--isolation thread`, for measuring what isolation costs and for hosts without fork).

A worker is forked from the zygote (zygote.py) and runs `worker_main`: it confines itself (sandbox.py), builds
the session's tensor state (sessions.WorkerSession) and a CommandExecutor, and then answers slice requests on its
socket until the daemon closes it. Everything the session allocates lives and dies with this process, so a
segfault, abort or CUDA device-side assert in a kernel ends this session only.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import mmap
import os
import re
import select
import socket
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gpupool import protocol
from gpupool.protocol import COLLECTIVE_PORTS

from . import bulk, slices
from .slices import SliceRequest, SliceResult

if TYPE_CHECKING:  # torch stays unimported until needed: the zygote starts before the daemon imports it
    from .devices import Device

log = logging.getLogger(__name__)
# A worker shares one memory file with the daemon: a word where it writes the index of the command it is
# running (so a crash can be named), and a buffer for slices and results that fit (uploads and downloads are
# megabytes: one memcpy each way instead of a socket's many small copies and wake-ups).
DATA_AT = 4096
# A byte the daemon sets while another session of the device waits to run (fairqueue.FairQueue.contend), before
# each slice and when one arrives: a collective waiting for its peers gives the device back only then
# (server/collectives.py).
CONTENDED_AT = 64
DATA_BYTES = bulk.SLICE_BYTES  # a slice of four 4 MiB upload chunks, or a download piece of four
# Behind it, two download slots (slices.SideChunk): a bulk Get's piece is written into a free one and sent on
# the side socket from there, while the worker writes the next piece into the other.
SLOTS_AT = DATA_AT + DATA_BYTES
SLOT_BYTES = bulk.PIECE_BYTES
BIG_PART = 64 * 1024  # spans at least this large on average are copied one by one into the shared buffer (`run`)
# `SliceRequest.size` of a slice whose spans hold fewer than BIG_PART bytes in all, not counted (`Daemon._slice`: an
# eager frame's, all of it): `run` joins them (as it would) and takes their count from the join (round 48: one pass
# over the spans, where `sum(map(len, ...))` first read each one, ~80 instructions a span)
SMALL = -2
SLOTS = 2
# Behind those, upload slots: the session's reader reads a big bulk upload's bytes (its canonical span) from the
# side socket straight into a free one (`ProcessRunner.upload_span`), and the worker runs it from there: no copy
# of the span into the data buffer. A slot is free once nothing in the daemon refers to its span any more (the
# queued command ran, or was dropped with its session), nor to any view made of it (a slice, a cast, memoryview() of
# it): `ProcessRunner._up_mem` counts them all, whatever dropped them.
UPS_AT = SLOTS_AT + SLOTS * SLOT_BYTES
UP_SLOT_BYTES = protocol.CHUNK_BYTES + 4096  # a chunk and its span's head (a head past 4 KiB: no slot)
UP_SLOTS = 4  # how far the reader reads ahead of the worker into slots (then it waits for one, `UP_WAIT` at most)
UP_WAIT = 1.0
# A reader waiting for a slot is woken when a span it handed out is dropped (a weakref callback on the span: the
# span, and with it the slot, is usually the last thing the slice that ran it drops); it looks again every UP_POLL s
# only for a view made of a span that outlives it (the slot is free once that view goes too, which nothing signals),
# or a span the cyclic collector frees (it runs callbacks first). Until round 35 it looked every 5 ms and nothing
# woke it: on four slots and a ~0.4 ms copy a chunk, the reader could idle most of a chunk's time. The poll stays at
# 5 ms (slot35 had 50): where no callback comes, a wait is no longer than it was.
UP_POLL = 0.005
SHARED_BYTES = UPS_AT + UP_SLOTS * UP_SLOT_BYTES


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is told at birth (JSON through the zygote; nothing of it may be secret: the zygote's memory keeps
    what it was sent, and every worker it forks later inherits that memory)."""

    session_id: str  # the daemon's public tag of the session (tokens.public_session_id), never the bearer id
    number: int
    device: dict[str, Any]  # index, uuid, model, memory_bytes, fake
    quota: int
    max_handles: int
    max_op_flops: int  # 0: the device kind's default (cost.py)
    memory_limit: int  # RLIMIT_DATA of the worker (0: none)
    cpu_threads: int
    user: str  # drop to this user when started as root ("" keeps the daemon's)
    seccomp: bool
    lease_id: str = ""  # the lease and host of the session's token (collectives check peers against them)
    host_id: str = ""
    network: bool = False  # keep TCP sockets (torch.distributed collectives between daemons: --worker-network)
    peer_host: str = "127.0.0.1"  # where this daemon's collective stores and gloo listen for peers
    collectives: str = "secure"  # their transport (--collectives): "secure" (server/seclink.py) or "gloo"
    token_keys: tuple[str, ...] = ()  # PEM public keys: collectives verify the tokens of a job's other ranks
    speed: tuple[float, float, float] = (0.0, 0.0, 0.0)  # fake GPUs' speed model (tflops, gbps, link_gbps)
    gpu_margin: int = -1  # real GPUs: bytes the CUDA allocator may hold beyond the quota (-1: `gpu_margin`)
    max_graph_bytes: int = 256 * 1024**2  # host memory of the session's graphs (sessions.MAX_GRAPH_BYTES)
    uid: int = -1  # a uid (and gid) of the worker's own instead of `user`'s (--worker-uids; -1: none)
    groups: tuple[int, ...] = ()  # supplementary groups kept when it drops its user (the GPU device files' group)
    landlock: bool = True  # a Landlock ruleset (server/landlock.py: --landlock)
    # --collective-ports (LOW, HIGH): where its collective groups listen and the peers' ports they connect to; under
    # Landlock ABI 4+ the only TCP ports a worker granted network may bind or connect to (and 53: name lookups)
    collective_ports: tuple[int, int] = COLLECTIVE_PORTS
    # (FIRST, LAST): its session's block of those ports (server/portshare.py, round 43), where its groups listen and
    # the only ports it may bind under Landlock ABI 4+; (0, 0): the whole range (no share)
    collective_share: tuple[int, int] = (0, 0)
    # the "conv_layout" feature (gpupool/protocol.py): the session's client asked for it and the daemon names it, so
    # its convolutions' outputs are laid out as cuDNN's (server/guards.py `_convolution`), not contiguous
    conv_layout: bool = False


# ---- the worker's CUDA memory cap ----
#
# The daemon admits a session's tensors against its quota (the lease's share of the device), but on a real GPU
# what a kernel allocates for itself never reaches that accounting: composite ops' temporaries (mvlgamma's
# per-element arange, cdist's and linalg's workspaces, sorts' buffers) and the caching allocator's rounding. So
# each session's worker (its own process) caps its CUDA caching allocator at the quota plus a margin
# (torch.cuda.set_per_process_memory_fraction): past it an allocation fails as that tenant's out-of-memory
# (RESOURCE_EXHAUSTED to its client), and the device's other sessions and the daemon never see it.
GPU_MARGIN_FLOOR = 256 * 1024 * 1024


def gpu_margin(quota: int) -> int:
    """The default margin over a session's quota (no --worker-gpu-margin): an eighth of the quota plus 256 MiB,
    room for the caching allocator's block rounding and an honest step's cuBLAS workspaces and temporaries."""
    return max(0, quota) // 8 + GPU_MARGIN_FLOOR


def gpu_memory_fraction(quota: int, capacity: int, margin: int) -> float | None:
    """The fraction of the device's memory (`capacity` bytes) the session's CUDA caching allocator may hold:
    (quota + margin) / capacity; None for no cap (a whole-device quota, a margin that reaches the capacity, an
    unknown capacity or quota)."""
    if capacity <= 0 or quota <= 0:
        return None
    fraction = (quota + max(0, margin)) / capacity
    return fraction if fraction < 1.0 else None


def cap_gpu_memory(
    device: Device, quota: int, margin: int, apply: Callable[[float, Any], None] | None = None
) -> float | None:
    """Cap this process's CUDA caching allocator on `device` (`gpu_memory_fraction`); returns the fraction set,
    or None where nothing was done: fake GPUs and the CPU are left untouched (torch.cuda is never called).
    `apply`: what sets it (torch.cuda.set_per_process_memory_fraction)."""
    if device.fake or device.torch_device.type != "cuda":
        return None
    fraction = gpu_memory_fraction(quota, device.capacity, margin)
    if fraction is None:
        return None
    if apply is None:
        import torch

        apply = torch.cuda.set_per_process_memory_fraction
    apply(fraction, device.torch_device)
    return fraction


class WorkerDied(Exception):
    """The session's worker is gone (crashed, killed, or sent something no honest worker sends)."""


class Runner(Protocol):
    pid: int

    def run(self, req: SliceRequest, commands: int, parts: Sequence[memoryview] = ()) -> SliceResult: ...
    def flush(self, req: SliceRequest, timeout: float) -> SliceResult: ...
    def alive(self, timeout: float = 1.0) -> bool: ...
    def idle(self) -> bool: ...
    def progress(self) -> int: ...
    def contend(self, contended: bool) -> None: ...
    def reply_bound(self, nbytes: int) -> None: ...
    def upload_span(self, size: int) -> memoryview | None: ...
    def holds(self, span: memoryview) -> bool: ...
    def close(self) -> None: ...


def _device(spec: WorkerSpec, ordinal: int = -1) -> Device:
    from gpupool.wire import device_info

    from .devices import rebuild

    d = spec.device
    return rebuild(device_info(d["index"], d["uuid"], d["model"], d["memory_bytes"], d["fake"]), ordinal)


# A GPU's UUID as CUDA takes it in CUDA_VISIBLE_DEVICES (not the daemon's stand-in "GPU-cuda<index>" for a GPU whose
# properties named none)
_CUDA_UUID = re.compile(r"(GPU|MIG)-[0-9a-fA-F]{8}-[0-9a-fA-F/-]{20,}")


def visible_device(device: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """What a session worker of the real GPU `device` (WorkerSpec.device) sets CUDA_VISIBLE_DEVICES to before
    anything in it starts CUDA, so that its own GPU is the only one CUDA shows it (as cuda:0): the GPU's UUID, or
    where the daemon knows none its index, through the CUDA_VISIBLE_DEVICES the daemon itself ran under (`env`:
    the daemon's torch numbered what that list showed it). Until round 40 a worker saw every GPU of the host."""
    uuid = str(device.get("uuid", ""))
    if _CUDA_UUID.fullmatch(uuid):
        return uuid
    index = int(device["index"])
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return str(index)
    entries = [e.strip() for e in listed.split(",")]
    if not 0 <= index < len(entries) or not entries[index]:
        raise RuntimeError(f"GPU {index} is not in the daemon's CUDA_VISIBLE_DEVICES ({listed!r}): no GPU to show")
    return entries[index]


def _see_own_gpu(spec: WorkerSpec) -> int:
    """On a real GPU, before anything starts CUDA here: show CUDA this worker's GPU alone (`visible_device`), and
    leave the zygote's PYTORCH_NVML_BASED_CUDA_CHECK (its fork guard: this process forks nothing), with which
    torch.cuda.is_available() asks NVML, which opens the device file of every GPU of the host, whatever
    CUDA_VISIBLE_DEVICES says, and keeps them open past the sandbox. Returns CUDA's ordinal of the GPU here: 0 (-1
    on a fake GPU, which is left exactly as it was)."""
    if spec.device.get("fake", True):
        return -1
    os.environ["CUDA_VISIBLE_DEVICES"] = visible_device(spec.device, os.environ)
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    return 0


class _SessionState:
    """The session's tensors and executor, shared by both runners."""

    def __init__(self, spec: WorkerSpec, ordinal: int = -1) -> None:
        from . import graph
        from .executor import CommandExecutor
        from .sessions import DeviceMemory, WorkerSession

        self.device = _device(spec, ordinal)
        self.conv_layout = spec.conv_layout
        self.gpu_margin = spec.gpu_margin
        self.caps_gpu = False  # its process's CUDA allocator is capped by its quota (a real GPU's worker process)
        from gpupool.metas import conv_layout_for, own_conv_layout

        self._conv_layout = conv_layout_for
        self._own_conv_layout = own_conv_layout
        self.session = WorkerSession(
            spec.session_id,
            spec.number,
            self.device,
            DeviceMemory(self.device),
            spec.quota,
            max_handles=spec.max_handles,
            max_graph_bytes=spec.max_graph_bytes,
            max_op_flops=spec.max_op_flops,
            lease_id=spec.lease_id,
            host_id=spec.host_id,
        )
        # the session's own: a CUDA device's keeps the session's slices still on the GPU (devices.SliceTimer)
        self.timed = self.device.slice_timer()
        self.ledger = slices.SliceLedger()
        self.executor = CommandExecutor(self.ledger)
        self.executor.piece_bytes = bulk.PIECE_BYTES  # big downloads in pieces through the shared buffer
        self.executor.graphs.piece_seconds = graph.DEFINE_PIECE_SECONDS  # long graph definitions in pieces too
        if spec.token_keys:
            from gpupool.tokens import Verifier

            from .speedmodel import SpeedModel

            verifier = Verifier.from_pems(list(spec.token_keys))
            self.executor.collectives.configure(
                verifier.verify, spec.peer_host, spec.collectives, _ports(spec.collective_ports), _own(spec)
            )
            speed = SpeedModel(*spec.speed)
            if self.device.fake and (speed.active or speed.link_gbps > 0):
                self.executor.speed = self.executor.collectives.speed = speed

    def run(self, req: SliceRequest, progress: slices.Progress | None = None) -> SliceResult:
        with self.session.lock, self._conv_layout(self.conv_layout):
            if req.quota >= 0:
                self.set_quota(req.quota)
            return slices.run_commands(self.session, self.executor.execute, self.ledger, req, self.timed, progress)

    def own_thread(self) -> None:
        """This thread runs this session's slices only, from now on (a session's worker process, `worker_main`):
        its conv layout is set once here, for `run_owned`."""
        self._own_conv_layout(self.conv_layout)

    def run_owned(self, req: SliceRequest, progress: slices.Progress | None = None) -> SliceResult:
        """`run` in the thread `own_thread` gave this session: no conv layout context manager a slice (a generator
        made, entered and closed: ~12k instructions a slice under callgrind, round 46)."""
        with self.session.lock:
            if req.quota >= 0:
                self.set_quota(req.quota)
            return slices.run_commands(self.session, self.executor.execute, self.ledger, req, self.timed, progress)

    def run_owned_into(self, req: SliceRequest, progress: slices.Progress | None, buf: memoryview) -> int | SliceResult:
        """`run_owned`, its result written into `buf` (`slices.run_slice_into`): the size written, or the result
        where nothing was (the caller encodes it)."""
        with self.session.lock:
            if req.quota >= 0:
                self.set_quota(req.quota)
            return slices.run_slice_into(
                self.session, self.executor.execute, self.ledger, req, self.timed, progress, buf
            )

    def set_quota(self, quota: int) -> None:
        """The session's quota from this slice on (a refreshed token's: `SliceRequest.quota`); on a real GPU the
        CUDA allocator's cap follows it (`cap_gpu_memory`, as at the worker's start). Allocations past it are
        refused from here on (`WorkerSession.admit` and the inline checks read `session.quota`); what the session
        holds stays."""
        self.session.quota = quota
        if self.caps_gpu:  # (a worker process's own allocator: never the daemon's, under --isolation thread)
            cap_gpu_memory(self.device, quota, self.gpu_margin if self.gpu_margin >= 0 else gpu_margin(quota))

    def contended(self, told: Callable[[], bool]) -> None:
        """Where the executor and the slice timer read whether another session of the device waits to run."""
        self.executor.collectives.contended = told
        if hasattr(self.timed, "contended"):
            self.timed.contended = told


class InlineRunner:
    """`--isolation thread`: the session's state in the daemon process, run by the device's thread."""

    pid = 0

    def __init__(self, spec: WorkerSpec) -> None:
        self._state = _SessionState(spec)
        self._contended = True
        self._state.contended(lambda: self._contended)

    def contend(self, contended: bool) -> None:
        self._contended = contended

    def reply_bound(self, nbytes: int) -> None:
        pass  # (its results are objects of this process: no bound to read them by)

    def run(self, req: SliceRequest, commands: int, parts: Sequence[memoryview] = ()) -> SliceResult:
        import torch

        if parts:
            req.payload = b"".join(parts)

        with torch.no_grad():  # thread-local: the daemon never records autograd history
            res = self._state.run(req)
        # gRPC sends bytes: join download frames that are still views of a tensor (protocol.Frame)
        res.replies = [[bytes(f) for f in r] if isinstance(r, list) else r for r in res.replies]
        return res

    def flush(self, req: SliceRequest, timeout: float) -> SliceResult:
        return self.run(req, 0)

    def alive(self, timeout: float = 1.0) -> bool:
        return True

    def idle(self) -> bool:
        return True

    def progress(self) -> int:
        return 0

    def upload_span(self, size: int) -> memoryview | None:
        return None  # no shared memory: an upload's span is read into the front's own

    def holds(self, span: memoryview) -> bool:
        return False

    def close(self) -> None:
        self._state.session.release_all()
        self._state.executor.forget(self._state.session)


def _waker(free: threading.Condition) -> Callable[[object], None]:
    """The callback of an upload span's weakref: wakes a reader waiting for a slot (`ProcessRunner.upload_span`).
    It runs in whichever thread drops the span's last reference (the device thread after the slice that ran it,
    the reader on an error, the collector), after the span's view of the slot was released; `free` is re-entrant
    (an RLock), so a drop inside `upload_span` itself does not deadlock. It holds the condition only, not the
    runner: no cycle keeps a closed runner alive."""

    def wake(_ref: object) -> None:
        with free:
            free.notify_all()

    return wake


class ProcessRunner:
    """The daemon's end of one worker process: a socket for slices and a shared word for progress."""

    def __init__(self, pid: int, sock: socket.socket, progress: mmap.mmap, max_reply: int, spin: float = 0.0) -> None:
        self.pid = pid
        self._sock = sock
        # Seconds `run` reads the result word without blocking before it sleeps on it (--worker-spin-us)
        self.spin = spin
        self._progress = progress
        self._data = memoryview(progress)[DATA_AT:SLOTS_AT]
        self._slots = [memoryview(progress)[SLOTS_AT + k * SLOT_BYTES :][:SLOT_BYTES] for k in range(SLOTS)]
        self._slot_users = [0] * SLOTS  # side chunks of each slot not yet sent (released by the stream's writer)
        self._slot_lock = threading.Lock()
        # Each upload slot's memory as an object of its own, never handed out: every view of a slot (the span
        # `upload_span` hands out, and any view made of that one: a slice, a cast, memoryview() of it) shares one
        # managed buffer, which holds a reference to this object while any of those views lives. So its reference
        # count says whether the slot is free: a view of a span kept after the span was dropped (round 29 counted
        # the span's own references only, so its slot could be reused under that view) holds the slot too.
        self._up_mem = [
            (ctypes.c_char * UP_SLOT_BYTES).from_buffer(progress, UPS_AT + k * UP_SLOT_BYTES) for k in range(UP_SLOTS)
        ]
        self._up_spans: list[weakref.ref[memoryview] | None] = [None] * UP_SLOTS  # the span handed out of each slot
        self._up_free = threading.Condition()
        self._up_wake = _waker(self._up_free)  # a span's weakref callback: its slot may be free now
        self._max_reply = max_reply
        self._closed = False
        # idle()'s two probes, made once: a poller of the socket and the worker's /proc stat file, held open (a
        # pread of it is half the cost of open, read, close; it names this process even once its pid is reused)
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        # `run`'s wait for a result (`_recv_word`): its own, so that it never shares a poll object with `idle`'s
        self._result_poller = select.poll()
        self._result_poller.register(sock, select.POLLIN)
        self._stat_fd = -1

    def reply_bound(self, nbytes: int) -> None:
        """The most bytes a result may hold beyond its reply room from now on (the session's quota of downloads and
        framing: a refreshed token's larger quota, `Daemon._take_terms`; never less: what the session holds past a
        smaller one stays its own to download)."""
        self._max_reply = max(self._max_reply, nbytes)

    def contend(self, contended: bool) -> None:
        try:
            self._progress[CONTENDED_AT] = contended
        except ValueError:  # closed meanwhile (the session ended): nobody reads it
            pass

    def upload_span(self, size: int) -> memoryview | None:
        """A span of `size` bytes in a free upload slot, for the session's reader to read an upload into (the
        slot is the session's own memory, shared with its own worker only); None when `size` does not fit a
        slot, the runner is closed, or no slot came free within UP_WAIT (the caller then reads into its own
        memory, as before: a slot that no release wakes is never waited for long)."""
        if size > UP_SLOT_BYTES:
            return None
        deadline = time.monotonic() + UP_WAIT
        with self._up_free:
            while not self._closed:
                for k in range(UP_SLOTS):
                    # no view of the slot alive: `_up_mem`'s reference and getrefcount's argument only
                    if sys.getrefcount(self._up_mem[k]) <= 2:
                        span = memoryview(self._up_mem[k]).cast("B")[:size]
                        self._up_spans[k] = weakref.ref(span, self._up_wake)
                        return span
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._up_free.wait(min(left, UP_POLL))  # woken when a span is dropped (`_waker`)
        return None

    def holds(self, span: memoryview) -> bool:
        """Whether `span` is one of this runner's upload slot spans (`upload_span`)."""
        return self._up_slot(span) >= 0

    def _up_slot(self, span: memoryview) -> int:
        """The upload slot whose span `span` is (the very view `upload_span` handed out), or -1 (a command's bytes
        at once: no slot's span is a bytes object)."""
        if span.__class__ is not memoryview:
            return -1
        for k, held in enumerate(self._up_spans):
            if held is not None and held() is span:
                return k
        return -1

    def run(self, req: SliceRequest, commands: int, parts: Sequence[memoryview] = ()) -> SliceResult:
        if self._closed:
            raise WorkerDied("the session's worker was stopped")
        users = self._slot_users
        with self._slot_lock:  # the first download slot no side chunk holds (-1: none)
            req.slot = users.index(0) if 0 in users else -1
        try:
            size = req.size  # (the daemon's `_slice` counted them, or left them to this)
            joined = None
            if size == SMALL:  # under BIG_PART in all: joined, as below, and counted by that
                joined = parts[0] if len(parts) == 1 else b"".join(parts)
                size = len(joined)
            elif size < 0:
                size = sum(map(len, parts))
            up = self._up_slot(parts[0]) if len(parts) == 1 else -1
            if up >= 0:  # an upload read straight into its slot (`upload_span`): the worker runs it from there
                self._sock.sendall(slices.shared_request(req, size, up))
            elif parts and size <= DATA_BYTES:
                # One copy into the shared buffer. A frame's spans are tens of small pieces: joined in C, then
                # copied; a slice of big uploads is a few 4 MiB spans: each copied straight to its place (a join
                # would copy 16 MiB twice, the first time into fresh memory that faults page by page)
                if joined is not None:
                    self._data[:size] = joined
                elif len(parts) == 1:
                    self._data[:size] = parts[0]
                elif size >= len(parts) * BIG_PART:
                    pos = 0
                    for part in parts:
                        self._data[pos : pos + len(part)] = part
                        pos += len(part)
                elif size >= BIG_PART and max(map(len, parts)) >= BIG_PART:  # a batch's upload among small commands:
                    # copied once (no span of a slice under BIG_PART in all is that big: the usual slice skips the pass)
                    _copy_parts(self._data, parts)
                else:
                    self._data[:size] = b"".join(parts)
                self._sock.sendall(slices.shared_request(req, size))
            else:
                slices.send_parts(self._sock, slices.encode_request(req, parts))
            # no spin or poll under flush's timeout: Python waits for the socket first (a poll) itself
            if self._sock.gettimeout() is None:
                (length,) = _recv_word(self._sock, self.spin, self._result_poller)
            else:
                (length,) = _recv_word(self._sock)
            while length == slices.PONG:  # the late answer to a ping that timed out
                (length,) = _recv_word(self._sock)
            if length & slices.SHARED:
                length &= ~slices.SHARED
                if length > DATA_BYTES:
                    raise WorkerDied(f"the session's worker claims a {length} byte result in its shared buffer")
                return self._hold_slot(req.slot, slices.decode_result(self._data[:length], commands, self._slot(req)))
            if length > self._max_reply + max(0, req.reply_room):
                raise WorkerDied(f"the session's worker sent a {length} byte result (more than it may)")
            body = _recv_exact(self._sock, length)
            return self._hold_slot(req.slot, slices.decode_result(body, commands, self._slot(req)))
        except (OSError, EOFError) as exc:
            raise WorkerDied(f"the session's worker stopped answering ({type(exc).__name__})") from None
        except (ValueError, struct.error) as exc:
            raise WorkerDied(f"the session's worker sent a malformed result: {exc}") from None

    def flush(self, req: SliceRequest, timeout: float) -> SliceResult:
        """Run `req`, a slice of no commands (the daemon's flush of a CUDA session's GPU time: daemon.py `_flush`),
        waiting at most `timeout` seconds for its result: WorkerDied past that (the daemon then ends the worker)."""
        self._sock.settimeout(timeout)
        try:
            return self.run(req, 0)
        finally:
            if not self._closed:
                self._sock.settimeout(None)

    def _slot(self, req: SliceRequest) -> memoryview | None:
        return self._slots[req.slot] if req.slot >= 0 else None

    def _hold_slot(self, k: int, res: SliceResult) -> SliceResult:
        """Count the result's side chunks as users of slot `k` (it is given to no slice until they are sent)."""
        if not res.replies:  # (most slices of an eager step)
            return res
        chunks: list[slices.SideChunk] = [f for f in res.replies if isinstance(f, slices.SideChunk)]
        if chunks:
            with self._slot_lock:
                self._slot_users[k] += len(chunks)
            for chunk in chunks:
                chunk.release = self._releaser(k)
        return res

    def _releaser(self, k: int) -> Callable[[], None]:
        done = [False]

        def release() -> None:
            with self._slot_lock:
                if not done[0]:
                    done[0] = True
                    self._slot_users[k] -= 1

        return release

    def alive(self, timeout: float = 1.0) -> bool:
        """Whether the (idle) worker answers a ping: a worker that died, or has a fatal signal pending, never
        does. Call only between slices, under the session's lock. A pong that comes after `timeout` is skipped
        by the next `run`."""
        if self._closed:
            return False
        try:
            self._sock.sendall(slices.PING_REQUEST)
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            if not poller.poll(int(timeout * 1000)):
                return False
            (word,) = struct.unpack("<I", _recv_exact(self._sock, 4))
        except (OSError, EOFError):
            return False
        return bool(word == slices.PONG)

    def idle(self) -> bool:
        """Whether the worker is, without waking it, provably alive and waiting for its next slice: its socket
        holds nothing (a dead worker's reads as closed), and the kernel shows its main thread asleep with no
        signal pending and no exit or fatal signal under way (`_quiet`). False is no verdict: ask `alive`.
        Call only between slices, under the session's lock."""
        if self._closed:
            return False
        try:
            if self._poller.poll(0):
                return False  # end of stream (a dead worker), or a late pong
            if self._stat_fd < 0:
                self._stat_fd = os.open(f"/proc/{self.pid}/stat", os.O_RDONLY)
            return _quiet_stat(self._stat_fd)
        except (OSError, ValueError):
            return False

    def progress(self) -> int:
        return int(struct.unpack_from("<i", self._progress, 0)[0])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.sendall(slices.EXIT_REQUEST)
        except OSError:
            pass
        self._sock.close()
        with self._up_free:
            self._up_free.notify_all()  # a reader waiting for an upload slot: none will come
            self._up_mem = []  # the upload slots (under the lock `upload_span` reads them in): a span still held
            # keeps its slot's object, and so the mapping, alive until it goes
        self._data.release()
        # The runner's own views of the mapping go now, not with the runner: a closed runner lives on until the
        # collector finds it (cycles through its threads' callbacks), and each kept its session's 64 MiB mapping
        # (round 37: 41-56 closed sessions' mappings after 100 attach/detach, which a 6 GiB address-space cap met)
        for view in self._slots:
            try:
                view.release()  # a side chunk not yet sent holds its own view of the slot: its bytes stay mapped
            except BufferError:  # a buffer taken of this very view is in use: it goes with the runner, as before
                pass
        try:
            self._progress.close()
        except BufferError:  # side chunks not yet sent still view a slot: the mapping goes with the last of them
            pass
        if self._stat_fd >= 0:
            os.close(self._stat_fd)
            self._stat_fd = -1


# Task flags (/proc/PID/stat field 9) of a task on its way out: exiting, dumping core, killed by a signal.
_PF_EXITING, _PF_DUMPCORE, _PF_SIGNALED = 0x4, 0x200, 0x400
_PF_DYING = _PF_EXITING | _PF_DUMPCORE | _PF_SIGNALED


def _quiet(pid: int) -> bool:
    """The kernel's view of an idle, healthy worker (/proc/PID/stat, one read of a few microseconds): its main
    thread sleeps (state S: waiting on its socket, `wait_readable`), no signal is pending for it, and it is not
    exiting, dumping core or dying of a signal (the flags set between taking a fatal signal and becoming a zombie).
    A fatal signal sent before the call is seen one way or another: SIGKILL and the like sit in every thread's
    own pending set until taken, a core-dumping one wakes the main thread out of S when sent, and taking
    either sets the dying flags before the task can sleep again."""
    fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    try:
        return _quiet_stat(fd)
    finally:
        os.close(fd)


def _quiet_stat(fd: int) -> bool:
    """`_quiet` of the process whose /proc/PID/stat is open as `fd` (read afresh from its start: the kernel
    writes the file anew for each read at offset 0); OSError once that process is reaped."""
    stat = os.pread(fd, 4096, 0)
    fields = stat[stat.rindex(b")") + 2 :].split(b" ", 29)  # the first 29 fields and the rest unsplit
    # fields[0] is field 3 of proc(5) (state), [6] field 9 (flags), [28] field 31 (pending signals)
    return fields[0] == b"S" and not int(fields[6]) & _PF_DYING and fields[28] == b"0"


_WORD = struct.Struct("<I")


def spin_word(sock: socket.socket, spin: float) -> bytes | None:
    """Up to `spin` seconds of non-blocking reads of the socket's next (up to) 4 bytes, before the caller blocks
    on it: what came (b"": the peer closed), or None when nothing came in time. A result that comes within the
    spin costs the waiting thread no sleep and no wake-up (a blocked thread's wake-up is 5-50 us on an idle host).
    Only for a socket in blocking mode (with a timeout set, Python waits for readability first)."""
    end = time.perf_counter() + spin
    while True:
        try:
            return sock.recv(4, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if time.perf_counter() >= end:
                return None


def spin_default(cpus: int | None = None, load: float | None = None) -> float:
    """The daemon's spin before it blocks on a worker's result, in seconds, when the operator left
    --worker-spin-us to the host: SPIN_AUTO where the host has cores to spare (4 or more, the 1-minute load
    under half of them), else 0 (a spinning thread there takes the core the worker needs)."""
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    load = os.getloadavg()[0] if load is None else load
    return SPIN_AUTO if cpus >= 4 and load < cpus / 2 else 0.0


SPIN_AUTO = 20e-6


def wait_readable(poller: select.poll | None) -> None:
    """Sleep until the socket `poller` watches (for POLLIN, in blocking mode) has bytes to read, or its peer closed
    or broke it; nothing without a poller. Waiting in poll, not in the read itself, is what keeps the two ends of a
    unix stream socketpair from waking each other for nothing: a thread asleep in a blocking `recv` is woken by its
    own socket's "room to write" too (Linux's unix_write_space wakes every sleeper on the socket, whatever it waits
    for), so that each time the peer reads what this end sent before (the worker its request, the daemon the
    worker's result word), the sleeping reader here woke, found nothing and slept again: ~0.7 of a wasted process
    wake-up a slice in the worker (bench/item_legs.py --wakeups, BENCHMARKS.md round 40). A poll sleeper is woken
    only for the events it asked for. The read that follows finds the bytes there (or the end of the stream)."""
    if poller is not None:
        poller.poll()


def _recv_word(sock: socket.socket, spin: float = 0.0, poller: select.poll | None = None) -> tuple[int]:
    """One little-endian u32 (a result's length word): one recv, as the four bytes come together (after up to
    `spin` seconds of non-blocking reads: `spin_word`; then, with `poller`, a wait for the socket: `wait_readable`)."""
    got = spin_word(sock, spin) if spin > 0 else None
    if not got:
        if got is None:
            wait_readable(poller)
        got = sock.recv(4)
    if len(got) == 4:
        return _WORD.unpack(got)  # type: ignore[return-value]
    if not got:
        raise EOFError("end of stream")
    return _WORD.unpack(got + _recv_exact(sock, 4 - len(got)))  # type: ignore[return-value]


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("end of stream")
        got += k
    return buf


# ---- inside the worker process ----


def _copy_parts(data: memoryview, parts: Sequence[memoryview]) -> None:
    """`parts` one after another into `data`: each run of small ones joined in C then copied, each big one (at least
    BIG_PART bytes: an upload's) copied straight to its place (joining it would copy it twice)."""
    pos = 0
    small: list[memoryview] = []
    for part in parts:
        if len(part) < BIG_PART:
            small.append(part)
            continue
        if small:
            joined = b"".join(small)
            data[pos : pos + len(joined)] = joined
            pos += len(joined)
            small = []
        data[pos : pos + len(part)] = part
        pos += len(part)
    if small:
        joined = b"".join(small)
        data[pos : pos + len(joined)] = joined


def _recv_request(sock: socket.socket, head: bytearray, poller: select.poll | None = None) -> bytearray | memoryview:
    """The next request's body (after its length word). A header-only request (a slice whose payload is in the
    shared buffer, a ping, the exit) comes in one recv into `head`, reused (a view of it is returned): never more
    than one request's bytes are read, so a request that follows (after a late ping) stays in the socket. With
    `poller` (of `sock`, for POLLIN) the wait for the request is a poll (`wait_readable`: no wake-up each time the
    daemon reads a result)."""
    wait_readable(poller)
    got = sock.recv_into(head, len(head))
    while got < 4:
        if not got:
            raise EOFError("end of stream")
        k = sock.recv_into(memoryview(head)[got:], len(head) - got)
        if not k:
            raise EOFError("end of stream")
        got += k
    (length,) = _WORD.unpack_from(head, 0)
    if 4 + length > len(head):  # a payload in the socket (bigger than the shared buffer, or an old daemon's)
        body = bytearray(length)
        body[: got - 4] = memoryview(head)[4:got]
        view = memoryview(body)
        while got - 4 < length:
            k = sock.recv_into(view[got - 4 :], length - (got - 4))
            if not k:
                raise EOFError("end of stream")
            got += k
        return body
    while got < 4 + length:
        k = sock.recv_into(memoryview(head)[got:], 4 + length - got)
        if not k:
            raise EOFError("end of stream")
        got += k
    return memoryview(head)[4 : 4 + length]


def _vm_data() -> int:
    """Bytes of the process's data segment and private writable mappings now (what RLIMIT_DATA counts)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _ports(pair: Any) -> tuple[int, int]:
    """--collective-ports from a spec (a JSON list through the zygote)."""
    low, high = pair
    return int(low), int(high)


def _own(spec: WorkerSpec) -> tuple[int, int] | None:
    """The session's block of --collective-ports (`collective_share`), or None (the whole range)."""
    own = _ports(spec.collective_share)
    return own if own != (0, 0) else None


def worker_main(sock: socket.socket, progress_fd: int, spec: WorkerSpec) -> int:
    """The worker's life: confine, then serve slices until the daemon closes the socket. Returns an exit code."""
    from . import native_runner, sandbox, workerprofile

    ordinal = _see_own_gpu(spec)  # before anything starts CUDA (the zygote never does)
    # first, while root and single-threaded (CUDA and torch start threads; a mount namespace is a thread's)
    hidden = sandbox.private_proc() if os.geteuid() == 0 and (spec.user or spec.uid > 0) else "not dropping root"
    sys.dont_write_bytecode = True  # no .pyc writes from a process that may not create files
    native_runner.forbid_build()  # the zygote loaded it before the fork, or it stays off (never exec a compiler here)
    import torch

    torch.set_grad_enabled(False)  # this process never records autograd history
    if spec.cpu_threads > 0:
        torch.set_num_threads(spec.cpu_threads)
    state = _SessionState(spec, ordinal)  # on a real GPU this creates the worker's own CUDA context
    state.executor.exclusive_rng = True  # this process serves one session: its generator holds the session's stream
    if not state.device.fake:
        margin = spec.gpu_margin if spec.gpu_margin >= 0 else gpu_margin(spec.quota)
        capped = cap_gpu_memory(state.device, spec.quota, margin)
        state.caps_gpu = True  # (its quota's changes move the cap: `set_quota`)
        log.debug("session %d worker %d: CUDA allocator cap %s of the device", spec.number, os.getpid(), capped)
        _warm_cuda(state.device)
    audit = None
    if os.environ.get("GPUPOOL_OP_AUDIT"):  # an audit's counts (server/opaudit.py): its file opened before the sandbox
        from . import opaudit

        audit = opaudit.from_env()
    workerprofile.from_env()  # a bench's Python profile of this worker (server/workerprofile.py), where switched on
    limit = spec.memory_limit and _vm_data() + spec.memory_limit
    # a fake GPU's tensors are host memory that RLIMIT_DATA caps: no shared anonymous memory past it (a real GPU's
    # worker keeps it: CUDA's pinned host allocations may be such mappings)
    report = sandbox.apply(
        limit,
        user=spec.user,
        seccomp=spec.seccomp,
        network=spec.network,
        shared_anonymous=not state.device.fake,
        uid=spec.uid,
        groups=tuple(spec.groups),
        landlock=spec.landlock,
        gpu=not state.device.fake and state.device.torch_device.type == "cuda",
        gpu_uuid=state.device.uuid,
        gpu_pci=getattr(state.device, "pci", ""),
        ports=_ports(spec.collective_ports),
        gloo=spec.collectives == "gloo",
        block=_own(spec),
    )
    # NCCL makes shared-memory files in /dev/shm and talks over unix sockets, which Landlock and seccomp refuse: a
    # confined worker's `--collectives gloo` groups are gloo's from the start (server/collectives.py `use_nccl`)
    state.executor.collectives.confined = spec.landlock or spec.seccomp
    (report.missing if hidden else report.applied).append(f"private /proc: {hidden}" if hidden else "private /proc")
    log.debug("session %d worker %d sandbox: %s; missing: %s", spec.number, os.getpid(), report.applied, report.missing)
    progress = mmap.mmap(progress_fd, SHARED_BYTES)
    os.close(progress_fd)
    settle_gc()
    data = memoryview(progress)[DATA_AT:SLOTS_AT]
    state.contended(lambda: progress[CONTENDED_AT] != 0)
    slots = [memoryview(progress)[SLOTS_AT + k * SLOT_BYTES :][:SLOT_BYTES] for k in range(SLOTS)]
    ups = [memoryview(progress)[UPS_AT + k * UP_SLOT_BYTES :][:UP_SLOT_BYTES] for k in range(UP_SLOTS)]

    # the index of the command running, for the daemon to read (a C call per command, no Python frame)
    mark = slices.word_mark(progress)
    state.own_thread()  # this thread runs the session's slices, and nothing else
    run = state.run_owned_into

    head = bytearray(4 + slices.REQUEST_HEAD)
    waiting = select.poll()
    waiting.register(sock, select.POLLIN)
    while True:
        try:
            body = _recv_request(sock, head, waiting)
        except (OSError, EOFError):
            return 0  # the daemon closed the session
        if slices.is_ping(body):
            try:
                sock.sendall(struct.pack("<I", slices.PONG))
            except OSError:
                return 0
            continue
        req = slices.decode_request(body, data, ups)
        if req is None:
            return 0
        state.executor.side_slot = slots[req.slot] if 0 <= req.slot < SLOTS else None
        state.executor.side_used = 0
        got = run(req, mark, data)  # the usual result is written straight into the shared buffer (its size)
        state.executor.side_slot = None
        if audit is not None:
            audit.dump()
        try:
            if got.__class__ is int:
                sock.sendall(_WORD.pack(got | slices.SHARED))  # type: ignore[operator]
                continue
            parts = slices.encode_result(got)[1:]  # type: ignore[arg-type]  # without its length word
            size = sum(len(p) for p in parts)
            if size <= DATA_BYTES:
                pos = 0
                for p in parts:
                    data[pos : pos + len(p)] = p
                    pos += len(p)
                sock.sendall(_WORD.pack(size | slices.SHARED))
            else:
                slices.send_parts(sock, [_WORD.pack(size), *parts])
        except OSError:
            return 0


def settle_gc() -> None:
    """After the worker's setup: what exists now (torch's modules and types, the zygote's and the session
    state's objects, ~200k of them) is kept out of the cyclic collector's full collections for the process's
    life (`gc.freeze`). A full collection of them costs ~100 ms of CPU, in the middle of some slice, each time
    the objects the session keeps (learned templates and runs, tensors) have grown by a quarter of the tracked
    objects. Collection stays on: cycles made from now on are collected as before, in every generation."""
    gc.freeze()


def _warm_cuda(device: Device) -> None:
    """Create the CUDA context and load cuBLAS before the sandbox closes (they open device files)."""
    import torch

    x = torch.ones(8, 8, device=device.torch_device)
    (x @ x).sum().item()
    torch.cuda.synchronize(device.torch_device)
