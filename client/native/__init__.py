"""`gpupool run --native-client` (experimental): the `gpupool` device as the C++ client instead of the Python shim.

The Python shim (gpupool.client.torch: a tensor subclass with `__torch_dispatch__`) pays torch's floor for a Python
device, ~100k instructions per op. The C++ client (backend.py, native_client.cpp: a PrivateUse1 backend of plain
at::Tensors that infers outputs with the Meta kernels and writes the daemon's compact records in C++) sends the same
ops for a third to a half of that. It is opt-in: `gpupool run --native-client` sets $GPUPOOL_CLIENT=native for the
child, and torch's backend entry point (gpupool.client.cuda.autoload, at `import torch`) calls `enable()`: the backend
is built (once per torch version and source, ~1-2 min, cached) and loaded as the `gpupool` device, and the session of
the lease `gpupool run` hands over ($GPUPOOL_LEASE) is attached at the first tensor made on the device. An ordinary
eager script (`model.to("gpupool")`, `.item()`, `.cpu()`) then runs unchanged; `import gpupool.torch` gives the part
of its API the native client has (`device()`, `synchronize()`, the error classes).

With `--cuda` too ($GPUPOOL_CUDA), torch's entry point then installs gpupool.client.cuda's mapping on top of this
device (`cuda` -> `gpupool`, `torch.cuda.*` from the lease; docs/cuda.md): `set_device`, `manual_seed_all` and the
session (`ensure_session`) are here for it.

What it does not do fails with one message naming the feature and the way out (`refuse`): step capture, collectives,
several devices, a process without a lease. docs/native-client.md.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any, NoReturn

ENV = "GPUPOOL_CLIENT"
WAY_OUT = "run without --native-client (the Python client)"


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
    torch.ops.gpupool_native.set_autoconnect()
    _refuse_collectives()
    module = getattr(torch, backend.NAME)
    module.set_device = set_device
    module.manual_seed = module.manual_seed_all = manual_seed_all
    _state["enabled"] = True


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


def set_device(device: Any) -> None:
    """`torch.gpupool.set_device`: gpupool:0 is the one device."""
    import torch

    index = device if isinstance(device, int) else torch.device(device).index
    if index not in (None, 0):
        refuse(f"gpupool:{index} (several devices)")


def manual_seed_all(seed: int) -> None:
    """`torch.manual_seed` (and `torch.cuda.manual_seed_all` under --cuda) seeds the daemon's generator of the session,
    as the Python client does: now, after the ops recorded so far, or when the session attaches."""
    from . import backend

    with _lock:
        _state["seed"] = int(seed)
        session = _state.get("session")
        if session is not None:
            backend.flush()  # the ops recorded before the seed run before it
            session.seed(int(seed))


def ensure_session() -> Any:
    """The session, attached now if no tensor has been made on the device yet (`torch.cuda.get_device_name` may come
    first)."""
    if _state.get("session") is None:
        _autoconnect()
    return _state["session"]


def _autoconnect() -> None:
    """The first tensor on the device: attach the session of $GPUPOOL_LEASE's device and send from now on."""
    with _lock:
        if _state.get("session") is not None:
            return
        from gpupool.client.pool import Lease
        from gpupool.client.session import Session

        lease = Lease.from_env() if os.environ.get("GPUPOOL_LEASE") else None
        if lease is None:
            refuse("a process without a lease ($GPUPOOL_LEASE: run the script under `gpupool run --native-client`)")
        if len(lease.devices) != 1:
            refuse(f"a lease of {len(lease.devices)} devices (several devices)")
        lease.refresh_if_stale()
        lease.start_renewing()
        session = Session.attach(lease.devices[0].address, lease.devices[0].token)
        lease.subscribe(lambda fresh: session.refresh(fresh.devices[0].token))
        _connect(session, lease)


def attach(address: str, token: str) -> Any:
    """Send the device's ops to one daemon directly (a lease token; the bench scripts), before its first tensor: the
    session. Call after enable()."""
    from gpupool.client.session import Session

    with _lock:
        if _state.get("session") is not None:
            raise RuntimeError("gpupool --native-client: the device is attached already")
        session = Session.attach(address, token)
        _connect(session, None)
        return session


def _connect(session: Any, lease: Any) -> None:
    import torch

    from . import backend

    backend.connect(session)
    # The last torch.manual_seed (before the first tensor, or before this module was loaded: torch.initial_seed()).
    session.seed(_state.get("seed", torch.initial_seed()))
    _state["session"], _state["lease"] = session, lease
    atexit.register(_close)


def _close() -> None:
    """At exit: what is still buffered goes out, the session closes (the daemon frees its tensors)."""
    from . import backend

    session, lease = _state.pop("session", None), _state.pop("lease", None)
    if session is None:
        return
    try:
        backend.flush()
        session.close()
    except Exception:  # noqa: BLE001, S110 - the daemon frees a dead session's tensors anyway
        pass
    if lease is not None:  # the lease is `gpupool run`'s to release
        lease.stop_renewing()


def session() -> Any:
    """The attached session (None before the first tensor)."""
    return _state.get("session")


def _refuse_collectives() -> None:
    """torch.distributed's `gpupool` backend (the Python client's collectives) says it is not here."""
    import torch.distributed as dist

    if not dist.is_available():
        return

    def create(*args: Any, **kwargs: Any) -> Any:
        refuse("torch.distributed's `gpupool` backend (collectives)")

    dist.Backend.register_backend("gpupool", create, devices=["gpupool"])
