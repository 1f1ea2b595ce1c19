"""The C++ client (`gpupool run --native-client`): a PrivateUse1 backend whose tensors are plain at::Tensors, recording
ops in C++ (rounds 12-13 a spike in spike/, round 14 an opt-in mode of the product; docs/native-client.md).

`native_client.cpp` is the whole backend (an allocator of handles with a C++ free list, a boxed fallback that infers
outputs with the Meta kernels and appends compact records, metadata-only views, uploads, syncs); this module loads it
(`load`; build.py builds it at first use, without importing torch: g++ and ninja through torch.utils.cpp_extension,
~1-2 min once, cached per torch version and source hash under gpupool.config.cache_dir("native-client"), built in a
private folder and moved into place atomically), names the device (`gpupool` by default) and decodes records for the
tests.
Wire mode (`connect`) sends the records to a daemon through client/session.py's Session, raises the shim's exceptions
at sync points, and sends what the C++ encoder cannot through a Python fallback (`_python_op`).

It must own PrivateUse1: run it in a process where the Python shim (gpupool.client.torch) has not registered the
device: `gpupool run --native-client` (gpupool.client.native.enable, at `import torch`), or a process with
TORCH_DEVICE_BACKEND_AUTOLOAD=0 set before `import torch` (the tests, the bench scripts). `load()` checks.

    TORCH_DEVICE_BACKEND_AUTOLOAD=0 python -c 'from gpupool.client.native import backend; backend.load()'
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import sys
import threading
import types
from pathlib import Path
from typing import Any

import torch

from gpupool import config, metas

from .. import inductor, rng, streams
from .build import BuildError, build, built_path, cache_dir, compiler_missing  # noqa: F401 (the build's names, here too)

metas.register()  # Meta kernels torch lacks: the C++ client infers each op's outputs on meta tensors (gpupool/metas.py)

NAME = "gpupool"  # the device's name (torch.utils.rename_privateuse1_backend)
STATS = (
    "allocated", "freed", "double_frees", "op_records", "uploads", "syncs", "free_records", "alloc_records", "bytes",
    "dropped_bytes", "meta_runs", "cache_hits", "view_outputs", "live", "free_pending", "cache_entries",
)  # fmt: skip
_loaded: list[bool] = []
_dll: list[Any] = []  # the library as ctypes.PyDLL loaded it (`_register_hand_off` calls into it with the GIL held)


def load(verbose: bool = False, name: str = NAME) -> None:
    """Build (once) and load the backend, and name PrivateUse1 `name`."""
    global NAME
    if _loaded:
        return
    if "gpupool.client.torch" in sys.modules:
        raise RuntimeError("the Python shim (gpupool.client.torch) is loaded in this process: it owns PrivateUse1")
    current = torch._C._get_privateuse1_backend_name()
    if current not in ("privateuseone", name):
        raise RuntimeError(f"PrivateUse1 is already {current!r} in this process")
    path = build(verbose)
    if current != name:
        torch.utils.rename_privateuse1_backend(name)
    NAME = name
    # checked as opened, loaded as opened: not torch.ops.load_library, whose realpath() names the file again
    _dll.append(config.load_private(path, ctypes.PyDLL))  # (PyDLL: its calls hold the GIL; the same dlopen)
    _register_module()
    _loaded.append(True)


def _register_module() -> None:
    """torch.gpupool: what torch's Python asks of a PrivateUse1 device's module (Module.to, the optimizers,
    autograd)."""
    mod = types.ModuleType(f"torch.{NAME}")
    funcs: dict[str, Any] = {
        "is_available": lambda: True,
        "device_count": lambda: int(torch.ops.gpupool_native.device_count()),
        "current_device": lambda: int(torch.ops.gpupool_native.current_device()),
        "set_device": lambda device: torch.ops.gpupool_native.set_current_device(_index(device)),
        "is_initialized": lambda: True,
        "_is_in_bad_fork": lambda: False,
        "_lazy_init": lambda: None,
        "manual_seed": lambda seed: None,
        "manual_seed_all": lambda seed: None,
        "get_amp_supported_dtype": lambda: [torch.float16, torch.bfloat16],
        "synchronize": lambda device=None: flush(),
        # streams and events, one ordered stream a device (client/streams.py): what FSDP2 asks of a mesh on gpupool
        **streams.module_functions(_synchronize),
        **rng.module_functions(),  # generator states on the daemon (client/rng.py): torch.random.fork_rng
    }
    for k, f in funcs.items():
        setattr(mod, k, f)
    mod.__getattr__ = functools.partial(inductor.device_attribute, NAME)  # type: ignore[method-assign]  # (client/inductor.py)
    torch._register_device_module(NAME, mod)
    rng.install()  # torch.random.fork_rng with this process's devices (client/rng.py `fork_rng`)


def _synchronize(device: Any = None) -> None:
    getattr(torch, NAME).synchronize(device)  # the module's own, which enable() replaces


def device(index: int = 0) -> torch.device:
    return torch.device(NAME, index)


def _index(device: Any) -> int:
    """A device argument's index (the current device for none)."""
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    index = None if device is None else torch.device(device).index
    return int(torch.ops.gpupool_native.current_device()) if index is None else int(index)


def stats() -> dict[str, int]:
    return dict(zip(STATS, torch.ops.gpupool_native.stats(), strict=True))


def configure(keep: bool = False, track: bool = False, cache: bool = True) -> None:
    """keep: keep records for take_records (else the null sink drops them); track: keep the live handles' set (set it
    before making tensors: a handle made before it is freed as a "double free"); cache: cache meta inference."""
    torch.ops.gpupool_native.configure(keep, track, cache)


def claim(functional: bool = True, foreach: bool = True) -> int:
    """Route more ops to the fallback (native_client.cpp `claim`): the functional/in-place forms of structured ops (else
    torch runs them as empty_strided + their out= form) and the _foreach_ ops (else a per-tensor loop). Once only."""
    return int(torch.ops.gpupool_native.claim(functional, foreach))


def reset_stats() -> None:
    torch.ops.gpupool_native.reset_stats()


def take_records() -> list[dict[str, Any]]:
    """The records kept since the last call, decoded (keep mode)."""
    raw = torch.ops.gpupool_native.take_records().numpy().tobytes()
    return decode(raw)


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.at = 0

    def take(self, fmt: str) -> Any:
        v = struct.unpack_from("<" + fmt, self.buf, self.at)
        self.at += struct.calcsize("<" + fmt)
        return v if len(v) > 1 else v[0]

    def raw(self, n: int) -> bytes:
        b = self.buf[self.at : self.at + n]
        self.at += n
        return b


def _geometry(r: _Reader) -> dict[str, Any]:
    dtype, ndim = r.take("BB")
    sizes = [r.take("q") for _ in range(ndim)]
    strides = [r.take("q") for _ in range(ndim)]
    return {"dtype": dtype, "sizes": sizes, "strides": strides, "offset": r.take("q")}


def _arg(r: _Reader) -> Any:
    tag = chr(r.take("B"))
    if tag == "T":
        h = r.take("Q")
        return {"handle": h, **_geometry(r)}
    if tag == "C":
        dtype, ndim = r.take("BB")
        sizes = [r.take("q") for _ in range(ndim)]
        n = r.take("Q")
        return {"cpu": r.raw(n), "dtype": dtype, "sizes": sizes}
    if tag == "N":
        return None
    if tag == "i":
        return r.take("q")
    if tag == "d":
        return r.take("d")
    if tag == "b":
        return bool(r.take("B"))
    if tag in "IDB":
        n = r.take("I")
        return [r.take({"I": "q", "D": "d", "B": "B"}[tag]) for _ in range(n)]
    if tag == "L":
        return [_arg(r) for _ in range(r.take("I"))]
    if tag == "s":
        return r.raw(r.take("I")).decode()
    if tag == "v":
        return ("device", r.take("b"), r.take("b"))
    if tag == "c":
        return complex(r.take("d"), r.take("d"))
    raise ValueError(f"unknown argument tag {tag!r}")


def decode(buf: bytes) -> list[dict[str, Any]]:
    """The records of a buffer: dicts with "kind" ("op", "upload", "sync", "free", "alloc") and their fields."""
    out: list[dict[str, Any]] = []
    r = _Reader(buf)
    names: dict[int, str] = {}
    while r.at < len(buf):
        length, kind = r.take("IB")
        end = r.at - 1 + length
        k = chr(kind)
        if k == "O":
            op_id, nargs = r.take("IB")
            if op_id not in names:
                names[op_id] = torch.ops.gpupool_native.op_name(op_id)
            args = [_arg(r) for _ in range(nargs)]
            nouts = r.take("B")
            outs = [r.take("Q") for _ in range(nouts)]
            out.append({"kind": "op", "op": names[op_id], "args": args, "outs": outs})
        elif k == "U":
            h = r.take("Q")
            geo = _geometry(r)
            n = r.take("Q")
            out.append({"kind": "upload", "handle": h, **geo, "data": r.raw(n)})
        elif k == "S":
            h = r.take("Q")
            out.append({"kind": "sync", "handle": h, **_geometry(r)})
        elif k == "F":
            n = r.take("I")
            out.append({"kind": "free", "handles": [r.take("Q") for _ in range(n)]})
        elif k == "A":
            h, n = r.take("QQ")
            out.append({"kind": "alloc", "handle": h, "nbytes": n})
        else:
            raise ValueError(f"unknown record kind {k!r}")
        if r.at != end:
            raise ValueError(f"record of kind {k!r} decoded to {r.at - end:+d} bytes off its length")
    return out


# ---- wire mode: records in the daemon's compact format, sent through a real session ----

WIRE_STATS = (
    "frames", "view_handles", "free_commands", "skipped_views", "storages", "pending", "python_ops", "view_args",
    "direct_frames",  # frames handed over by native_client.cpp's direct call (`_hand_off`), not the `send` operator
    "kept_moves",  # kept tensors a replay moved off a storage an alias the script keeps shares (`move_kept`)
)  # fmt: skip
_libs: list[Any] = []
_sessions: dict[int, Any] = {}  # device index -> its Session


class _Recording(threading.local):
    """`on` while the thread records a captured step (capture.py): a sync then sends its frame and raises CaptureError.
    False as a class default: a thread that never recorded reads it without a failed look-up (an AttributeError
    raised and swallowed, ~1.9k instructions a sync point: perf54b)."""

    on = False


RECORDING = _Recording()


def session(index: int) -> Any:
    """Device <index>'s Session (wire mode)."""
    return _sessions[index]


def refuse_in_recording(what: str) -> None:
    """CaptureError when the calling thread records a step (a replayed step cannot stop for the client)."""
    if RECORDING.on:
        from gpupool.client.capture_record import Recording

        Recording(None).refuse(what)


def connect(session: Any, ops: Any = None, python: bool = True, index: int = 0) -> None:
    """Send every op on gpupool:<index> from now on to `session` (client/session.py's Session, attached to a daemon;
    each device its own session, perhaps on another daemon) as compact records
    (docs/wire.md, "Compact eager ops"): the C++ side writes whole `ClientFrame.commands` entries and hands them over
    once per frame (every 32 commands, and at each sync): a full frame by a direct call of `_hand_off` below (round
    49; the `gpupool_native::send` operator with GPUPOOL_NATIVE_HAND_OFF=0), a sync's or a download's through the
    `sync_scalar` / `download` operators, whose Python implementations here put the bytes on the session's stream
    (`Session.send_commands`) after whatever the session itself queued. Errors are the shim's (`errors`): a daemon
    error surfaces at the next sync as a RemoteError (an OutOfMemoryError for a quota refusal, a DeviceLost for a
    lost session) naming the op.

    `ops`: the op names the C++ encoder sends (None: every op). With `python` (the default) every other op, and every
    op the C++ encoder cannot send (an argument the compact form lacks, outputs the Meta kernel cannot infer, a
    non-tensor return), goes to the Python fallback `_python_op`; without it such an op is an error naming it.
    Call after `load()`, before any tensor is made on the device; `ops` and `python` are the first call's.
    (client/torch/runtime.py's DeviceRuntime cannot be
    used: importing anything under gpupool.client.torch registers gpupool's device as PrivateUse1, which this
    process's spike owns.)"""
    from gpupool import compact, config, protocol

    codes = [-1] * 64
    for dtype, code in compact.DTYPE_CODES.items():
        codes[int(torch.ops.gpupool_native.scalar_type(torch.empty(0, dtype=dtype)))] = code
    formats = (torch.contiguous_format, torch.preserve_format, torch.channels_last, torch.channels_last_3d)
    torch.ops.gpupool_native.configure_wire(
        index, int(session.handle_base), None if ops is None else sorted(ops), codes,
        compact.LAYOUT_CODES[torch.strided], [compact.MEMORY_FORMAT_CODES[f] for f in formats], python,
        config.flush_ops(),  # $GPUPOOL_FLUSH_OPS: the Python client's parser, one bound, one message
        config.fused_sdpa(),  # $GPUPOOL_FUSED_SDPA: the same parser as the shim's (the C++ client reads no environment)
        protocol.FEATURE_SDPA_DROPOUT in getattr(session, "features", ()),  # its daemon runs dropout fused
    )  # fmt: skip
    # A tensor over the session's whole quota is refused at the call (native_client.cpp HandleAllocator), as on CUDA
    torch.ops.gpupool_native.set_quota(index, int(getattr(session, "quota_bytes", 0) or 0))
    if hasattr(session, "quota_hooks"):  # and the quota a refresh gives it (client/session.py `refresh`)
        session.quota_hooks.append(lambda quota: torch.ops.gpupool_native.set_quota(index, int(quota)))
    _sessions[index] = session
    if _libs:  # the hand-offs below serve every device (by index)
        return
    translate = errors().translate

    def send(frame: torch.Tensor, index: int) -> None:
        if frame.numel():  # after what the session queued itself, as one more frame of the same stream
            try:
                _sessions[index].send_commands(frame.numpy().tobytes())
            except Exception as exc:  # noqa: BLE001 - translated, or raised as it is
                raise translate(exc) from exc

    def sync_scalar(frame: torch.Tensor, index: int, handle: int) -> float:
        if RECORDING.on:
            send(frame, index)  # (what was recorded before still goes)
            refuse_in_recording("a sync point (.item(), bool(t), synchronize)")
        try:  # the frame's commands and the Sync as one frame, after what the session queued itself
            return float(_sessions[index].sync([handle], frame.numpy().tobytes() if frame.numel() else b"")[0])
        except Exception as exc:  # noqa: BLE001
            raise translate(exc) from exc

    def download(frame: torch.Tensor, index: int, handle: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        send(frame, index)
        refuse_in_recording("a sync point (.cpu(), printing, an op with data-dependent shapes)")
        try:
            return _sessions[index].download(handle, shape, dtype)  # type: ignore[no-any-return]
        except Exception as exc:  # noqa: BLE001
            raise translate(exc) from exc

    def download_into(frame: torch.Tensor, index: int, handle: int, out: torch.Tensor) -> None:
        """A download into `out` (`.cpu()`'s fresh tensor, a contiguous one of the same shape and dtype, not bool:
        native_client.cpp `wire_copy_`), the bytes received there instead of into new memory copied over after."""
        send(frame, index)
        refuse_in_recording("a sync point (.cpu(), printing, an op with data-dependent shapes)")
        try:
            # (detached: autograd's copy_ kernel, above this one, recorded the copy where `out` requires grad)
            _sessions[index].download(handle, tuple(out.shape), out.dtype, into=out.detach())
        except Exception as exc:  # noqa: BLE001
            raise translate(exc) from exc

    def upload(frame: torch.Tensor, index: int, handle: int, data: torch.Tensor) -> None:
        """An upload over 12 MiB (native_client.cpp `wire_big_upload`, kMaxUpload), or of 1 MiB or more outside a
        recorded step (kSideUpload, round 52): after the frame, as the Python client's go (the bulk side socket, or 4
        MiB chunks on the stream)."""
        send(frame, index)
        refuse_in_recording("an upload of more than 12 MiB")
        try:
            _sessions[index].upload(data, handle)
        except Exception as exc:  # noqa: BLE001
            raise translate(exc) from exc

    failed: dict[int, BaseException] = {}  # device index -> the error `_hand_off` caught, raised by `hand_off_failed`

    def _hand_off(frame: bytes, index: int) -> bool:
        """A frame from native_client.cpp's direct hand-off (`PyHandOff`: the frame as one bytes object, no operator,
        no tensor); True where send_commands raised: the error is kept, and the C++ side raises it next through the
        `hand_off_failed` operator, as `send`'s would have been (translated)."""
        try:
            _sessions[index].send_commands(frame)
            return False
        except BaseException as exc:  # noqa: BLE001 - raised by hand_off_failed, as `send` raises it
            failed[index] = exc
            return True

    def hand_off_failed(index: int) -> None:
        exc = failed.pop(index)
        raise translate(exc) from exc

    def over_quota(index: int, nbytes: int, quota: int) -> None:
        """A tensor larger than the session's whole memory quota, refused at the call (native_client.cpp
        HandleAllocator): the error a daemon's quota refusal is."""
        raise errors().over_quota(nbytes, quota, f"gpupool:{index}")

    def sync_near(index: int) -> None:
        """A sync after a frame whose tensors take the session past its quota (native_client.cpp `flush_frame`,
        reserve52): the daemon's refusal is raised here, at the call that made the tensor, as on CUDA."""
        if RECORDING.on:
            return
        try:
            _sessions[index].sync()
        except Exception as exc:  # noqa: BLE001
            raise translate(exc) from exc

    lib = torch.library.Library("gpupool_native", "IMPL")  # noqa: TOR901 (ops defined in C++, implemented here)
    lib.impl("send", send, "CPU")
    # (no tensor argument: no backend key to dispatch on; a CPU kernel was never reached, NotImplementedError)
    lib.impl("hand_off_failed", hand_off_failed, "CompositeExplicitAutograd")
    lib.impl("over_quota", over_quota, "CompositeExplicitAutograd")
    lib.impl("sync_near", sync_near, "CompositeExplicitAutograd")
    lib.impl("sync_scalar", sync_scalar, "CPU")
    lib.impl("download", download, "CPU")
    lib.impl("download_into", download_into, "CPU")
    lib.impl("upload", upload, "CPU")
    _libs.append(lib)
    # every frame from now on goes to `_hand_off` straight from C++ (0: CPython's functions not found there: `send`)
    _libs.append(_hand_off)  # (kept referenced here too: the C++ side holds a reference of its own)
    if _dll and os.environ.get("GPUPOOL_NATIVE_HAND_OFF", "1") != "0":  # 0: the operator (A/B, tests)
        _dll[0].gpupool_native_set_hand_off(ctypes.py_object(_hand_off))
    if python:
        fb = torch.library.Library("_", "IMPL")  # noqa: TOR901
        fb.fallback(lambda op, *args, **kwargs: _python_op(op, args, kwargs), "PrivateUse2")
        _libs.append(fb)
        # An op with a CompositeExplicitAutograd kernel never reaches that fallback: the kernel covers PrivateUse2 too.
        # Mostly harmless (it decomposes into ops that come back to the device), but convolution's two end in
        # *_overrideable, which only CPU/CUDA/MKLDNN have: a conv's backward failed. They go to `_python_op` by name.
        named = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - kernels for existing aten ops
        for name in ("convolution", "convolution_backward"):
            aten_op = getattr(torch.ops.aten, name).default
            named.impl(name, lambda *a, _op=aten_op, **k: _python_op(_op, a, k), "PrivateUse2")
        _libs.append(named)
        _gru_cell_metas()

    def synchronize(device: Any = None) -> None:
        """Every device's ops sent, then waits for the device's (None: every attached one's, as the Python client)."""
        flush()
        refuse_in_recording("a sync point (.item(), bool(t), synchronize)")
        indices = sorted(_sessions) if device is None else [_index(device)]
        try:
            for i in indices:
                if i in _sessions:
                    _sessions[i].sync()
        except Exception as exc:  # noqa: BLE001
            raise translate(exc) from exc

    getattr(torch, NAME).synchronize = synchronize


_errors: list[types.ModuleType] = []
_ID_BITS = (1 << 48) - 1  # a storage id's counter bits (native_client.cpp kIdMask; its top bits are the device's)


def _tensor_handle(t: torch.Tensor) -> tuple[Any, int] | None:
    """The Session and wire handle of a device tensor's storage (errors.clear_grads): the HandleAllocator's data
    pointer is the storage's id, its handle the session's base + the id's counter bits (native_client.cpp
    `Dev::handle`). None for a tensor of no session."""
    session = _sessions.get(t.device.index or 0) if t.device.type == NAME else None
    if session is None:
        return None
    return session, int(session.handle_base) + (t.untyped_storage().data_ptr() & _ID_BITS)


def errors() -> types.ModuleType:
    """The shim's error classes and `translate` (client/torch/errors.py: RemoteError, OutOfMemoryError, DeviceLost),
    loaded from its file: `import gpupool.client.torch.errors` would run that package's `__init__`, which registers
    gpupool's device as PrivateUse1 (this process's spike owns it). The module needs only grpc, torch and
    gpupool.errors, so the spike raises the very classes (by name, bases and fields) a shim user catches."""
    if not _errors:
        import importlib.util

        import gpupool.client  # the package (session.py's), whose `__init__` registers nothing

        path = Path(gpupool.client.__file__).resolve().parent / "torch" / "errors.py"
        spec = importlib.util.spec_from_file_location("gpupool_native_errors", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.__dict__["tensor_handle"] = _tensor_handle  # (`clear_grads`: the tensors of this client's sessions)
        _errors.append(mod)
    return _errors[0]


# ---- the Python fallback: what the C++ encoder cannot send ----

PYTHON_STATS = {"remote": 0, "cpu": 0}  # ops the Python fallback sent as an `Op`, and ran on the CPU around a sync


class _OnCpu(Exception):
    """The op cannot be sent as an `Op` (no meta inference, a non-tensor return, an argument the wire lacks)."""


def _on_device(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == NAME


def _arg_value(sch: Any, i: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a = sch.arguments[i]
    if a.kwarg_only or i >= len(args):
        return kwargs.get(a.name, a.default_value)
    return args[i]


def _aliased_arg(sch: Any, ret: Any) -> int:
    """The argument a return aliases (the same alias set in the schema), or -1."""
    if ret.alias_info is None:
        return -1
    for i, a in enumerate(sch.arguments):
        if a.alias_info is not None and a.alias_info.before_set & ret.alias_info.before_set:
            return i
    return -1


def _gru_cell_metas() -> None:
    """Meta kernels of nn.GRU's fused cell and its backward, which torch lacks (and a CPU kernel: `_metas` would send
    them to `_on_cpu`, where they failed with NotImplementedError: nn.GRU did not run on the C++ client until round
    32). Shapes of CUDA's kernels (aten/src/ATen/native/cuda/RNN.cu: a workspace of 5 hidden sizes), which the daemon's
    fallback keeps (server/fallbacks.py)."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("aten::_thnn_fused_gru_cell", "Meta"):
        return

    def cell(igates: torch.Tensor, hgates: torch.Tensor, hx: torch.Tensor, *_: Any) -> tuple[torch.Tensor, ...]:
        return torch.empty_like(hx), hx.new_empty((hx.size(0), hx.size(1) * 5))

    def backward(grad_hy: torch.Tensor, workspace: torch.Tensor, has_bias: bool) -> tuple[Any, ...]:
        gates = workspace.new_empty((workspace.size(0), workspace.size(1) // 5 * 3))
        grads = (gates, torch.empty_like(gates), torch.empty_like(grad_hy))
        if has_bias:
            return (*grads, gates.new_empty(gates.size(1)), gates.new_empty(gates.size(1)))
        return (*grads, None, None)

    lib = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - kernels for existing aten ops
    lib.impl("_thnn_fused_gru_cell", cell, "Meta")
    lib.impl("_thnn_fused_gru_cell_backward", backward, "Meta")
    _libs.append(lib)


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    if t.storage_offset() == 0:
        return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="meta")
    n = -(-t.untyped_storage().nbytes() // t.element_size())
    return torch.empty(n, dtype=t.dtype, device="meta").as_strided(t.size(), t.stride(), t.storage_offset())


def _python_op(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An op the C++ encoder does not send (native_client.cpp `python_fallback`, through PrivateUse2): as a protobuf
    `Op` with the session's own encoder (gpupool/wire.py `encode_arg`: strings, complex numbers, any list) when the
    Meta kernel can say its outputs; else on the CPU around a sync, as the shim's `cpu_fallback` (inputs read back,
    written inputs written back, new outputs uploaded): data-dependent shapes (nonzero, masked_select), non-tensor
    returns (equal), no Meta kernel."""
    index = _op_index(args, kwargs)
    try:
        out = _as_op(op, args, kwargs, index)
        PYTHON_STATS["remote"] += 1
        return out
    except _OnCpu:
        PYTHON_STATS["cpu"] += 1
        return _on_cpu(op, args, kwargs, index)


def _op_index(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The device an op runs on (as native_client.cpp `op_index`, which checked that its tensors share one): its first
    device tensor's, else its device argument's, else the current device."""
    from torch.utils._pytree import tree_leaves

    leaves = tree_leaves((args, kwargs))
    for x in leaves:
        if _on_device(x):
            return int(x.device.index)
    for x in leaves:
        if isinstance(x, torch.device) and x.type == NAME and x.index is not None:
            return int(x.index)
    return int(torch.ops.gpupool_native.current_device())


def _upload_cpu(v: Any, index: int) -> Any:
    """CPU tensors (other than 0-dim ones, which travel inline) moved to the device, as the shim's `localize`."""
    dev = device(index)
    if isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.dim() > 0:
        return v.to(dev)
    if isinstance(v, list | tuple) and any(isinstance(x, torch.Tensor) and x.device.type == "cpu" for x in v):
        return type(v)(x.to(dev) if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x for x in v)
    return v


_META: dict[Any, list[Any] | None] = {}  # (op, arguments' key) -> the outputs' meta tensors, None: the CPU path
_META_MAX = 4096


def _key(v: Any) -> Any:
    """An argument in the meta cache's key: a tensor by where it is and its geometry, lists by their items, anything
    else by value (TypeError: not hashable, no caching)."""
    if isinstance(v, torch.Tensor):
        return (v.device.type, v.dtype, tuple(v.size()), tuple(v.stride()), v.storage_offset())
    if isinstance(v, list | tuple):
        return tuple(_key(x) for x in v)
    hash(v)
    return (type(v), v)


def _metas(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The op's outputs run on Meta (cached by `_key`); raises _OnCpu where Meta cannot say."""
    from torch.utils._pytree import tree_map

    try:
        key: Any = (op, _key(args), _key(tuple(sorted(kwargs.items()))))
    except TypeError:
        key = None
    if key is not None and key in _META:
        hit = _META[key]
        if hit is None:
            raise _OnCpu
        return hit

    def meta(x: Any) -> Any:
        if _on_device(x):
            return _to_meta(x)
        if isinstance(x, torch.device) and x.type == NAME:
            return torch.device("meta")
        return x

    try:
        mout = op(*tree_map(meta, args), **tree_map(meta, kwargs))
        metas: list[Any] | None = list(mout) if isinstance(mout, tuple) else [mout]
    except Exception:  # noqa: BLE001 - data-dependent shapes, no Meta kernel: the CPU says
        metas = None
    if key is not None:
        if len(_META) >= _META_MAX:
            _META.clear()
        _META[key] = metas
    if metas is None:
        raise _OnCpu
    return metas


def _as_op(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], index: int) -> Any:
    from gpupool import protocol, wire
    from gpupool._proto import device_pb2, tensor_pb2

    sch = op._schema
    for r in sch.returns:
        if str(r.type) not in ("Tensor", "Tensor?", "List[Tensor]"):
            raise _OnCpu
    args = tuple(_upload_cpu(v, index) for v in args)
    kwargs = {k: _upload_cpu(v, index) for k, v in kwargs.items()}

    metas = _metas(op, args, kwargs)
    _reshape_out_views(sch, metas, args, kwargs)  # before the encoder names them
    gpu_dev = tensor_pb2.Arg(device=tensor_pb2.DeviceRef(type="gpupool", index=-1))

    def encode(v: Any) -> tensor_pb2.Arg:
        if _on_device(v):
            return tensor_pb2.Arg(tensor=int(torch.ops.gpupool_native.wire_handle(v)))
        if isinstance(v, torch.Tensor):  # 0-dim on the CPU
            return tensor_pb2.Arg(inline=wire.inline_to_proto(v))
        if isinstance(v, torch.device) and v.type == NAME:
            return gpu_dev
        if isinstance(v, list | tuple) and v and all(x is None or isinstance(x, torch.Tensor) for x in v):
            if not all(x is None or _on_device(x) for x in v):
                raise _OnCpu
            hs = [0 if x is None else int(torch.ops.gpupool_native.wire_handle(x)) for x in v]
            return tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=hs))
        try:
            return wire.encode_arg(v, _no_tensor)
        except Exception as exc:  # noqa: BLE001 - a Generator, a Storage: not on the wire
            raise _OnCpu from exc

    # Every record the encoder makes (view handles, held-back empties, uploads above) goes into the C++ buffer
    # before the op's command, which follows them there.
    wargs = [encode(v) for v in args]
    wkwargs = {k: encode(v) for k, v in kwargs.items()}
    results: list[Any] = []
    new: list[torch.Tensor] = []
    slots: list[int] = []  # per output: the index in `new`, or -1 (a written or viewed input, None)
    resized: list[tuple[torch.Tensor, torch.Tensor]] = []
    for ret, m in zip(sch.returns, metas, strict=True):
        j = _aliased_arg(sch, ret)
        src = _arg_value(sch, j, args, kwargs) if j >= 0 else None
        ms = m if isinstance(m, list | tuple) else [m]
        srcs = src if isinstance(src, list | tuple) else [src] * len(ms)
        outs: list[Any] = []
        for mt, s in zip(ms, srcs, strict=True):
            if mt is None:
                outs.append(None)
                slots.append(-1)
            elif ret.alias_info is not None and ret.alias_info.is_write:
                if s.size() != mt.size() or s.stride() != mt.stride():  # out= resized: so is the daemon's tensor
                    resized.append((s, mt))
                outs.append(s)
                slots.append(-1)
            elif ret.alias_info is not None:  # a view of an input: its storage's, no record of its own
                if s is None or s.dtype != mt.dtype:
                    raise _OnCpu
                outs.append(s.as_strided(mt.size(), mt.stride(), mt.storage_offset()))
                slots.append(-1)
            else:
                if mt.storage_offset() != 0:
                    raise _OnCpu
                t = torch.ops.gpupool_native.new_output(mt.size(), mt.stride(), mt.dtype, index)
                slots.append(len(new))
                new.append(t)
                outs.append(t)
        results.append(outs if isinstance(m, list | tuple) else outs[0])
    handles = torch.ops.gpupool_native.adopt(new, False)
    cmd = device_pb2.Command()
    o = cmd.op
    o.name = op.name()
    o.args.extend(wargs)
    for k, v in wkwargs.items():
        o.kwargs[k].CopyFrom(v)
    o.outputs.extend([0 if i < 0 else handles[i] for i in slots])
    raw = cmd.SerializeToString()
    entry = bytearray(protocol.FRAME_COMMANDS_TAG + protocol.varint(len(raw)) + raw)
    torch.ops.gpupool_native.append_command(torch.frombuffer(entry, dtype=torch.uint8), index)
    torch.ops.gpupool_native.adopt(new, True)
    for s, mt in resized:
        torch.ops.gpupool_native.resize_output(s, mt.size(), mt.stride())
    return tuple(results) if len(results) != 1 else results[0]


def _reshape_out_views(sch: Any, metas: list[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """An out= argument that is a view of part of its storage and that the op resizes (torch.fft.fftfreq writes the
    negative half with arange into a slice of its output): the CPU's resize_ gives such a view the new geometry in
    place, over the same storage and offset, when it fits there; so does this, on the client's tensor, before the op
    is encoded: the op then names the view with its new geometry and the daemon's kernel finds it sized already. A
    view that would outgrow its storage, and a whole storage, go on to resize_output (which refuses the first)."""
    for ret, m in zip(sch.returns, metas, strict=True):
        if ret.alias_info is None or not ret.alias_info.is_write:
            continue
        j = _aliased_arg(sch, ret)
        src = _arg_value(sch, j, args, kwargs) if j >= 0 else None
        ms = m if isinstance(m, list | tuple) else [m]
        srcs = src if isinstance(src, list | tuple) else [src] * len(ms)
        for mt, s in zip(ms, srcs, strict=True):
            if mt is None or not _on_device(s) or (s.size() == mt.size() and s.stride() == mt.stride()):
                continue
            storage = s.untyped_storage().nbytes()
            if s.storage_offset() == 0 and _extent(s.size(), s.stride()) * s.element_size() == storage:
                continue  # the whole storage: resize_output
            if (s.storage_offset() + _extent(mt.size(), mt.stride())) * s.element_size() <= storage:
                s.as_strided_(mt.size(), mt.stride(), s.storage_offset())


def _extent(size: Any, stride: Any) -> int:
    """The elements a geometry spans from its offset on (0 for an empty tensor)."""
    if any(n == 0 for n in size):
        return 0
    return 1 + sum((n - 1) * st for n, st in zip(size, stride, strict=True))


def _no_tensor(t: torch.Tensor) -> Any:
    raise _OnCpu


def _on_cpu(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], index: int) -> Any:
    """Run the op on the CPU with its device inputs read back (a sync each), written inputs written back, new
    tensors uploaded; what the shim's `cpu_fallback` does."""
    from torch.utils._pytree import tree_map

    fetched: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def fetch(x: Any) -> Any:
        if _on_device(x):
            c = x.cpu()
            fetched[id(c)] = (x, c)
            return c
        if isinstance(x, torch.device) and x.type == NAME:
            return torch.device("cpu")
        return x

    cargs = tree_map(fetch, args)
    ckwargs = tree_map(fetch, kwargs)
    out = op(*cargs, **ckwargs)
    sch = op._schema
    for i, a in enumerate(sch.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = _arg_value(sch, i, cargs, ckwargs)
            for c in v if isinstance(v, list | tuple) else [v]:
                if isinstance(c, torch.Tensor) and id(c) in fetched:
                    x = fetched[id(c)][0]
                    if x.size() != c.size():  # an out= argument the CPU kernel resized (linalg.lstsq's empty outputs)
                        x.resize_(c.size())  # an op on the daemon too: its tensor takes the new size, the same handle
                    x.copy_(c)
    dev = device(index)
    asked = kwargs.get("device")
    to_cpu = asked is not None and torch.device(asked).type == "cpu"

    def back(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if id(x) in fetched:
                return fetched[id(x)][0]
            return x if to_cpu else x.to(dev)
        return x

    return tree_map(back, out)


def flush() -> None:
    """Send the records buffered so far (wire mode)."""
    torch.ops.gpupool_native.flush()


def wire_stats() -> dict[str, int]:
    return dict(zip(WIRE_STATS, torch.ops.gpupool_native.wire_stats(), strict=True))


# The ops of launch_bound.py's tiny MLP training step (Adam, foreach), as the claimed fallback records them: the op set
# the daemon-backed spike sends (bench/native_client_daemon.py). The internal records (empty_strided, copy_,
# as_strided) are always allowed.
TINY_MLP_OPS = (
    "aten::_foreach_add_.Scalar", "aten::_foreach_addcdiv_.ScalarList", "aten::_foreach_addcmul_.Scalar",
    "aten::_foreach_div_.ScalarList", "aten::_foreach_lerp_.Scalar", "aten::_foreach_mul_.Scalar",
    "aten::_foreach_sqrt", "aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::addmm",
    "aten::fill_.Scalar", "aten::mm", "aten::nll_loss_backward", "aten::nll_loss_forward", "aten::relu",
    "aten::sum.dim_IntList", "aten::threshold_backward", "aten::zero_",
)  # fmt: skip

# What launch_bound.py's encoder adds to the tiny MLP's set (dropout's two ops only in train mode; native_layer_norm
# since the fallback claims it whole, round 16; the fused attention where the backend choice takes it, round 21).
ENCODER_OPS = (
    "aten::native_dropout", "aten::native_dropout_backward",
    "aten::_scaled_dot_product_fused_attention_overrideable",
    "aten::_scaled_dot_product_fused_attention_overrideable_backward",
    "aten::_softmax", "aten::_softmax_backward_data", "aten::add.Tensor", "aten::add_.Tensor", "aten::addcmul",
    "aten::all.dim", "aten::bmm", "aten::copy_", "aten::div.Tensor", "aten::embedding_dense_backward",
    "aten::index_select", "aten::isneginf", "aten::mean.dim", "aten::mul.Tensor", "aten::native_batch_norm",
    "aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::select_backward", "aten::where.self_out",
)  # fmt: skip
