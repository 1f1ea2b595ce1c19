"""The native device guard: `native_guard.cpp`, compiled at first use, replaces torch's Python device guard.

torch's C++ asks the device guard of `gpupool` (PrivateUse1) for the current device and stream ~3 times per eager op
(the autograd engine, InputMetadata, guards around kernels). The guard torch's Python-backend setup registers answers
each call through pybind's override lookup (GIL, attribute lookup, a Python call): 5-9 % of the client's instructions.
The C++ guard answers for ~100 instructions a call, and answers for every device the process can name: the calling
thread's current device (the one gpupool's own api.current_index reads: one variable), deviceCount = the devices the
process can name, each device's default stream, no events. torch's Python guard can only say "one device, index 0"
(its pybind class lets Python override `type_` alone), so without this guard torch.accelerator's current index stays 0;
the autograd engine works with either (backend.py runs backward on the calling thread).

It is optional. `install()` (from `backend.register`, after torch's Python setup) compiles the source shipped in this
package with the system's C++ compiler (`$CXX`, else `c++`) against the installed torch's headers and libc10 (~1.5 s,
once), into a per-user cache keyed by torch's version and the source's hash (`$GPUPOOL_NATIVE_CACHE`, default
`$XDG_CACHE_HOME/gpupool/native` or `~/.cache/gpupool/native`), under a file lock so that processes starting together
build it once. Without a compiler, or when the build fails, torch's Python guard stays and one log line says why;
`GPUPOOL_NATIVE=0` keeps the Python guard without trying. Nothing is downloaded: only the shipped source is compiled.

The same library answers torch's choice of `scaled_dot_product_attention`'s backend for the device (torch asks a C++
dispatch stub; native_guard.cpp `gpupool_sdp_choice`, client/sdpa_choice.h): the fused `overrideable` backend, one op
record a call that the daemon runs fused (server/attention.py), where the call allows it and, for a call with
dropout, the device's daemon names the "sdpa_dropout" feature (`device_attached`), else torch's math path.
Without the native guard, or with `GPUPOOL_FUSED_SDPA=0`, it is always the math path.

    python -c 'from gpupool.client.torch import native; print(native.build())'   # build now (scripts/setup.sh)
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from gpupool import config

from ..cbuild import BuildError as BuildError  # the guard's build failed (tests, callers name it here)
from ..cbuild import build_cached, cache_dir, compiler

log = logging.getLogger("gpupool.torch")

SOURCE = Path(__file__).with_name("native_guard.cpp")
HEADER = Path(__file__).parent.parent / "sdpa_choice.h"  # shared with the C++ client: part of the build key
_loaded: list[Any] = []  # the ctypes library once loaded and registered
_thread = threading.local()  # the current device of each thread while torch's Python guard is in place


def _python_current_device() -> int:
    return getattr(_thread, "index", 0)


def _python_set_current_device(index: int) -> int:
    if not 0 <= index <= 127:  # c10's DeviceIndex is a signed byte: the C++ guard's range
        return -1
    _thread.index = index
    return 0


# The calling thread's current gpupool device, and its setter (0, or -1 for an index out of 0..127): the C++ guard's own
# thread-local variable once it is installed (torch's guards, torch.accelerator and gpupool read the same one), else a
# threading.local. api.current_index/set_device are the public face.
current_device: Any = _python_current_device
set_current_device: Any = _python_set_current_device


def enabled() -> bool:
    """False when `GPUPOOL_NATIVE=0` asks for torch's Python device guard."""
    return os.environ.get("GPUPOOL_NATIVE", "1").strip() != "0"


def _torch_dir() -> Path:
    return Path(torch.__file__).resolve().parent


def library_path() -> Path:
    """Where the built guard lives: one file per (torch build, C++ ABI, machine, source)."""
    key = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.git_version), str(torch._C._GLIBCXX_USE_CXX11_ABI),
                 platform.machine(), str(_torch_dir())):  # fmt: skip
        key.update(part.encode() + b"\0")
    key.update(SOURCE.read_bytes() + b"\0" + HEADER.read_bytes())  # an edit of either rebuilds
    version = "".join(c if c.isalnum() or c in ".-" else "_" for c in torch.__version__)
    return cache_dir() / f"guard-{version}-{key.hexdigest()[:16]}.so"


def compile_command(out: Path) -> list[str]:
    tdir = _torch_dir()
    cmd = [*compiler(), "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           f"-I{tdir / 'include'}", f"-I{HEADER.parent}", "-o", str(out), str(SOURCE), f"-L{tdir / 'lib'}",
           "-lc10", "-ltorch_cpu",
           f"-Wl,-rpath,{tdir / 'lib'}"]  # fmt: skip
    if sys.platform.startswith("linux"):
        cmd.append("-Wl,--no-undefined")  # a missing symbol fails the build, not the load
    return cmd


def build() -> Path:
    """The built guard's path, compiling it first if the cache has none (under a lock; atomic rename)."""
    return build_cached(library_path(), compile_command, "the native device guard")


def install() -> bool:
    """Put the native guard in torch's registry for PrivateUse1, replacing the Python guard; True if it is there.
    Never raises (but for a bad $GPUPOOL_FUSED_SDPA: gpupool/config.py `fused_sdpa`'s one line): on any failure
    torch's Python guard stays and one line is logged."""
    if _loaded:
        return active()
    fused = fused_attention_default()  # before anything: a bad value is the user's error, not a failed build
    if not enabled():
        log.info("gpupool: GPUPOOL_NATIVE=0: torch's Python device guard stays (slower per op)")
        return False
    global current_device, set_current_device
    try:
        path = build()
        lib = config.load_private(path, ctypes.CDLL)  # checked as opened, loaded as opened
        for name in ("gpupool_current_device", "gpupool_set_current_device", "gpupool_set_device_count",
                     "gpupool_set_fused_sdp", "gpupool_set_capturing", "gpupool_set_sdp_dropout"):  # fmt: skip
            getattr(lib, name).restype = ctypes.c_int
        lib.gpupool_set_sdp_dropout.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.gpupool_set_current_device.argtypes = [ctypes.c_int]
        lib.gpupool_set_device_count.argtypes = [ctypes.c_int]
        lib.gpupool_set_fused_sdp.argtypes = [ctypes.c_int]
        lib.gpupool_set_capturing.argtypes = [ctypes.c_int]
        lib.gpupool_set_current_device(_python_current_device())  # keep what was set before the guard came
        lib.gpupool_register_guard()
        lib.gpupool_set_fused_sdp(int(fused))
        lib.gpupool_register_sdp_choice()  # scaled_dot_product_attention's fused backend (native_guard.cpp)
    except Exception as exc:  # BuildError, a broken cache file, an ABI mismatch: the Python guard still works
        log.warning("gpupool: native device guard unavailable, torch's Python device guard stays (slower per op; "
                    "GPUPOOL_NATIVE=0 skips this): %s", exc)  # fmt: skip
        return False
    _loaded.append(lib)
    current_device, set_current_device = lib.gpupool_current_device, lib.gpupool_set_current_device
    return active()


def library() -> Any:
    """The loaded guard (its ctypes library), or None before `install` or where it failed."""
    return _loaded[0] if _loaded else None


def fused_attention_default() -> bool:
    """False when `GPUPOOL_FUSED_SDPA=0` asks for torch's math path of scaled_dot_product_attention on gpupool
    (gpupool/config.py `fused_sdpa`, the C++ client's parser too: a bad value raises one line naming it)."""
    return config.fused_sdpa()


def set_fused_attention(on: bool) -> bool:
    """Whether `scaled_dot_product_attention` on gpupool may take the fused backend (one record a call, run fused by
    the daemon: server/attention.py) from now on; returns the previous setting. Without the native guard it is always
    torch's math path (False)."""
    if not _loaded:
        return False
    return bool(_loaded[0].gpupool_set_fused_sdp(int(bool(on))))


def device_attached(index: int, session: Any, count: int) -> None:
    """Device `index` now drives `session` (client/session.py): raise deviceCount to `count`, and let its
    scaled_dot_product_attention calls with dropout take the fused op only where its daemon names the
    "sdpa_dropout" feature (AttachReply.features; a daemon from before round 24 names none, and one from before
    round 23 refuses them), else torch's math path, with the same bits."""
    from gpupool import protocol

    set_device_count(count)
    if _loaded:
        on = protocol.FEATURE_SDPA_DROPOUT in getattr(session, "features", ())
        _loaded[0].gpupool_set_sdp_dropout(int(index), int(on))


def set_capturing(on: bool) -> bool:
    """Whether the calling thread records a captured step (client/torch/capture.py), where scaled_dot_product_attention
    with dropout takes torch's math path (native_guard.cpp `t_capturing`: the daemon traces its aten calls into the
    graph; the fused dropout call would be a Python callback there); returns the previous setting. Per thread: another
    thread's eager calls keep the fused op."""
    if not _loaded:
        return False
    return bool(_loaded[0].gpupool_set_capturing(int(bool(on))))


def set_device_count(count: int) -> None:
    """Raise the guard's deviceCount to `count` (it never shrinks); nothing while torch's Python guard (count 1) is in
    place."""
    if _loaded:
        _loaded[0].gpupool_set_device_count(int(count))


def active() -> bool:
    """True if torch's registry holds the native guard for PrivateUse1 now."""
    return bool(_loaded) and bool(_loaded[0].gpupool_guard_active())
