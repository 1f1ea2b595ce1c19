"""A C++ client spike (round 12): a PrivateUse1 backend whose tensors are plain at::Tensors, recording ops in C++.

`native_client.cpp` is the whole backend (an allocator of handles with a C++ free list, a boxed fallback that infers
outputs with the Meta kernels and appends compact records, metadata-only views, uploads, zero-filled syncs); this
module builds it at first use with torch.utils.cpp_extension.load (g++ and ninja, ~1-2 min, cached under
`$SPIKE_BUILD_DIR`, default ~/.cache/gpupool/spike), names the device `spike` and decodes records for the tests.

It must own PrivateUse1: run it in a process that has not registered gpupool's device, i.e. with
TORCH_DEVICE_BACKEND_AUTOLOAD=0 set before `import torch` and without importing gpupool.torch. `load()` checks.

    cd spike && TORCH_DEVICE_BACKEND_AUTOLOAD=0 python -c 'import native_client as n; n.load()'
"""

from __future__ import annotations

import os
import shutil
import struct
import types
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("native_client.cpp")
NAME = "spike"  # the device's name (torch.utils.rename_privateuse1_backend)
STATS = (
    "allocated", "freed", "double_frees", "op_records", "uploads", "syncs", "free_records", "alloc_records", "bytes",
    "dropped_bytes", "meta_runs", "cache_hits", "view_outputs", "live", "free_pending", "cache_entries",
)  # fmt: skip
_loaded: list[bool] = []


def compiler_missing() -> str | None:
    """Why the backend cannot be built here, or None."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')} not on PATH)"
    if shutil.which("ninja") is None:
        return "no ninja (torch.utils.cpp_extension needs it)"
    return None


def load(verbose: bool = False) -> None:
    """Build (once) and load the backend, and name PrivateUse1 `spike`."""
    if _loaded:
        return
    if os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD") != "0":
        raise RuntimeError("set TORCH_DEVICE_BACKEND_AUTOLOAD=0 before importing torch: gpupool's package would "
                           "register itself as PrivateUse1 at `import torch`")  # fmt: skip
    name = torch._C._get_privateuse1_backend_name()
    if name not in ("privateuseone", NAME):
        raise RuntimeError(f"PrivateUse1 is already {name!r} in this process")
    if name != NAME:
        torch.utils.rename_privateuse1_backend(NAME)
    why = compiler_missing()
    if why:
        raise RuntimeError(f"cannot build the spike backend: {why}")
    from torch.utils import cpp_extension

    build = Path(os.environ.get("SPIKE_BUILD_DIR", Path.home() / ".cache" / "gpupool" / "spike"))
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="gpupool_spike_client",
        sources=[str(SOURCE)],
        extra_cflags=["-O2"],
        build_directory=str(build),
        is_python_module=False,
        verbose=verbose,
    )
    _register_module()
    _loaded.append(True)


def _register_module() -> None:
    """torch.spike: what torch's Python asks of a PrivateUse1 device's module (Module.to, the optimizers, autograd)."""
    mod = types.ModuleType(f"torch.{NAME}")
    funcs: dict[str, Any] = {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "is_initialized": lambda: True,
        "_is_in_bad_fork": lambda: False,
        "_lazy_init": lambda: None,
        "manual_seed": lambda seed: None,
        "manual_seed_all": lambda seed: None,
        "get_amp_supported_dtype": lambda: [torch.float16, torch.bfloat16],
    }
    for k, f in funcs.items():
        setattr(mod, k, f)
    torch._register_device_module(NAME, mod)


def device() -> torch.device:
    return torch.device(NAME, 0)


def stats() -> dict[str, int]:
    return dict(zip(STATS, torch.ops.spike_client.stats(), strict=True))


def configure(keep: bool = False, track: bool = False, cache: bool = True) -> None:
    """keep: keep records for take_records (else the null sink drops them); track: keep the live handles' set (set it
    before making tensors: a handle made before it is freed as a "double free"); cache: cache meta inference."""
    torch.ops.spike_client.configure(keep, track, cache)


def claim(functional: bool = True, foreach: bool = True) -> int:
    """Route more ops to the fallback (native_client.cpp `claim`): the functional/in-place forms of structured ops (else
    torch runs them as empty_strided + their out= form) and the _foreach_ ops (else a per-tensor loop). Once only."""
    return int(torch.ops.spike_client.claim(functional, foreach))


def reset_stats() -> None:
    torch.ops.spike_client.reset_stats()


def take_records() -> list[dict[str, Any]]:
    """The records kept since the last call, decoded (keep mode)."""
    raw = torch.ops.spike_client.take_records().numpy().tobytes()
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
                names[op_id] = torch.ops.spike_client.op_name(op_id)
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

WIRE_STATS = ("frames", "view_handles", "free_commands", "skipped_views", "storages", "pending")
_libs: list[Any] = []


def connect(session: Any, ops: Any) -> None:
    """Send every op from now on to `session` (client/session.py's Session, attached to a daemon) as compact records
    (docs/wire.md, "Compact eager ops"): the C++ side writes whole `ClientFrame.commands` entries and hands them over
    once per frame (every 32 commands, and at each sync) through the `spike_client::send` / `sync_scalar` / `download`
    operators, whose Python implementations here put the bytes on the session's stream after whatever the session
    itself queued. Ops not named in `ops` are refused with an error naming them. Call after `load()`, before any
    tensor is made on the device. (client/torch/runtime.py's DeviceRuntime cannot be used: importing anything under
    gpupool.client.torch registers gpupool's device as PrivateUse1, which this process's spike owns.)"""
    from gpupool import compact

    codes = [-1] * 64
    for dtype, code in compact.DTYPE_CODES.items():
        codes[int(torch.ops.spike_client.scalar_type(torch.empty(0, dtype=dtype)))] = code
    formats = (torch.contiguous_format, torch.preserve_format, torch.channels_last, torch.channels_last_3d)
    torch.ops.spike_client.configure_wire(
        int(session.handle_base), sorted(ops), codes, compact.LAYOUT_CODES[torch.strided],
        [compact.MEMORY_FORMAT_CODES[f] for f in formats],
    )  # fmt: skip

    def send(frame: torch.Tensor) -> None:
        if frame.numel():  # after what the session queued itself, as one more frame of the same stream
            session.send_commands(frame.numpy().tobytes())

    def sync_scalar(frame: torch.Tensor, handle: int) -> float:
        send(frame)
        return float(session.sync([handle])[0])

    def download(frame: torch.Tensor, handle: int) -> torch.Tensor:
        send(frame)
        return session.download(handle)  # type: ignore[no-any-return]

    lib = torch.library.Library("spike_client", "IMPL")  # noqa: TOR901 (ops defined in C++, implemented here)
    lib.impl("send", send, "CPU")
    lib.impl("sync_scalar", sync_scalar, "CPU")
    lib.impl("download", download, "CPU")
    _libs.append(lib)


def flush() -> None:
    """Send the records buffered so far (wire mode)."""
    torch.ops.spike_client.flush()


def wire_stats() -> dict[str, int]:
    return dict(zip(WIRE_STATS, torch.ops.spike_client.wire_stats(), strict=True))


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

# What launch_bound.py's encoder adds to the tiny MLP's set (dropout's two ops only in train mode).
ENCODER_OPS = (
    "aten::native_dropout", "aten::native_dropout_backward",
    "aten::_softmax", "aten::_softmax_backward_data", "aten::add.Tensor", "aten::add_.Tensor", "aten::addcmul",
    "aten::all.dim", "aten::bmm", "aten::copy_", "aten::div.Tensor", "aten::embedding_dense_backward",
    "aten::index_select", "aten::isneginf", "aten::mean.dim", "aten::mul.Tensor", "aten::native_batch_norm",
    "aten::native_layer_norm_backward", "aten::select_backward", "aten::where.self_out",
)  # fmt: skip
