"""One attached gpupool device: its session, handles, deferred frees, seeds and errors.

`DeviceRuntime` is what every remote tensor points at. It owns the session of one leased device
(`gpupool:<index>`), hands out handles, collects the handles of dead tensors and frees them in
batches, and turns the session client's errors into the exceptions torch users expect
(`errors.translate`). The module-level registry maps device indices to runtimes.
"""

from __future__ import annotations

import itertools
import logging
import struct
import threading
from _thread import get_ident
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, Protocol

import grpc
import torch

from gpupool import compact, config

from . import errors

log = logging.getLogger("gpupool.torch")

FREE_BATCH = 256  # dead handles collected before one Free command goes out ...
# Ops queued before the frame goes out. The session would wait for 256 commands or a sync point, so the
# daemon would idle while the client builds a whole training step and the client idle while the daemon
# runs it; small frames let the two overlap. A frame costs the client ~100 us of gRPC work, so 8 ops a frame
# cost 12 us an op; 32 cost 3 us and still overlap (BENCHMARKS.md, launch-bound).
FLUSH_OPS = config.flush_ops()  # $GPUPOOL_FLUSH_OPS, 1..65536 (a bad value: one ValueError line naming it)
_NEVER = object()  # the sentinel of the handle iterator over a session's own new_handle (it never returns this)
FREE_QUOTA_FRACTION = 64  # ... or dead bytes above 1/64 of the quota, so that freed memory is soon usable again


class Recorder(Protocol):
    """What a step capture (`client.torch.capture`) sees of the commands a runtime sends while it records: those of
    the recording thread only (`DeviceRuntime.recorders`); other threads' commands go out as at any other time."""

    def op(self, name: str, args: Any, kwargs: Any, outputs: list[int]) -> None: ...
    def upload(self, handle: int, tensor: torch.Tensor) -> None: ...
    def released(self, handle: int) -> None: ...
    def refuse(self, what: str) -> NoReturn: ...


class DeviceRuntime:
    """The client side of one session: `gpupool:<index>`."""

    def __init__(
        self, index: int, session: Any, lease: Any = None, owns_lease: bool = False, lease_index: int = 0
    ) -> None:
        self.index = index
        self.session = session
        self.lease = lease
        self.owns_lease = owns_lease
        self.lease_index = lease_index  # which device of `lease` this is
        self.device = torch.device("gpupool", index)
        self.closed = False
        self._dead: list[int] = []
        self._dead_bytes = 0
        # The quota less the bytes of the session's tensors as the client counts them (reserve52): each new output's
        # and empty's (`spend`), given back as its Free goes out (`flush_frees`). A tensor made past it sets `_near`:
        # the op then syncs (`near`). The daemon knows the exact figure; no other tenant's use is in either. A float
        # (exact to 2^53 bytes): native_ops.cpp reads and writes it without a multi-digit int's conversions.
        self.quota = 0
        self._room = 2.0**62
        self._near = False
        self._set_quota(int(getattr(session, "quota_bytes", 0) or 0))
        # Tensors made by torch.empty(..., device="gpupool") whose Op is not sent yet: the usual next
        # step is a copy from the CPU (`x.to("gpupool")`), which then becomes one upload into the handle.
        # The last item: the recorder of the thread that made it while that thread recorded a step, else None
        # (`materialize_pending`: a recording's empties are its own ops, sent by its thread only).
        self.pending: dict[int, tuple[str, list[Any], dict[str, Any], Recorder | None]] = {}
        # Handles held by more than one tensor (detach/alias share the daemon tensor): extra holders.
        self.shared: dict[int, int] = {}
        self._lock = threading.RLock()  # re-entrant: a finalizer may run while this thread holds it
        self.ops_sent = 0
        self._unflushed = 0
        self.op_ids: dict[str, int] = {}  # op names defined in this session's compact records (gpupool/compact.py)
        # Step capture: the recorder of each thread recording a step (by thread id: only that thread's commands
        # are recorded; `start_recording`), and handles that defined graphs hold (called with the handle when the
        # client lets go of it). The hot paths test `if self.recorders` (empty: nobody records) before any lookup.
        self.recorders: dict[int, Recorder] = {}
        self.watched: dict[int, list[Callable[[int], None]]] = {}
        # Handles a defined graph writes (a new `p.grad` a step): the tensors made since that share one (a detach, a
        # lazy view: transfer.py `_keep`), weakly; a replay moves them to a handle of their own (capture.py `_unalias`)
        self.kept: dict[int, list[Any]] = {}
        # A fake GPU computes with CPU kernels, whose outputs differ from meta's in a few places.
        self.cpu_backed = bool(getattr(getattr(session, "device", None), "fake", False))
        # Handles straight from the session's counter (the same one Session.new_handle draws from, so the two
        # never collide), without its Handle objects: one add per output instead of three calls.
        # Any other session: its own new_handle on every `next` (base 0), so the hot path never asks which it has.
        base = getattr(session, "handle_base", None)
        count = getattr(session, "_handles", None)
        if isinstance(base, int) and isinstance(count, itertools.count):
            self._handle_base: int = base
            self._handle_count: Iterator[int] = count
        else:
            self._handle_base = 0
            self._handle_count = map(int, iter(lambda: session.new_handle(), _NEVER))
        self._heads: dict[str, bytes] = {}  # op name -> its record's op id bytes (no name), once defined

    # ---- handles ----

    def new_handle(self) -> int:
        return self._handle_base + next(self._handle_count)

    def share(self, handle: int) -> None:
        """One more tensor holds `handle` (a detach or alias made without asking the daemon)."""
        with self._lock:
            self.shared[handle] = self.shared.get(handle, 0) + 1

    def release(self, handle: int, nbytes: int = 0) -> None:
        """Called when a tensor dies (any thread, any time): remember the handle for the next batch.
        (`RemoteTensor.__del__` and native_ops.cpp `remote_del` have the first branch inline, `remote_del` also the
        shared handle's case (`unshare`): keep the three alike.)"""
        if handle not in self.shared and not (self.watched or self.pending or self.closed or self.recorders):
            # The usual death, without the lock (~0.3-0.7 us less per tensor): nothing to look up, one append.
            # `_dead` is never replaced, only trimmed at its front (`flush_frees`), so an append racing a flush
            # lands in this batch or the next; `_dead_bytes` is a threshold only, a lost add is harmless.
            # Other handles being shared (detached parameters and gradients, most of a step) do not matter: a
            # handle absent from `shared` has this tensor as its only holder, so no other thread can share it now.
            self._dead.append(handle)
            self._dead_bytes += nbytes
            return
        with self._lock:
            extra = self.shared.get(handle)
            if extra:
                if extra == 1:
                    del self.shared[handle]
                else:
                    self.shared[handle] = extra - 1
                return
            for rec in list(self.recorders.values()):  # a tensor may die on any thread (a finalizer, a queue)
                rec.released(handle)
            if self.watched:
                for watcher in self.watched.pop(handle, ()):
                    watcher(handle)
            if self.closed:
                return
            if self.pending.pop(handle, None) is not None:  # an empty never sent: its bytes were counted (`spend`)
                self._room += nbytes
                return
            self._dead.append(handle)
            self._dead_bytes += nbytes

    def flush_frees(self, force: bool = False) -> None:
        if self._dead and (force or len(self._dead) >= FREE_BATCH or self._dead_bytes >= self.free_bytes):
            with self._lock:  # finalizers may run on other threads (garbage collection) and append meanwhile:
                n = len(self._dead)  # take the first n (appends go to the end; `release`), keep the list itself
                dead = self._dead[:n]
                del self._dead[:n]
                self._room += self._dead_bytes
                self._dead_bytes = 0
            self.free(dead)

    def spend(self, nbytes: int) -> None:
        """The op just queued made tensors of `nbytes`: past the quota by the client's count, or after an empty made
        past it (`remote.lazy_empty`: it goes with the op that first names it), `near`. (native_ops.cpp `spend_room`
        has it inline, remote.run_remote its usual case: keep the three alike.)"""
        if nbytes:
            self._room -= nbytes
            if self._room < 0:
                self._near = True
        if self._near:
            self.near()

    def near(self) -> None:
        """Past the quota by the client's count (reserve52): the frees queued go out, and if it is still past, a sync,
        so that the daemon's refusal of the op just queued is raised at its call, as CUDA's allocator raises one,
        before the script's next lines (its backward, an optimizer's step) run on a tensor without a value. A sync
        that passes changes no count (a refused tensor is counted until it dies, as the C++ client's `Dev::held`):
        each new tensor past the quota syncs again. Far from the quota nothing of this runs. Not on a thread
        recording a step (a sync is refused there: the flag waits for its end)."""
        if self.recorders and get_ident() in self.recorders:
            return
        self._near = False
        self.flush_frees(force=True)
        if self._room < 0:
            self.sync()

    # ---- commands: each a session method, its failures raised as torch-facing exceptions ----

    def _check_open(self) -> None:
        if self.closed:
            raise errors.DeviceLost(
                f"{self.device} is detached; its tensors are gone", code=grpc.StatusCode.FAILED_PRECONDITION
            )

    def _raise(self, exc: Exception) -> NoReturn:
        """Re-raise a session failure as what a torch user catches (`errors.translate`)."""
        translated = translate_and_mark(self, exc)
        try:
            if translated is exc:
                raise exc
            raise translated from exc
        finally:  # no cycle of this frame and the error: the tensors its traceback holds die with it, not at a GC
            exc = translated = None  # type: ignore[assignment]

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Any other session method (client/distributed.py: `command`, `flush`, `free`), failures translated."""
        self._check_open()
        try:
            return getattr(self.session, method)(*args, **kwargs)
        except Exception as exc:
            self._raise(exc)

    def op(self, name: str, args: Any, kwargs: Any, outputs: list[int]) -> None:
        self.ops_sent += 1
        if self._dead and (len(self._dead) >= FREE_BATCH or self._dead_bytes >= self.free_bytes):
            self.flush_frees()
        self._check_open()
        if self.recorders:
            rec = self.recorders.get(get_ident())
            if rec is not None:
                rec.op(name, args, kwargs, outputs)
        try:
            self.session.op(name, args, kwargs, outputs)
            self._sent_op()
        except Exception as exc:
            self._raise(exc)

    def recording(self) -> Recorder | None:
        """The recorder of the calling thread, if it is recording a step on this device (else None)."""
        return self.recorders.get(get_ident()) if self.recorders else None

    def start_recording(self, rec: Recorder) -> None:
        """From now on the calling thread's commands to this device are recorded by `rec` (and still sent)."""
        with self._lock:
            self.recorders[get_ident()] = rec

    def stop_recording(self) -> None:
        """The calling thread's recording ends. Empties it made and left unsent become ordinary pending ones."""
        with self._lock:
            rec = self.recorders.pop(get_ident(), None)
            if rec is None:
                return
            for h, (name, args, kwargs, owner) in list(self.pending.items()):
                if owner is rec:
                    self.pending[h] = (name, args, kwargs, None)

    def _sent_op(self) -> None:
        """Count an op into the frame being built; every FLUSH_OPS ops the frame goes out."""
        self._unflushed += 1
        if self._unflushed >= FLUSH_OPS:
            self._unflushed = 0
            self.session.flush()

    def eager_op(self, name: str, body: bytes) -> None:
        """An op as a compact record (gpupool/compact.py): `body` is the record after its op id, its output count, its
        output handles and its arguments (`ONE_OUTPUT(1, h) + tail` for the usual op), encoded by the caller.
        (native_ops.cpp `send_record` has its usual case inline: keep the two in step.)"""
        self.ops_sent += 1
        if self._dead and (len(self._dead) >= FREE_BATCH or self._dead_bytes >= self.free_bytes):
            self.flush_frees()
        if self.closed:
            self._check_open()
        head = self._heads.get(name)
        try:
            if head is None:
                self._define(name, body)
            else:
                self.session.eager_op(head + body)
            self._unflushed += 1  # self._sent_op(), inline
            if self._unflushed >= FLUSH_OPS:
                self._unflushed = 0
                self.session.flush()
        except Exception as exc:
            self._raise(exc)

    def _define(self, name: str, body: bytes) -> None:
        """The first record of an op name defines its id. Under the lock, and the id is published only once the
        defining record is queued: another user thread of the process (since round 23 a session serves several:
        one may record a step while others send eager ops) never refers to an undefined id, nor defines it twice."""
        with self._lock:
            op_id = self.op_ids.get(name)
            if op_id is not None:
                self.session.eager_op(compact.HEAD.pack(op_id, 0) + body)
                return
            op_id = len(self.op_ids)
            self.session.eager_op(compact.named_head(op_id, name) + body)
            self.op_ids[name] = op_id
            self._heads[name] = compact.HEAD.pack(op_id, 0)

    def compact_ok(self) -> bool:
        """Whether the calling thread's ops may travel as compact records now (not while it records `Op`s)."""
        return self.recording() is None and len(self.op_ids) < compact.MAX_OP_IDS

    def flush(self) -> None:
        self._check_open()
        try:
            self.session.flush()
        except Exception as exc:
            self._raise(exc)

    def sync(self, scalar_handles: tuple[int, ...] | list[int] = ()) -> list[Any]:
        """Wait for everything sent so far; raise the first error since the last sync."""
        if (rec := self.recording()) is not None:
            rec.refuse("a sync point (.item(), bool(t), synchronize)")
        self.flush_frees(force=True)
        self._check_open()
        try:
            return list(self.session.sync(list(scalar_handles)))
        except Exception as exc:
            self._raise(exc)

    def upload(self, tensor: torch.Tensor, handle: int | None = None) -> int:
        """Send a CPU tensor into `handle` (a new one by default); returns the handle."""
        h = self.new_handle() if handle is None else handle
        self._check_open()
        if (rec := self.recording()) is not None:
            rec.upload(h, tensor)
        try:
            self.session.upload(tensor, h)
        except Exception as exc:
            self._raise(exc)
        return h

    def download(
        self, handle: int, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The handle's tensor as a CPU tensor; `shape`, `dtype`: what it is known to be (Session.download)."""
        if (rec := self.recording()) is not None:
            rec.refuse("a read-back (.cpu(), .tolist(), printing, an op with data-dependent shapes)")
        self.flush_frees(force=True)
        self._check_open()
        try:
            out = self.session.download(handle, shape, dtype)
        except Exception as exc:
            self._raise(exc)
        assert isinstance(out, torch.Tensor)
        return out

    def free(self, handles: list[int]) -> None:
        self._check_open()
        try:
            self.session.free(handles)
        except Exception as exc:
            self._raise(exc)

    def seed(self, seed: int) -> None:
        if (rec := self.recording()) is not None:
            rec.refuse("torch.manual_seed")
        self._check_open()
        try:
            self.session.seed(seed)
        except Exception as exc:
            self._raise(exc)

    def command(self, cmd: Any, *, flush: bool = False) -> None:
        """Enqueue a command of another kind (the collectives of client/distributed.py); `flush` sends it now."""
        self._check_open()
        try:
            self.session.command(cmd)
            if flush:
                self._unflushed = 0
                self.session.flush()
        except Exception as exc:
            self._raise(exc)

    # ---- captured steps (client.torch.capture) ----

    def define_graph(self, graph: Any) -> None:
        self._check_open()
        try:
            self.session.define_graph(graph)
        except Exception as exc:
            self._raise(exc)

    def run_graph(
        self,
        graph_id: int,
        inputs: list[int],
        outputs: list[int],
        drop_writes: list[int],
        data: Any = (),
        flush: bool = True,
    ) -> None:
        """One captured step: one command, sent at once unless `flush` is false (capture.py batches a few steps
        per frame while they come fast); `data`: the bytes of inputs sent by value (handle 0 in `inputs`)."""
        self.ops_sent += 1
        if self._dead and (len(self._dead) >= FREE_BATCH or self._dead_bytes >= self.free_bytes):
            self.flush_frees()
        self._check_open()
        try:
            self.session.run_graph(graph_id, inputs, outputs, drop_writes, data)
            if flush:
                self._unflushed = 0
                self.session.flush()
        except Exception as exc:
            self._raise(exc)

    def drop_graph(self, graph_id: int) -> None:
        if self.closed:
            return
        try:
            self.session.drop_graph(graph_id)
        except Exception as exc:
            self._raise(exc)

    def refresh(self, token: str) -> None:
        if self.closed:
            return
        try:
            self.session.refresh(token)
        except Exception as exc:
            self._raise(exc)
        self._set_quota(int(getattr(self.session, "quota_bytes", 0) or 0))  # (a renewal may change it: round 52)

    def _set_quota(self, quota: int) -> None:
        """The session's memory quota (0: unknown), the bytes of dead handles batched before a free is sent, and the
        count's room: a renewal's new quota moves it by the difference (the tensors held stay counted)."""
        held = float(self.quota) - self._room if self.quota else 0.0
        self.quota = quota
        self.free_bytes = max(64 * 1024, quota // FREE_QUOTA_FRACTION) if quota else 64 * 1024 * 1024
        self._room = float(quota) - held if quota else 2.0**62

    def materialize_pending(self) -> None:
        """Send the held-back empties (in creation order) before anything that might use them.

        Under the lock, and each leaves `pending` only once sent: a thread that finds it still pending waits here
        instead of sending a command that names a handle not yet created. An empty made by a thread recording a
        step is an op of its recording: only that thread sends it (recorded); any thread sends the others, never
        recorded, even when the recording thread sends them."""
        with self._lock:
            mine = self.recording()
            for h, (name, args, kwargs, owner) in list(self.pending.items()):
                if owner is not None and owner is not mine:
                    continue  # the recording thread's own: its next command sends it into its recording
                if h not in self.pending:  # released meanwhile (by a finalizer this thread ran)
                    continue
                self.ops_sent += 1
                if self._dead and (len(self._dead) >= FREE_BATCH or self._dead_bytes >= self.free_bytes):
                    self.flush_frees()  # as `op` does: memory freed before the empty asks for more
                self._check_open()
                if owner is not None:
                    owner.op(name, args, kwargs, [h])
                try:
                    self.session.op(name, args, kwargs, [h])
                    self._sent_op()
                except Exception as exc:
                    self._raise(exc)
                if self.pending.pop(h, None) is None:  # a finalizer this thread ran while sending let go of it
                    self._dead.append(h)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._dead.clear()
        try:
            self.session.close()
        except Exception as exc:  # closing a dead session must not mask the caller's own error
            log.debug("closing %s: %s", self.device, exc)


# The output part of a record (`eager_op`'s body starts with it) for the usual single output: ONE_OUTPUT(1, handle)
ONE_OUTPUT = struct.Struct("<BQ").pack


def tensor_handle(t: torch.Tensor) -> tuple[Any, int] | None:
    """The Session and wire handle of a device tensor (errors.clear_grads), None for one of no session."""
    d = t.__dict__
    rt, h = d.get("_gp_rt"), d.get("_gp_h")
    return None if rt is None or not h else (rt.session, h)


errors.tensor_handle = tensor_handle


def translate_and_mark(rt: DeviceRuntime, exc: BaseException) -> BaseException:
    out = errors.translate(exc)
    if isinstance(out, errors.DeviceLost) and out.code is grpc.StatusCode.UNAVAILABLE:
        log.warning("%s lost: %s", rt.device, out)
    return out


# ---- the registry of attached devices ----

_lock = threading.RLock()
_runtimes: dict[int, DeviceRuntime] = {}
_seed: list[int] = []  # the last torch.manual_seed, applied to devices attached later


def get(index: int) -> DeviceRuntime | None:
    return _runtimes.get(index)


def add(rt: DeviceRuntime) -> None:
    with _lock:
        if rt.index in _runtimes and not _runtimes[rt.index].closed:
            raise RuntimeError(f"gpupool:{rt.index} is already attached")
        _runtimes[rt.index] = rt
        # A torch.manual_seed before this module was imported never reached `manual_seed_all`; torch.initial_seed()
        # is that seed (or torch's own random one), as a CUDA generator takes it when it initializes lazily.
        rt.seed(_seed[-1] if _seed else torch.initial_seed())


def all_runtimes() -> list[DeviceRuntime]:
    return [rt for rt in list(_runtimes.values()) if not rt.closed]


def next_free_index() -> int:
    with _lock:
        i = 0
        while i in _runtimes and not _runtimes[i].closed:
            i += 1
        return i


def manual_seed_all(seed: int) -> None:
    """`torch.manual_seed` reaches every attached session, and later ones when they attach."""
    _seed[:] = [int(seed)]
    for rt in all_runtimes():
        rt.seed(int(seed))


def remove_all() -> list[DeviceRuntime]:
    with _lock:
        rts = list(_runtimes.values())
        _runtimes.clear()
        return rts
