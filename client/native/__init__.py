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

What it does not do fails with one message naming the feature and the way out (`refuse`): step capture, collectives,
several devices, `--cuda`, a process without a lease. docs/native-client.md.
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
    cannot happen, and --cuda with it, end the process with one line: the script would fail at its first tensor."""
    if active():
        return
    from gpupool.client import cuda

    if cuda.requested():
        sys.exit(f"gpupool --native-client: --cuda ($GPUPOOL_CUDA) is not supported by the native client; {WAY_OUT}")
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
    torch.ops.gpupool_native.set_autoconnect()
    _refuse_collectives()
    _state["enabled"] = True


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
    from . import backend

    backend.connect(session)
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
