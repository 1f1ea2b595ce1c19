"""Remote tensors: torch tensors whose data lives on a gpupool daemon under a handle.

A `RemoteTensor` is a wrapper subclass (`torch.Tensor._make_wrapper_subclass`): it has real sizes,
strides, dtype and the device `gpupool:<i>`, but no local data; it holds the runtime of its device
and the handle the daemon knows the data by. Every aten op on it lands in `__torch_dispatch__`, which
`backend.register` replaces with the dispatcher's own (`client.torch.dispatch.torch_dispatch`: this module sits
below it, so the registration fills a slot instead of this module importing upwards; the method defined here
only reaches the slot's dispatcher, or says the device is not registered yet). When it truly dies (torch keeps
the Python object alive while autograd still holds its TensorImpl), `__del__` queues its handle for a
batched Free (cheaper than a weakref callback, and `torch.utils.swap_tensors` accepts it).
Moving data in and out (`upload_new`, `to_cpu`) is here too: every layer above needs it.

A `RemoteView` is the result of a view op (`transfer._view`): no record is sent for it. While it is lazy its
handle is the daemon tensor it is a view of (which it holds, as a detach does: `DeviceRuntime.share`) and
`_gp_v` is its compact view argument (`compact.VIEW`: that handle, its own sizes, strides and storage offset),
which ops taking it send in place of a handle, also as an element of a tensor list (`compact.VIEWS`, made by
`encode._c_tensor_list`). Where a path needs a daemon tensor equal to it (a download, an `Op` message, a tensor
list with a None or a CPU tensor, a capture, a collective, an op that changes its metadata), `own` gives it one:
one record, the first time.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from math import prod as _prod
from typing import Any

import torch

from gpupool._proto import device_pb2

from .. import checkpoints
from .runtime import DeviceRuntime

Dispatcher = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]


def _unregistered(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    raise RuntimeError(f"{func} on a gpupool tensor before the device was registered (import gpupool.torch)")


_dispatch: list[Dispatcher] = [_unregistered]


_compiler = torch.compiler  # `_compiler._is_compiling_flag`: torch.compiler.is_compiling() without its two calls


def _eager(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _dispatch[0](func, args, kwargs)


_out_of_dynamo: list[Dispatcher] = []


def _eager_disabled() -> Dispatcher:
    """The dispatcher, out of torch.compile's reach: Dynamo cannot trace a Python device (its wrapper tensors
    and their remote handles have no fake version), so `torch.compile` on a gpupool model runs these ops
    eagerly, with the same results; use `gpupool.torch.capture` to make a step one command.

    Wrapped by `torch.compiler.disable` when first needed, not at import: that imports torch._dynamo (about
    1.3 s here), which a script that never compiles should not pay; one that compiles has loaded it by now."""
    if not _out_of_dynamo:
        _out_of_dynamo.append(torch.compiler.disable(_eager))
    return _out_of_dynamo[0]


def set_dispatcher(fn: Dispatcher, torch_dispatch: Callable[..., Any] | None = None) -> None:
    """Where every aten op on a remote tensor goes (`backend.register` installs `dispatch.dispatch`); with
    `torch_dispatch` (the same routing as a `__torch_dispatch__`, with the Dynamo check below) that becomes the
    class's method itself, one Python call less per op."""
    _dispatch[0] = fn
    if torch_dispatch is not None:
        RemoteTensor.__torch_dispatch__ = classmethod(torch_dispatch)  # type: ignore[assignment]


class RemoteTensor(torch.Tensor):
    """A tensor on `gpupool:<index>`; its data is `handle` in the session of `runtime`."""

    _gp_rt: DeviceRuntime
    _gp_h: int
    _gp_key: tuple[Any, ...]  # (shape, stride, offset, dtype): this tensor's part of meta-cache keys

    # Ops go through __torch_dispatch__ only; torch functions take their default (C++) path.
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        # Dynamo traced into here (the flag holds for a whole compile session, as is_compiling() says): run the op
        # eagerly instead (a graph break)
        if _compiler._is_compiling_flag:
            return _eager_disabled()(func, args, kwargs or {})
        # torch passes a fresh dict (often empty: `kwargs or {}` would make another one on every op)
        return _dispatch[0](func, args, kwargs if kwargs is not None else {})

    def __del__(self) -> None:
        # The bytes freed come from the tensor's own key (shape, stride, offset, dtype; `rewrap` keeps it in step):
        # nelement() * element_size() are two calls through torch's tensor machinery, ~1-2 us on every death.
        d = self.__dict__
        h = d.get("_gp_h")
        if h:
            key = d.get("_gp_key")
            nbytes = _prod(key[0]) * key[3].itemsize if key is not None else 0
            rt = d["_gp_rt"]
            # DeviceRuntime.release's lock-free case, inline (one Python call less on every death): see there
            if h not in rt.shared and not (rt.watched or rt.pending or rt.closed or rt.recorders):
                rt._dead.append(h)
                rt._dead_bytes += nbytes
            else:
                rt.release(h, nbytes)

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        if self._gp_rt.closed:
            return f"RemoteTensor(<detached>, shape={tuple(self.shape)}, dtype={self.dtype}, device='{self.device}')"
        with torch.no_grad():
            local = self.detach().to("cpu")
        text = repr(local)
        extra = f", device='{self.device}'"
        if self.requires_grad:
            grad_fn = self.grad_fn
            extra += f", grad_fn=<{type(grad_fn).__name__}>" if grad_fn is not None else ", requires_grad=True"
        return text[:-1] + extra + ")"

    __str__ = __repr__  # type: ignore[assignment]

    @property  # type: ignore[override]
    def data(self) -> torch.Tensor:
        return torch._C.TensorBase.data.__get__(self)  # type: ignore[attr-defined,no-any-return]

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        # `p.data = q` (Module.to(dtype) on a remote model does it) swaps the TensorImpl's data without
        # any op: the handle must follow, or this tensor would keep naming its old daemon tensor.
        if not isinstance(new, RemoteTensor):
            raise TypeError(f"cannot assign a {new.device} tensor to .data of a {self.device} tensor")
        own(new)  # this tensor takes its handle: one equal to it
        torch._C.TensorBase.data.__set__(self, new)  # type: ignore[attr-defined]
        new._gp_rt.share(new._gp_h)
        old_rt, old_h = self._gp_rt, self._gp_h
        self._gp_rt, self._gp_h, self._gp_key = new._gp_rt, new._gp_h, new._gp_key
        if "_gp_v" in self.__dict__:  # a view, lazy or not: its handle is now the new one
            self.__dict__["_gp_v"] = None
        old_rt.release(old_h)

    def tolist(self) -> Any:  # type: ignore[override]
        # torch's C++ tolist refuses tensor subclasses: read back, then convert (a sync point).
        with torch.no_grad():
            return self.detach().to("cpu").tolist()

    def __reduce_ex__(self, protocol: Any) -> Any:
        # torch.save / pickle / copy of a remote tensor: its data comes back to the CPU, its storage tagged with this
        # tensor's device (`gpupool:N`, as the C++ client's storages are: client/checkpoints.py), so torch.load puts
        # it back on the device under `gpupool run` and asks for map_location elsewhere. A Parameter stays one (until
        # round 35 a whole model saved here came back holding plain tensors).
        local = self._gp_cpu()
        checkpoints.mark_saved(local, self.device)
        if getattr(self, "_is_param", False):
            return torch._utils._rebuild_parameter, (local.detach(), self.requires_grad, OrderedDict())
        return local.__reduce_ex__(protocol)

    def __copy__(self) -> torch.Tensor:
        # copy.copy: the CPU copy, as before round 35, not through __reduce_ex__ (the tensor copy.copy rebuilds from a
        # reduction keeps its storage, which mark_saved tagged for torch.save alone)
        return self._gp_cpu()

    def _gp_cpu(self) -> torch.Tensor:
        with torch.no_grad():
            local = self.detach().to("cpu")
        if self.requires_grad:
            local.requires_grad_(True)
        return local

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        with torch.no_grad():
            out = self.detach().clone()
        if self.requires_grad:
            out.requires_grad_(True)
        if getattr(self, "_is_param", False):
            out = torch.nn.Parameter(out, self.requires_grad)
        if self.grad is not None:  # as torch's own deepcopy does (dropped until round 33)
            out.grad = self.grad.__deepcopy__(memo)
        memo[id(self)] = out
        return out


python_del = RemoteTensor.__del__  # the Python finalizer (native_ops.use puts native_ops.cpp's `remote_del` there)


class RemoteView(RemoteTensor):
    """A remote tensor made by a view op without a record (see the module docstring): `_gp_v` is its view
    argument's bytes while it is lazy (`_gp_h` then names the daemon tensor it is a view of), None once `own`
    gave it a daemon tensor of its own."""

    _gp_v: bytes | None


def own(t: RemoteTensor) -> None:
    """Give a lazy `RemoteView` a daemon tensor of its own (an alias of its view argument), so that its handle
    names a daemon tensor equal to it; nothing for any other remote tensor."""
    d = t.__dict__
    arg = d.get("_gp_v")
    if arg is None:
        return
    rt = d["_gp_rt"]
    h = rt.new_handle()
    # a compact record even while a capture records (the recorder sees `Op`s only): the view was made before
    rt.eager_op("aten::alias", _ONE_OUTPUT(1, h) + b"\x01" + arg + b"\x00")
    with rt._lock:  # another thread may have given it one meanwhile: the first wins
        won = d.get("_gp_v") is arg
        if won:
            base = d["_gp_h"]
            d["_gp_h"] = h
            d["_gp_v"] = None
    rt.release(base if won else h)
    if won:  # its own bytes from now on, as its death counts them (the client's count: runtime.spend)
        key = d["_gp_key"]
        rt.spend(_prod(key[0]) * key[3].itemsize)


_ONE_OUTPUT = struct.Struct("<BQ").pack
_make_wrapper = torch.Tensor._make_wrapper_subclass
_STRIDED = torch.strided


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides torch gives a tensor of `shape` made without strides (TensorImpl::empty_tensor_restride)."""
    out = [1] * len(shape)
    for i in range(len(shape) - 1, 0, -1):
        out[i - 1] = out[i] * max(shape[i], 1)
    return tuple(out)


def wrapper_args(shape: Any, stride: Any, offset: int) -> tuple[Any, int | None]:
    """The strides and storage offset to hand `_make_wrapper_subclass` for this metadata: None where torch's default
    is the same (contiguous strides, offset 0). An argument left None is one its argument parser need not convert
    (a SymInt list, a SymInt): ~2.7k instructions less per wrapper of a contiguous tensor. (torch refuses an offset
    without strides.)"""
    if offset:
        return stride, offset
    return (None if tuple(stride) == _contiguous_strides(tuple(shape)) else stride), None


# metadata key -> wrapper_args (like meta.CACHE); emptied when full (an entry is cheap to make again), so that
# changing shapes do not grow it without end
_WRAPPER_ARGS: dict[tuple[Any, ...], tuple[Any, int | None]] = {}
_WRAPPER_ARGS_MAX = 4096


def wrap(
    rt: DeviceRuntime,
    handle: int,
    shape: Any,
    stride: Any,
    offset: int,
    dtype: torch.dtype,
    key: tuple[Any, ...] | None = None,
) -> RemoteTensor:
    """A new remote tensor for a handle the daemon has (or will have, once queued ops run); `key` is its
    metadata as a `meta.OutMeta` when the caller has one."""
    if key is None:
        key = (tuple(shape), tuple(stride), int(offset), dtype)
    args = _WRAPPER_ARGS.get(key)
    if args is None:
        if len(_WRAPPER_ARGS) >= _WRAPPER_ARGS_MAX:
            _WRAPPER_ARGS.clear()
        args = _WRAPPER_ARGS[key] = wrapper_args(shape, stride, offset)
    # Positional arguments (size, strides, storage_offset, memory_format, dtype, layout, device): keywords cost
    # torch's argument parser a name match each, on every op; requires_grad defaults to False.
    t = _make_wrapper(RemoteTensor, shape, args[0], args[1], None, dtype, _STRIDED, rt.device)
    d = t.__dict__  # three stores into the instance dict: cheaper than three attribute sets on a tensor
    d["_gp_rt"] = rt
    d["_gp_h"] = handle
    d["_gp_key"] = key
    return t  # type: ignore[no-any-return]


def rewrap(t: RemoteTensor, shape: Any, stride: Any, offset: int) -> None:
    """Give a remote tensor new sizes/strides in place (an out= tensor the op resized, t_, squeeze_).

    Runs `set_` on the wrapper's own (data-less) storage with the meta kernel, which is how torch's
    own `return_and_correct_aliasing` updates wrapper metadata; nothing is dispatched to the daemon.
    """
    with torch.utils._mode_utils.no_dispatch():
        was = torch._C._meta_in_tls_dispatch_include()
        torch._C._set_meta_in_tls_dispatch_include(True)
        try:
            torch.ops.aten.set_.source_Storage_storage_offset(t, t.untyped_storage(), offset, shape, stride)
        finally:
            torch._C._set_meta_in_tls_dispatch_include(was)
    t._gp_key = (tuple(shape), tuple(stride), int(offset), t.dtype)


def upload_new(rt: DeviceRuntime, t: torch.Tensor) -> RemoteTensor:
    """A new remote tensor with the contents of a CPU tensor (made contiguous)."""
    local = t
    if local.device.type != "cpu" or not local.is_contiguous():  # the usual batch is neither: no calls for it
        local = local.detach().cpu().contiguous()
    h = rt.upload(local)  # the session copies the bytes now
    t = wrap(rt, h, tuple(local.shape), local.stride(), 0, local.dtype)
    rt.spend(local.nelement() * local.element_size())
    return t


def to_cpu(t: RemoteTensor) -> torch.Tensor:
    """The contents of a remote tensor as a new CPU tensor of the same shape (a sync point)."""
    own(t)
    rt = t._gp_rt
    if rt.pending:
        rt.materialize_pending()
    return rt.download(t._gp_h, tuple(t.shape), t.dtype)  # the daemon's reply must be this shape and dtype


def storage_nbytes(t: RemoteTensor) -> int:
    """The bytes of the daemon storage behind `t` as `resize_storage` last set them through `t`, else its own
    storage's size (a wrapper's: what the tensor was made with)."""
    n = t.__dict__.get("_gp_storage_nbytes")
    return t.untyped_storage().nbytes() if n is None else int(n)


def resize_storage(t: RemoteTensor, nbytes: int) -> None:
    """`t.untyped_storage().resize_(nbytes)` on the daemon (Command.resize_storage; server/storage_resize.py): torch
    refuses it on a wrapper tensor's storage ("an invalid python storage"), so client/fsdp.py calls this for FSDP2's
    free_storage (0) and alloc_storage (its size). In order with the ops before it; the daemon refuses the storage's
    tensors while they do not fit it, and charges and zeroes the bytes it gains. The size is noted on `t`
    (`storage_nbytes`)."""
    if nbytes < 0:
        raise RuntimeError(f"gpupool: a storage cannot be resized to a negative size ({nbytes})")
    rt = t._gp_rt
    if (rec := rt.recording()) is not None:
        rec.refuse("untyped_storage().resize_")
    if rt.pending:
        rt.materialize_pending()  # an empty held back is made first: the resize names its handle
    rt.command(device_pb2.Command(resize_storage=device_pb2.ResizeStorage(handle=t._gp_h, nbytes=nbytes)))
    t.__dict__["_gp_storage_nbytes"] = nbytes
