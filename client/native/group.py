"""Collectives on the C++ client: what client/distributed.py's process group asks of a device's runtime, over the C++
client's session of that device (the Python client's is client/torch/runtime.py's DeviceRuntime).

A collective names its tensors by wire handle (`gpupool_native::wire_handle`: the storage's handle, or a view handle;
a held-back empty is sent first) and goes on the device's session stream after the records buffered before it (the
C++ client's frames go out first), so the daemon runs it in program order, as the Python client's do.
"""

from __future__ import annotations

from typing import Any

import torch

from gpupool.errors import InvalidArgument

from . import backend


class NativeRuntime:
    """gpupool:<index>'s session as client/distributed.py uses a runtime (command, sync, new_handle, free, handle)."""

    pending: dict[int, Any] = {}  # the C++ client sends held-back empties itself (wire_handle)

    def __init__(self, index: int, session: Any) -> None:
        self.index = index
        self.session = session
        self.device = torch.device(backend.NAME, index)

    @property
    def closed(self) -> bool:
        return bool(getattr(self.session, "_closed", False))

    def handle(self, t: torch.Tensor) -> int:
        """The wire handle a collective names `t` by (a tensor on this device only)."""
        if t.device != self.device:
            raise InvalidArgument(
                f"a collective of the gpupool backend got a tensor on {t.device}; this rank's tensors live on "
                f"{self.device} (move them there: tensor.to({str(self.device)!r}))"
            )
        return int(torch.ops.gpupool_native.wire_handle(t))

    def new_handle(self) -> int:
        return int(torch.ops.gpupool_native.new_handle(self.index))

    def command(self, cmd: Any, *, flush: bool = False) -> None:
        """After what the C++ client buffered for this device; `flush` sends it now."""
        translate = backend.errors().translate
        backend.flush()
        try:
            self.session.command(cmd)
            if flush:
                self.session.flush()
        except Exception as exc:  # noqa: BLE001 - translated, or raised as it is
            raise translate(exc) from exc

    def sync(self, scalar_handles: tuple[int, ...] | list[int] = ()) -> list[Any]:
        translate = backend.errors().translate
        backend.flush()
        try:
            return list(self.session.sync(list(scalar_handles)))
        except Exception as exc:  # noqa: BLE001
            raise translate(exc) from exc

    def free(self, handles: list[int]) -> None:
        self.session.free(handles)

    def materialize_pending(self) -> None:
        """Nothing: `handle` sent the held-back empty already."""
