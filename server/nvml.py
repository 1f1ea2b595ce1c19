"""(quota55) A real GPU's free memory as its driver counts it, asked through NVML (libnvidia-ml.so.1, by ctypes) in the
daemon's front process, which holds no CUDA context under `--isolation process` (asking CUDA there would make one,
itself hundreds of MiB of every GPU: terms54 left such a GPU unmeasured, the scheduler's books alone deciding).

What it counts: the driver's free memory of the GPU (`nvmlDeviceGetMemoryInfo`'s `free`), so everything any process
holds there is used: the session workers' CUDA contexts and the blocks their caching allocators keep reserved, the
sessions' tensors, and memory outside the pool (another program, another CUDA context). The measure is therefore
never more than what the pool could still hand out; it may be less (a worker's cache it could reuse).

Where: the front only, never the zygote nor a session worker, which tenants' code runs in: NVML opens the device file
of every GPU of the host and keeps them open until its last shutdown (server/zygote.py `_release_nvml`), and a
descriptor of another GPU in a worker would let tenant code send that GPU's driver ioctls. The front starts the
zygote with subprocess (its descriptors closed but the zygote's socket), and the zygote calls `forbid` before it forks
any worker: a call there measures nothing.

Degrades to "not measured" (None: the scheduler's books decide), with one debug line, never an exception: no
libnvidia-ml on the host, an NVML error (no driver loaded, a GPU lost), a GPU NVML does not find by its UUID nor,
for a whole GPU, by its PCI address.
"""

from __future__ import annotations

import ctypes
import logging
import threading

log = logging.getLogger(__name__)

LIBRARY = "libnvidia-ml.so.1"
SUCCESS = 0  # NVML_SUCCESS


class _Memory(ctypes.Structure):
    """nvmlMemory_t (nvmlDeviceGetMemoryInfo's, version 1): bytes."""

    _fields_ = (("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong))


class Nvml:
    """NVML in this process, started on the first `free_memory` (a lock: heartbeats and Status ask from their
    threads) and kept started: each device's handle found once. A library that cannot be loaded or started is
    tried once (a driver does not appear under a running daemon)."""

    def __init__(self, library: str = LIBRARY) -> None:
        self.library = library
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._state = "new"  # "new" -> "up" | "off" (cannot be loaded or started) | "forbidden"
        self._handles: dict[tuple[str, str], ctypes.c_void_p | None] = {}  # (uuid, pci) -> handle (None: not found)
        self._told: set[tuple[str, str, int]] = set()  # (uuid, pci, error) already told in a debug line

    def forbid(self) -> None:
        """Never start NVML in this process (the zygote and, by its fork, every session worker); one started here
        before is shut down."""
        with self._lock:
            if self._state == "up" and self._lib is not None:
                self._lib.nvmlShutdown()
            self._state, self._lib = "forbidden", None
            self._handles.clear()

    @property
    def started(self) -> bool:
        return self._state == "up"

    def _start(self) -> ctypes.CDLL | None:
        if self._state != "new":
            return self._lib
        self._state = "off"
        try:
            lib = ctypes.CDLL(self.library)
            init, error_string = lib.nvmlInit_v2, lib.nvmlErrorString
            for name in ("nvmlDeviceGetHandleByUUID", "nvmlDeviceGetHandleByPciBusId_v2", "nvmlDeviceGetMemoryInfo"):
                getattr(lib, name).restype = ctypes.c_int
        except (OSError, AttributeError) as exc:
            log.debug("GPU free memory not measured by NVML: %s: %s", self.library, exc)
            return None
        init.restype, error_string.restype = ctypes.c_int, ctypes.c_char_p
        error_string.argtypes = (ctypes.c_int,)
        lib.nvmlDeviceGetHandleByUUID.argtypes = (ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p))
        lib.nvmlDeviceGetHandleByPciBusId_v2.argtypes = (ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p))
        lib.nvmlDeviceGetMemoryInfo.argtypes = (ctypes.c_void_p, ctypes.POINTER(_Memory))
        rc = init()
        if rc != SUCCESS:
            log.debug("GPU free memory not measured by NVML: nvmlInit: %s", _error(lib, rc))
            return None
        self._state, self._lib = "up", lib
        return lib

    def free_memory(self, uuid: str, pci: str = "") -> int | None:
        """The free memory in bytes of the device named `uuid` (CUDA_VISIBLE_DEVICES's "GPU-..." or a MIG
        instance's "MIG-...", NVML's too), else by its PCI address `pci` ("0000:18:00.0", server/devices.py
        `pci_address`) for a whole GPU only (a MIG instance's address is its GPU's: the whole GPU's memory is not
        the instance's); None where not measured (see the module's docstring)."""
        with self._lock:
            lib = self._start()
            if lib is None:
                return None
            key = (uuid, pci)
            if key not in self._handles:
                self._handles[key] = self._find(lib, uuid, pci)
            handle = self._handles[key]
            if handle is None:
                return None
            memory = _Memory()
            rc = lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory))
            if rc != SUCCESS:
                self._tell(lib, uuid, pci, rc, "nvmlDeviceGetMemoryInfo")
                return None
            return int(memory.free)

    def _find(self, lib: ctypes.CDLL, uuid: str, pci: str) -> ctypes.c_void_p | None:
        handle = ctypes.c_void_p()
        rc = lib.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(handle)) if uuid.isascii() else -1
        if rc == SUCCESS:
            return handle
        whole = not uuid.upper().startswith("MIG-")
        if whole and pci and pci.isascii():
            rc = lib.nvmlDeviceGetHandleByPciBusId_v2(pci.encode(), ctypes.byref(handle))
            if rc == SUCCESS:
                return handle
        self._tell(lib, uuid, pci, rc, "no GPU of this UUID" + (" nor PCI address" if whole and pci else ""))
        return None

    def _tell(self, lib: ctypes.CDLL, uuid: str, pci: str, rc: int, what: str) -> None:
        """One debug line per device and error (a heartbeat asks every ~2 s)."""
        if (uuid, pci, rc) not in self._told:
            self._told.add((uuid, pci, rc))
            log.debug(
                "free memory of GPU %s (%s) not measured by NVML: %s: %s", uuid, pci or "?", what, _error(lib, rc)
            )


def _error(lib: ctypes.CDLL, rc: int) -> str:
    try:
        text = lib.nvmlErrorString(rc) if rc >= 0 else None
    except (OSError, ValueError):  # (ctypes' "exception: access violation" on a broken library)
        text = None
    return f"{text.decode(errors='replace') if isinstance(text, bytes) else 'error'} ({rc})"


NVML = Nvml()  # the daemon front's
