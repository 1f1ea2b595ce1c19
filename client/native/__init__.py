"""The C++ client: `gpupool run`'s default `gpupool` device (the Python shim where it cannot be built, or with
`gpupool run --client shim`).

The Python shim (gpupool.client.torch: a tensor subclass with `__torch_dispatch__`) pays torch's floor for a Python
device, ~100k instructions per op. The C++ client (backend.py, native_client.cpp: a PrivateUse1 backend of plain
at::Tensors that infers outputs with the Meta kernels and writes the daemon's compact records in C++) sends the same ops
for a third to a half of that. `gpupool run` builds it (client/run.py `_choose_client`) and sets $GPUPOOL_CLIENT=native
for the child (`shim` where it chose the Python client), and torch's backend entry point (gpupool.client.cuda.autoload,
at `import torch`) calls `enable()`: the backend is built (once per torch version and source, ~1-2 min, cached) and
loaded as the `gpupool` device, and the session of the lease `gpupool run` hands over ($GPUPOOL_LEASE) is attached at
the first tensor made on the device: a lease of N GPUs gives the devices gpupool:0..N-1, each its own session, attached
at its own first tensor. An ordinary eager script (`model.to("gpupool")`, `.item()`, `.cpu()`) then runs unchanged;
`import gpupool.torch` gives the part of its API the native client has (`device()`, `synchronize()`, the error classes).

With `--cuda` too ($GPUPOOL_CUDA), torch's entry point then installs gpupool.client.cuda's mapping on top of this
device (`cuda` -> `gpupool`, `torch.cuda.*` from the lease; docs/cuda.md): `set_device`, `manual_seed_all` and the
session (`ensure_session`) are here for it.

torch.distributed's `gpupool` backend (client/distributed.py) runs its collectives over these sessions (group.py).
Step capture (`gpupool.torch.capture`) is capture.py's. What it does not do fails with one message naming the feature
and the way out (`refuse`): a process without a lease, attaching by hand (api.py; `Lease.device`), the Python client's
own modules (gpupool.client.torch). docs/native-client.md.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any, NoReturn

ENV = "GPUPOOL_CLIENT"
WAY_OUT = "run it under `gpupool run --client shim` (the Python client)"


class Unsupported(RuntimeError):
    """A feature the native client does not have (its message names it and the way out)."""


def requested() -> bool:
    """Whether this process asked for the C++ client ($GPUPOOL_CLIENT=native)."""
    return os.environ.get(ENV, "").strip().lower() == "native"


def refuse(feature: str) -> NoReturn:
    raise Unsupported(f"gpupool --native-client: {feature} is not supported by the native client; {WAY_OUT}")


_state: dict[str, Any] = {}
_lock = threading.Lock()


def active() -> bool:
    """Whether the C++ client owns the `gpupool` device in this process (enable() ran)."""
    return bool(_state.get("enabled"))


def enable() -> None:
    """Load the C++ client as the `gpupool` device (at `import torch`, from the backend entry point). A build that
    cannot happen ends the process with one line: the script would fail at its first tensor."""
    if active():
        return
    from gpupool.config import UnsafeCacheDir

    from . import backend

    try:
        backend.load()
    except backend.BuildError as exc:
        sys.exit(f"gpupool --native-client: {exc}; install g++ and ninja, or {WAY_OUT}")
    except UnsafeCacheDir as exc:  # another user could replace the library there: never build or load it
        sys.exit(f"gpupool --native-client: {exc}")
    import torch

    backend.claim()
    lib = torch.library.Library("gpupool_native", "IMPL")  # noqa: TOR901 (defined in C++, implemented here)
    lib.impl("autoconnect", _autoconnect, "CompositeExplicitAutograd")
    _state["lib"] = lib
    aten = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - a kernel for an existing aten op
    aten.impl("_pin_memory", _pin_memory, "CPU")  # torch's raises for PrivateUse1 (a DataLoader with pin_memory=True)
    _state["aten"] = aten
    torch.ops.gpupool_native.set_device_count(max(1, leased_count()))
    from gpupool.client.engine import run_backward_on_calling_thread

    run_backward_on_calling_thread()  # as the Python client's: no thread hand-off per device in a backward
    from gpupool.client import checkpoints, fastpath, mp_share, zerotensor

    checkpoints.install_load()  # torch.load of storages saved on gpupool: onto the device (client/checkpoints.py)
    fastpath.install(backend.NAME)  # transformer eval: torch's ordinary path (client/fastpath.py)
    zerotensor.install()  # forward-mode AD's zero tangents: ordinary zeros (client/zerotensor.py)
    mp_share.install()  # a gpupool tensor sent to another process: one clear error, as on the Python client
    _deepcopy_by_clone()  # copy.deepcopy of a device tensor (torch's storage copy makes one the daemon never saw)
    _pickle_storages_on_the_cpu()  # pickle.dumps of a device tensor (torch's legacy save: the same)
    torch.ops.gpupool_native.set_autoconnect()
    if torch.distributed.is_available():
        from gpupool.client import distributed

        distributed.register()  # torch.distributed's `gpupool` backend: collectives between the daemons (group.py)
    module = getattr(torch, backend.NAME)
    module.set_device = set_device
    module.manual_seed = module.manual_seed_all = manual_seed_all
    _state["enabled"] = True


def leased_count() -> int:
    """The devices of $GPUPOOL_LEASE (0 without one, or with one that holds no lease: the first tensor says so)."""
    from gpupool.client.pool import Lease

    try:
        lease = Lease.from_env() if os.environ.get("GPUPOOL_LEASE") else None
    except Exception:  # noqa: BLE001 - a malformed lease says so at attach (_autoconnect), not at `import torch`
        lease = None
    return len(lease.devices) if lease is not None else 0


def _deepcopy_by_clone() -> None:
    """`copy.deepcopy` of a device tensor: torch copies a tensor that has a storage through the storage
    (`UntypedStorage.clone`: a storage made by the allocator, then `copy_` into it), and the C++ client's daemon never
    sees a storage made that way: "a tensor on a storage the daemon never saw". `dataclasses.asdict` of a snapshot
    (pytorch/examples' minGPT-ddp), `copy.deepcopy(optimizer.state_dict())` and EMA/best-model copies failed. A plain
    tensor on the device is copied with `clone()` instead, as torch itself copies tensors of devices without storages
    (XLA, MPS, lazy): the values, dtype, device, requires_grad and the grad's own deep copy (two tensors that shared a
    storage get one each). Parameters copy themselves with clone() (nn.Parameter.__deepcopy__); other subclasses go
    to torch as before. The Python client's tensors copy themselves (client/torch/tensor.py)."""
    import torch

    from . import backend

    original = torch.Tensor.__deepcopy__
    if getattr(original, "_gpupool", False):
        return

    def __deepcopy__(self: Any, memo: dict[int, Any]) -> Any:  # noqa: N807 - the protocol's name
        if type(self) is not torch.Tensor or self.device.type != backend.NAME or not self.is_leaf:
            return original(self, memo)  # (a non-leaf: torch's own error)
        if id(self) in memo:
            return memo[id(self)]
        with torch.no_grad():
            new = self.clone()
        if self.requires_grad:
            new.requires_grad_()
        if self.grad is not None:
            new.grad = self.grad.__deepcopy__(memo)
        memo[id(self)] = new
        return new

    __deepcopy__._gpupool = True  # type: ignore[attr-defined]
    torch.Tensor.__deepcopy__ = __deepcopy__  # type: ignore[method-assign]


def _pickle_storages_on_the_cpu() -> None:
    """`pickle.dumps` of a device tensor (an object collective's `{"loss": loss}`: torch.distributed pickles the
    object): torch reduces the tensor's storage with a legacy `torch.save`, which reads a device storage through a
    tensor made by `from_blob` on its data pointer, a storage the C++ client's daemon never saw ("a tensor on a storage
    the daemon never saw"; `all_gather_object` of a dict holding a gpupool tensor failed so until round 38). A device
    storage is pickled as its CPU copy instead (`storage.cpu()`, a download): it unpickles on the CPU, as the Python
    client's tensors do (client/torch/tensor.py `__reduce_ex__`). torch.save keeps its own path (its pickler takes
    storages by persistent id, never by `__reduce__`: checkpoints keep their `gpupool:N` locations), and so does
    sending a tensor to another process (mp_share: ForkingPickler's reducers come first)."""
    import torch

    from . import backend

    for cls in (torch.UntypedStorage, torch.storage.TypedStorage):
        original = cls.__reduce__
        if getattr(original, "_gpupool", False):
            continue

        def __reduce__(self: Any, _original: Any = original) -> Any:  # noqa: N807 - the protocol's name
            if self.device.type == backend.NAME:
                return self.cpu().__reduce__()
            return _original(self)

        __reduce__._gpupool = True  # type: ignore[attr-defined]
        cls.__reduce__ = __reduce__  # type: ignore[assignment,method-assign]


def _pin_memory(self: Any, device: Any = None) -> Any:
    """`pin_memory()` for the device: uploads go over the network, not by DMA, so host memory as it is (a copy, as
    torch's pinned copy is); pinning for another accelerator goes on to torch's kernel."""
    import torch

    from . import backend

    target = device if device is not None else torch.accelerator.current_accelerator()
    if target is None or torch.device(target).type == backend.NAME:
        return self.clone()
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.aten._pin_memory.default.redispatch(keys, self, device)


def _index(device: Any) -> int:
    """A device's index (an int, a torch.device or a string; None or no index: the current device)."""
    import torch

    if device is None:
        return current_index()
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    index = torch.device(device).index
    return current_index() if index is None else int(index)


def current_index() -> int:
    """The calling thread's current gpupool device (per thread, as CUDA's: torch's device guards set the same one)."""
    import torch

    return int(torch.ops.gpupool_native.current_device())


def device_count() -> int:
    """The devices this process can name: the lease's."""
    import torch

    return int(torch.ops.gpupool_native.device_count())


def check_index(index: int) -> int:
    """`index` if it names a leased device, else a RuntimeError naming it (as a CUDA ordinal past the GPUs is)."""
    n = device_count()
    if not 0 <= index < n:
        raise RuntimeError(f"gpupool --native-client: gpupool:{index} is not a device of this process ({n} leased: "
                         f"gpupool:0..{n - 1})")  # fmt: skip
    return index


def set_device(device: Any) -> None:
    """`torch.gpupool.set_device`: the calling thread's current device (`torch.cuda.set_device` under --cuda)."""
    import torch

    torch.ops.gpupool_native.set_current_device(check_index(_index(device)))


def manual_seed_all(seed: int) -> None:
    """`torch.manual_seed` (and `torch.cuda.manual_seed_all` under --cuda) seeds the daemon's generator of every
    session, as the Python client does: now, after the ops recorded so far, or when a session attaches."""
    from . import backend

    backend.refuse_in_recording("torch.manual_seed")
    with _lock:
        _state["seed"] = int(seed)
        sessions = _sessions()
        if sessions:
            backend.flush()  # the ops recorded before the seed run before it
        for s in sessions.values():
            s.seed(int(seed))


def _sessions() -> dict[int, Any]:
    sessions: dict[int, Any] = _state.setdefault("sessions", {})
    return sessions


def ensure_session(device: Any = None) -> Any:
    """The session of a device (None: the current one), attached now if no tensor has been made on it yet
    (`torch.cuda.get_device_name` may come first)."""
    index = check_index(_index(device))
    if index not in _sessions():
        _autoconnect(index)
    return _sessions()[index]


def lease() -> Any:
    """The lease of $GPUPOOL_LEASE, read once and renewed from then on."""
    from gpupool.client.pool import Lease

    if _state.get("lease") is None:
        lease = Lease.from_env() if os.environ.get("GPUPOOL_LEASE") else None
        if lease is None:
            refuse("a process without a lease ($GPUPOOL_LEASE: run the script under `gpupool run --native-client`)")
        lease.refresh_if_stale()
        lease.start_renewing()
        _state["lease"] = lease
        _close_at_exit()
    return _state["lease"]


def _autoconnect(index: int = 0) -> None:
    """The first tensor on gpupool:<index>: attach the session of $GPUPOOL_LEASE's device <index> (shifted by a torchrun
    rank's LOCAL_RANK; its own daemon session, perhaps on another daemon than the others') and send its ops from now
    on."""
    with _lock:
        if index in _sessions():
            return
        from gpupool.client.session import Session

        held = lease()
        check_index(index)
        from gpupool.client.pool import rank_device

        # A torchrun rank (LOCAL_RANK r) sees its own leased device first, as gpupool:0, as on the Python client.
        at = rank_device(index, len(held.devices))
        leased = held.devices[at]
        session = Session.attach_tensors(leased.address, leased.token)
        held.subscribe(lambda fresh: session.refresh(fresh.devices[at].token))
        _connect(session, index)


def attach(address: str, token: str, index: int = 0) -> Any:
    """Send gpupool:<index>'s ops to one daemon directly (a lease token; the bench scripts), before its first tensor:
    the session. Call after enable() (and `torch.ops.gpupool_native.set_device_count` for an index past 0)."""
    from gpupool.client.session import Session

    with _lock:
        if index in _sessions():
            raise RuntimeError(f"gpupool --native-client: gpupool:{index} is attached already")
        session = Session.attach_tensors(address, token)
        _connect(session, index)
        return session


def _connect(session: Any, index: int) -> None:
    import torch

    from . import backend

    backend.connect(session, index=index)
    # The last torch.manual_seed (before the first tensor, or before this module was loaded: torch.initial_seed()).
    session.seed(_state.get("seed", torch.initial_seed()))
    _close_at_exit()
    _sessions()[index] = session


def _close_at_exit() -> None:
    if not _state.get("at_exit"):
        _state["at_exit"] = True
        atexit.register(_close)


def _close() -> None:
    """At exit: what is still buffered goes out, the sessions close (the daemons free their tensors)."""
    from . import backend

    sessions, lease = _state.pop("sessions", {}), _state.pop("lease", None)
    if lease is not None:  # the lease is `gpupool run`'s to release; no renewal forwards a token to a closing session
        lease.stop_renewing()
    if sessions:
        try:
            backend.flush()
        except Exception:  # noqa: BLE001, S110 - the daemon frees a dead session's tensors anyway
            pass
    for s in sessions.values():
        try:
            s.close()
        except Exception:  # noqa: BLE001, S110 - as above
            pass


def session(device: Any = None) -> Any:
    """The attached session of a device (None: the current one; None before its first tensor)."""
    return _sessions().get(_index(device))
