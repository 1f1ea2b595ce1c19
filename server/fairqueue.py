"""Per-device weighted fair queue over sessions, and the one worker thread that drains it.

Each session has a bounded queue of commands and a virtual time that advances by measured execution time
divided by its share; the worker always serves the backlogged session with the smallest virtual time, one
short slice at a time. A session that comes back from idle starts at the current virtual time (it cannot
bank credit), and an idle session's share goes to whoever is busy (work-conserving). A full queue blocks
the session's reader, which stops reading its stream: gRPC flow control then pushes back on the client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Entry:
    """One session's place in a device queue."""

    def __init__(self, owner: Any, share: float) -> None:
        self.owner = owner
        self.share = share
        self.vtime = 0.0
        self.frames: deque[list[Any]] = deque()  # [commands, next index, bytes]
        self.commands = 0
        self.nbytes = 0
        self.running = False
        self.closed = False
        self.blocked = False  # its replies are not being read: run nothing more until they are
        self.contended = False  # while it runs: another session of the device has work queued (`FairQueue.contend`)


# Bytes of commands a parked session (its replies unread: `block`) may have queued before its reader waits: its
# commands cannot run until its client reads, and its full 64 MiB queue of 4 MiB uploads, with the 16 MiB of
# replies it left unread and gRPC's buffers, held ~120-140 MiB of the daemon process a session (round 36,
# bench/host_memory.py --probe queued; 64 sessions ~8.5 GiB outside every limit). Small commands (a checkpoint's
# Gets) still queue up to `max_commands` while it is parked.
PARKED_BYTES = 4 * 1024 * 1024


class HostQueued:
    """Bytes of commands queued beyond `PARKED_BYTES` a session, by all sessions of all devices of the host, held
    within `limit` (0: no limit). Round 37 (quota37): a session whose commands wait behind work that runs - its
    own slow ops, a collective waiting for its peers, other sessions' turns - queued up to its 64 MiB whatever the
    others held: 8 sessions of one tenant behind slow matmuls grew the daemon process by ~1 GiB (bench/host_memory.py
    --probe busy), 64 sessions ~8 GiB, counted against nothing. Each session keeps its first `PARKED_BYTES` (and
    a frame into an empty queue) whatever the others queued; the rest is the host's, first come.

    A reader waiting for room waits on its own queue's condition, and the queue that frees room (another device's,
    maybe) wakes it: `full` notes the waiting queue, `add` of freed bytes moves it to the queues to wake, and the
    freeing queue wakes them (`wake`) once it has let go of its own lock, so that no thread holds two queues' locks
    (round 37 looked again every 20 ms)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.over = 0  # the sessions' bytes past PARKED_BYTES each
        self._lock = threading.Lock()  # a leaf lock: the queues of several devices change `over`
        self._waiting: list[threading.Condition] = []  # queues with a reader waiting for room
        self._wake: list[threading.Condition] = []  # of those, the ones to wake: room was freed since

    def add(self, delta: int) -> None:
        with self._lock:
            self.over += delta
            if delta < 0 and self._waiting:
                self._wake.extend(c for c in self._waiting if c not in self._wake)
                self._waiting.clear()

    def full(self, grown: int, cond: threading.Condition) -> bool:
        """Whether `grown` more bytes past PARKED_BYTES would pass the limit; if so `cond` (held by the caller, who
        waits on it next) is woken once room is freed."""
        with self._lock:
            if grown <= 0 or self.over + grown <= self.limit:
                return False
            if cond not in self._waiting:
                self._waiting.append(cond)
            return True

    def wake(self) -> None:
        """Wake the queues whose readers wait for room that was freed (called holding no queue's lock)."""
        if not self._wake:  # (read unlocked: a thread that frees room calls this after, and sees its own)
            return
        with self._lock:
            wake, self._wake = self._wake, []
        for cond in wake:
            with cond:
                cond.notify_all()


def _excess(nbytes: int) -> int:
    return nbytes - PARKED_BYTES if nbytes > PARKED_BYTES else 0


class FairQueue:
    def __init__(
        self, max_commands: int = 8192, max_bytes: int = 64 * 1024 * 1024, host: HostQueued | None = None
    ) -> None:
        self._cond = threading.Condition()
        self._entries: list[Entry] = []
        self._vnow = 0.0
        self._stopped = False
        self._claimed = False  # a slice runs outside the device's thread (`put_and_claim`): take() waits
        self._idle_waiters = 0  # threads in wait_idle
        self.max_commands = max_commands
        self.max_bytes = max_bytes
        self.host = host if host is not None and host.limit > 0 else None  # shared by the host's device queues
        # Told, under the queue's lock, whether another session waits to run while `entry` runs: set when its
        # slice is handed out, and again when another session's work arrives meanwhile (a collective waiting for
        # its peers keeps the device while nobody else wants it: server/collectives.py). None: nobody listens.
        self.contend: Callable[[Entry, bool], None] | None = None

    def add(self, owner: Any, share: float) -> Entry:
        entry = Entry(owner, share)
        with self._cond:
            entry.vtime = self._vnow
            self._entries.append(entry)
        return entry

    def reweigh(self, entry: Entry, share: float) -> None:
        """A session's share from its next charge on (a refreshed token's: daemon.py `Daemon._take_terms`)."""
        with self._cond:
            entry.share = share

    def remove(self, entry: Entry) -> None:
        """Forget a session: drop what it queued and wake its blocked reader."""
        with self._cond:
            entry.closed = True
            entry.frames.clear()
            self._bytes(entry, -entry.nbytes)
            entry.commands = 0
            if entry in self._entries:
                self._entries.remove(entry)
            if entry.running and not entry.contended:  # a slice told nobody waits (a collective waiting for its
                # peers keeps the device then) would not hear of others any more: it ends, the session is closing
                self._tell(entry, True)
            self._cond.notify_all()
        self._wake_host()

    def put(self, entry: Entry, commands: list[Any], nbytes: int) -> bool:
        """Queue a frame's commands, blocking while the session's queue is full; False once it is closed."""
        with self._cond:
            while not entry.closed and not self._stopped and entry.commands:
                if entry.commands + len(commands) > self.max_commands or entry.nbytes + nbytes > (
                    PARKED_BYTES if entry.blocked else self.max_bytes
                ):
                    self._cond.wait()
                elif self._host_full(entry, nbytes):
                    self._cond.wait()  # woken by the queue that frees room (`HostQueued.wake`)
                else:
                    break
            if entry.closed or self._stopped:
                return False
            if not entry.commands and not entry.running:
                entry.vtime = max(entry.vtime, self._vnow)  # back from idle: no banked credit
            entry.frames.append([commands, 0, nbytes])
            entry.commands += len(commands)
            self._bytes(entry, nbytes)
            self._contended(entry)
            self._cond.notify_all()
            return True

    def take(self, max_commands: int) -> tuple[Entry, list[Any]] | None:
        """Block until some session has work; pop up to `max_commands` of the one with least virtual time."""
        with self._cond:
            while True:
                if self._stopped:
                    return None
                ready = [] if self._claimed else self._ready()
                if ready:
                    break
                self._cond.wait()
            entry = min(ready, key=lambda e: e.vtime)
            taken = self._pop(entry, max_commands)
            self._tell(entry, len(ready) > 1)  # `ready` held it too
            self._cond.notify_all()
        self._wake_host()
        return entry, taken

    def put_and_claim(self, entry: Entry, commands: list[Any], nbytes: int, max_commands: int) -> list[Any] | None:
        """`put`, and when the device is idle (no slice runs, no other session waits to run: `take` would hand
        this session's first slice out next anyway), pop that slice for the caller to run in its own thread
        instead of waking the device's: the device stays claimed (`take` hands out nothing) until the caller's
        `charge`. None: queued as by `put` (the device's thread runs it; False from `put` reads as [])."""
        with self._cond:
            idle = not (self._claimed or entry.closed or self._stopped or entry.blocked or entry.commands)
            if idle and not self._busy():
                entry.vtime = max(entry.vtime, self._vnow)  # back from idle: no banked credit
                self._claimed = True
                self._tell(entry, False)  # nobody else waits (`_ready` is empty)
                if len(commands) <= max_commands:  # the usual: the whole frame is the slice (`_pop` of it, no queue)
                    self._vnow = entry.vtime
                    entry.running = True
                    return commands
                entry.frames.append([commands, 0, nbytes])
                entry.commands += len(commands)
                self._bytes(entry, nbytes)
                return self._pop(entry, max_commands)  # no notify: nothing for the device's thread to do (and a
                # frame longer than the slice frees none of its bytes: `HostQueued.wake` has nobody to wake)
        return None if self.put(entry, commands, nbytes) else []

    def _host_full(self, entry: Entry, nbytes: int) -> bool:
        """Whether `nbytes` more of `entry` would take the host's queued bytes past their limit (`HostQueued`)."""
        host = self.host
        if host is None:
            return False
        grown = _excess(entry.nbytes + nbytes) - _excess(entry.nbytes)
        return grown > 0 and host.full(grown, self._cond)

    def _wake_host(self) -> None:
        """After bytes were freed (holding no lock): wake the readers of other queues waiting for the host's room."""
        if self.host is not None:
            self.host.wake()

    def _bytes(self, entry: Entry, delta: int) -> None:
        """Change `entry`'s queued bytes by `delta`, and the host's count of those past `PARKED_BYTES`."""
        before = entry.nbytes
        entry.nbytes = before + delta
        if self.host is not None and (before > PARKED_BYTES or entry.nbytes > PARKED_BYTES):
            self.host.add(_excess(entry.nbytes) - _excess(before))

    def _busy(self) -> bool:
        """Whether a slice runs or a session waits to run (`_ready` not empty), in one pass over the sessions and no
        list (`put_and_claim`'s question, every frame a reader runs itself: round 48)."""
        for e in self._entries:
            if e.running or (e.commands and not e.blocked):
                return True
        return False

    def _ready(self) -> list[Entry]:
        return [e for e in self._entries if e.commands and not e.running and not e.blocked]

    def _tell(self, entry: Entry, contended: bool) -> None:
        """Tell `contend` whether others wait while `entry`'s slice runs (holding the condition)."""
        entry.contended = contended
        if self.contend is not None:
            self.contend(entry, contended)

    def _contended(self, ready: Entry) -> None:
        """`ready` may run now: a running slice of another session that was told nobody waits is told otherwise
        (holding the condition)."""
        if ready.running or ready.blocked:
            return
        for e in self._entries:
            if e.running and not e.contended and e is not ready:
                self._tell(e, True)

    def _pop(self, entry: Entry, max_commands: int) -> list[Any]:
        """Pop up to `max_commands` of the entry's commands and mark it running (holding the condition)."""
        self._vnow = max(self._vnow, entry.vtime)
        taken: list[Any] = []
        while entry.frames and len(taken) < max_commands:
            frame = entry.frames[0]
            cmds, i = frame[0], frame[1]
            n = min(max_commands - len(taken), len(cmds) - i)
            taken.extend(cmds[i : i + n])
            frame[1] = i + n
            if frame[1] >= len(cmds):
                entry.frames.popleft()
                if frame[2]:
                    self._bytes(entry, -frame[2])
        entry.commands -= len(taken)
        entry.running = True
        return taken

    def idle(self, entry: Entry) -> bool:
        """Whether everything the session queued has run (and its replies are in its outbox)."""
        with self._cond:
            return not entry.commands and not entry.running and not entry.closed

    def give_back(self, entry: Entry, commands: list[Any]) -> None:
        """Return the unexecuted tail of a slice to the front of the session's queue."""
        if not commands:
            return
        with self._cond:
            if entry.closed:
                return
            entry.frames.appendleft([commands, 0, 0])
            entry.commands += len(commands)

    def block(self, entry: Entry, still: Callable[[], bool]) -> bool:
        """Park a session while `still()` holds (its client is not reading replies); True when parked."""
        with self._cond:
            if still():
                entry.blocked = True
            return entry.blocked

    def unblock(self, entry: Entry, still: Callable[[], bool]) -> None:
        """Let a parked session run again once `still()` no longer holds."""
        with self._cond:
            if entry.blocked and not still():
                entry.blocked = False
                if entry.commands:
                    self._contended(entry)
                self._cond.notify_all()

    def charge(self, entry: Entry, seconds: float, claimed: bool = False) -> None:
        """A slice of `entry` ended after `seconds`; `claimed`: it ran by `put_and_claim`, the device is free again."""
        self.done(entry, [], seconds, claimed)

    def done(self, entry: Entry, rest: list[Any], seconds: float, claimed: bool = False) -> None:
        """A slice of `entry` ended: `give_back` its unexecuted `rest` and `charge` its `seconds`, under one lock."""
        with self._cond:
            if rest and not entry.closed:
                entry.frames.appendleft([rest, 0, 0])
                entry.commands += len(rest)
            entry.vtime += seconds / entry.share
            entry.running = False
            if not claimed:
                self._cond.notify_all()
                return
            self._claimed = False
            if self._ready() or self._idle_waiters:  # else no one waits for this: the device's thread sleeps on
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queue is empty and nothing runs (draining); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._idle_waiters += 1
            try:
                while any(e.commands or e.running for e in self._entries):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                return True
            finally:
                self._idle_waiters -= 1

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


# Runs up to a time budget of a session's commands; returns (the unexecuted rest, measured seconds to charge). It
# books the slice's time in the daemon's accounts itself; the queue charges it to the session's virtual time.
SliceRunner = Callable[[Entry, list[Any], float], tuple[list[Any], float]]


class DeviceWorker(threading.Thread):
    """The thread of one device: takes slices from the fair queue, has them run (by the session's worker, which
    measures them), and charges the measured time."""

    def __init__(
        self,
        name: str,
        queue: FairQueue,
        run_slice: SliceRunner,
        *,
        slice_commands: int = 128,
        slice_seconds: float = 0.005,
        threads: int = 0,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.queue = queue
        self.run_slice = run_slice
        self.slice_commands = slice_commands
        self.slice_seconds = slice_seconds
        self.threads = threads

    def run(self) -> None:
        import torch

        torch.set_grad_enabled(False)  # thread-local: in-thread sessions never record autograd history
        if self.threads > 0:
            torch.set_num_threads(self.threads)  # OpenMP's team size is per calling thread: set it here too
        while True:
            got = self.queue.take(self.slice_commands)
            if got is None:
                return
            entry, commands = got
            rest: list[Any] = []
            seconds = 0.0
            try:
                rest, seconds = self.run_slice(entry, commands, self.slice_seconds)
            except Exception:  # the slice runner handles command errors; this is a last line of defence
                log.exception("device worker %s: slice failed", self.name)
            finally:
                self.queue.done(entry, rest, seconds)
