"""Values and tensors <-> protobuf: the one serde module shared by the daemon and the clients.

Everything that crosses the wire is data: dtypes and enums by name, numbers, lists, tensor handles and
raw little-endian tensor bytes. Decoding never evaluates or unpickles anything. The protocol's constants and
hand-built frames, which need no torch (the scheduler and leasing never load it), are in `gpupool.protocol`.
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from gpupool._proto import device_pb2, tensor_pb2
from gpupool.errors import InvalidArgument
from gpupool.protocol import CHUNK_BYTES as CHUNK_BYTES  # re-exported: largest upload/download chunk
from gpupool.protocol import varint as varint  # re-exported: frames built by hand elsewhere use wire.varint

INLINE_MAX_BYTES = 64 * 1024  # largest tensor carried by value inside an op
MAX_STRING_ARG = 256
DTYPES: dict[torch.dtype, tensor_pb2.DType.ValueType] = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float64: tensor_pb2.DTYPE_FLOAT64,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.int8: tensor_pb2.DTYPE_INT8,
    torch.int16: tensor_pb2.DTYPE_INT16,
    torch.int32: tensor_pb2.DTYPE_INT32,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.uint8: tensor_pb2.DTYPE_UINT8,
    torch.bool: tensor_pb2.DTYPE_BOOL,
    torch.complex64: tensor_pb2.DTYPE_COMPLEX64,
    torch.complex128: tensor_pb2.DTYPE_COMPLEX128,
}
TORCH_DTYPES: dict[tensor_pb2.DType.ValueType, torch.dtype] = {v: k for k, v in DTYPES.items()}

LAYOUTS: dict[torch.layout, tensor_pb2.Layout.ValueType] = {torch.strided: tensor_pb2.LAYOUT_STRIDED}
TORCH_LAYOUTS = {v: k for k, v in LAYOUTS.items()}

MEMORY_FORMATS: dict[torch.memory_format, tensor_pb2.MemoryFormat.ValueType] = {
    torch.contiguous_format: tensor_pb2.MEMORY_FORMAT_CONTIGUOUS,
    torch.preserve_format: tensor_pb2.MEMORY_FORMAT_PRESERVE,
    torch.channels_last: tensor_pb2.MEMORY_FORMAT_CHANNELS_LAST,
    torch.channels_last_3d: tensor_pb2.MEMORY_FORMAT_CHANNELS_LAST_3D,
}
TORCH_MEMORY_FORMATS = {v: k for k, v in MEMORY_FORMATS.items()}


def dtype_to_proto(dtype: torch.dtype) -> tensor_pb2.DType.ValueType:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} is not supported on the wire") from None


def dtype_from_proto(value: int) -> torch.dtype:
    try:
        return TORCH_DTYPES[tensor_pb2.DType.ValueType(value)]
    except KeyError:
        raise InvalidArgument(f"unknown dtype {value}") from None


# ---- tensor bytes ----


def check_bool_bytes(data: bytes | memoryview) -> None:
    """A bool tensor's bytes from a client are each 0 or 1: torch's kernels are C++ and CUDA code on `bool`, where
    any other byte is undefined behaviour (the CPU kernels probed on torch 2.13 - ~, ==, !=, &, *, +, max - happen
    to give 0/1 results; nothing promises it for others, GPUs or compiled code). Refused, not normalised: such
    bytes are a client's bug or attack, and a silent rewrite would hide it. Only bool uploads pay (one pass)."""
    if bytes(data).translate(None, b"\0\1"):
        raise InvalidArgument("a bool tensor's bytes must each be 0 or 1")


def bool_tensor_ok(t: torch.Tensor) -> bool:
    """Whether every byte of a contiguous bool tensor is 0 or 1 (`check_bool_bytes`'s rule, held to a daemon's bool
    downloads by the client, client/session.py): read as uint8, no copy."""
    return t.numel() == 0 or int(byte_view(t).max()) <= 1


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's elements (no copy)."""
    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def host_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable memoryview, no copy. Not through numpy, which would make
    the tensor's storage non-resizable (a side effect on the caller's tensor), nor torch's copy_ (OpenMP-split,
    slow on a loaded host). The caller keeps `t` alive while the view is used."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    # Not `(ctypes.c_char * n).from_address(...)`: ctypes keeps its array types only weakly, and each is a class
    # with reference cycles, so every cyclic collection frees them and the next transfer builds them again (~90k
    # instructions each): the garbage that made a session's worker collect more often.
    return _memory_view(t.data_ptr(), n, _PYBUF_WRITE)  # type: ignore[no-any-return]


_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory  # a memoryview over raw memory; owns nothing
_memory_view.restype = ctypes.py_object
_memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_PYBUF_WRITE = 0x200


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Contiguous little-endian bytes of a CPU tensor's elements."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return byte_view(t).numpy().tobytes()


def bytes_to_tensor(data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A new CPU tensor from bytes; the length must match shape x element size exactly."""
    shape = [int(s) for s in shape]
    if any(s < 0 for s in shape):
        raise InvalidArgument(f"negative dimension in shape {shape}")
    numel = 1
    for s in shape:
        numel *= s
    expected = numel * itemsize(dtype)
    if len(data) != expected:
        raise InvalidArgument(f"tensor data has {len(data)} bytes, shape {shape} of {dtype} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns about read-only buffers; we copy right away
        flat = torch.frombuffer(data, dtype=torch.uint8).clone()
    return flat.view(dtype).reshape(shape)


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element (the dtype's own field: not a 0-d tensor made to ask it, ~13k instructions an upload)."""
    return dtype.itemsize


def meta_to_proto(t: torch.Tensor) -> tensor_pb2.TensorMeta:
    return tensor_pb2.TensorMeta(
        dtype=dtype_to_proto(t.dtype),
        shape=list(t.shape),
        stride=list(t.stride()),
        storage_offset=int(t.storage_offset()),
    )


def inline_to_proto(t: torch.Tensor) -> tensor_pb2.InlineTensor:
    return tensor_pb2.InlineTensor(dtype=dtype_to_proto(t.dtype), shape=list(t.shape), data=tensor_to_bytes(t))


def inline_from_proto(msg: tensor_pb2.InlineTensor) -> torch.Tensor:
    if len(msg.data) > INLINE_MAX_BYTES:
        raise InvalidArgument(f"inline tensor of {len(msg.data)} bytes exceeds {INLINE_MAX_BYTES}; upload it")
    dtype = dtype_from_proto(msg.dtype)
    if dtype is torch.bool:  # an op's inline argument (eager records, graph definitions): as every upload path
        check_bool_bytes(msg.data)
    return bytes_to_tensor(msg.data, dtype, msg.shape)


# ---- scalars ----


def scalar_to_proto(value: Any) -> tensor_pb2.Scalar:
    if isinstance(value, bool):
        return tensor_pb2.Scalar(b=value)
    if isinstance(value, int):
        return tensor_pb2.Scalar(i=value)
    if isinstance(value, float):
        return tensor_pb2.Scalar(f=value)
    if isinstance(value, complex):
        return tensor_pb2.Scalar(c=tensor_pb2.Complex(real=value.real, imag=value.imag))
    raise InvalidArgument(f"not a scalar: {type(value).__name__}")


def scalar_from_proto(msg: tensor_pb2.Scalar) -> bool | int | float | complex:
    kind = msg.WhichOneof("value")
    if kind == "b":
        return msg.b
    if kind == "i":
        return msg.i
    if kind == "f":
        return msg.f
    if kind == "c":
        return complex(msg.c.real, msg.c.imag)
    raise InvalidArgument("empty scalar")


# ---- op arguments ----

TensorEncoder = Callable[[torch.Tensor], tensor_pb2.Arg]


def encode_arg(value: Any, tensor: TensorEncoder) -> tensor_pb2.Arg:
    """A Python argument of an aten op as an Arg; `tensor` encodes tensors (handle or inline)."""
    if value is None:
        return tensor_pb2.Arg(none=tensor_pb2.NoneArg())
    if isinstance(value, torch.Tensor):
        return tensor(value)
    if isinstance(value, bool):
        return tensor_pb2.Arg(b=value)
    if isinstance(value, int):
        return tensor_pb2.Arg(i=value)
    if isinstance(value, float):
        return tensor_pb2.Arg(f=value)
    if isinstance(value, complex):
        return tensor_pb2.Arg(c=tensor_pb2.Complex(real=value.real, imag=value.imag))
    if isinstance(value, str):
        return tensor_pb2.Arg(s=value)
    if isinstance(value, torch.dtype):
        return tensor_pb2.Arg(dtype=dtype_to_proto(value))
    if isinstance(value, torch.device):
        return tensor_pb2.Arg(
            device=tensor_pb2.DeviceRef(type=value.type, index=-1 if value.index is None else value.index)
        )
    if isinstance(value, torch.layout):
        if value not in LAYOUTS:
            raise InvalidArgument(f"layout {value} is not supported")
        return tensor_pb2.Arg(layout=LAYOUTS[value])
    if isinstance(value, torch.memory_format):
        return tensor_pb2.Arg(memory_format=MEMORY_FORMATS[value])
    if isinstance(value, list | tuple | torch.Size):
        return _encode_list(list(value), tensor)
    raise InvalidArgument(f"cannot send an argument of type {type(value).__name__}")


def _encode_list(values: list[Any], tensor: TensorEncoder) -> tensor_pb2.Arg:
    if all(isinstance(v, bool) for v in values) and values:
        return tensor_pb2.Arg(bools=tensor_pb2.BoolList(values=values))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return tensor_pb2.Arg(ints=tensor_pb2.IntList(values=values))
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return tensor_pb2.Arg(floats=tensor_pb2.FloatList(values=[float(v) for v in values]))
    if all(v is None or isinstance(v, torch.Tensor) for v in values):
        handles = []
        for v in values:
            if v is None:
                handles.append(0)
                continue
            arg = tensor(v)
            if arg.WhichOneof("value") != "tensor":
                raise InvalidArgument("tensors inside a list argument must live on the gpupool device")
            handles.append(arg.tensor)
        return tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=handles))
    raise InvalidArgument(f"cannot send a list of {sorted({type(v).__name__ for v in values})}")


TensorResolver = Callable[[int], torch.Tensor]


def arg_handles(args: Iterable[tensor_pb2.Arg]) -> list[int]:
    """The tensor handles named by these arguments (a tensor, or the non-empty entries of a tensor list)."""
    found: list[int] = []
    for a in args:
        kind = a.WhichOneof("value")
        if kind == "tensor":
            found.append(a.tensor)
        elif kind == "tensors":
            found.extend(h for h in a.tensors.handles if h)
    return found


def decode_arg(arg: tensor_pb2.Arg, resolve: TensorResolver, device: torch.device) -> Any:
    """An Arg back to the Python value an aten op takes; handles go through `resolve` (which checks
    ownership), device arguments become the session's own device."""
    kind = arg.WhichOneof("value")
    if kind == "none":
        return None
    if kind == "tensor":
        return resolve(arg.tensor)
    if kind in ("i", "f", "b"):
        return getattr(arg, kind)
    if kind == "c":
        return complex(arg.c.real, arg.c.imag)
    if kind == "s":
        if len(arg.s) > MAX_STRING_ARG:
            raise InvalidArgument(f"string argument longer than {MAX_STRING_ARG} characters")
        return arg.s
    if kind == "dtype":
        return dtype_from_proto(arg.dtype)
    if kind == "device":
        if arg.device.type == "cpu":
            return torch.device("cpu")
        if arg.device.type != "gpupool":
            raise InvalidArgument(f"device type {arg.device.type!r} is not available on the daemon")
        return device
    if kind == "layout":
        if arg.layout not in TORCH_LAYOUTS:
            raise InvalidArgument(f"unknown layout {arg.layout}")
        return TORCH_LAYOUTS[arg.layout]
    if kind == "memory_format":
        if arg.memory_format not in TORCH_MEMORY_FORMATS:
            raise InvalidArgument(f"unknown memory format {arg.memory_format}")
        return TORCH_MEMORY_FORMATS[arg.memory_format]
    if kind == "ints":
        return list(arg.ints.values)
    if kind == "floats":
        return list(arg.floats.values)
    if kind == "bools":
        return list(arg.bools.values)
    if kind == "tensors":
        return [None if h == 0 else resolve(h) for h in arg.tensors.handles]
    if kind == "inline":
        t = inline_from_proto(arg.inline)
        return t if t.dim() == 0 else t.to(device)
    raise InvalidArgument("empty argument")


def device_info(index: int, uuid: str, model: str, memory_bytes: int, fake: bool) -> device_pb2.DeviceInfo:
    return device_pb2.DeviceInfo(index=index, uuid=uuid, model=model, memory_bytes=memory_bytes, fake=fake)
