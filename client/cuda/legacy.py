"""The legacy CUDA tensor types under `gpupool run --cuda`: `torch.cuda.FloatTensor` and its siblings.

Older scripts (the PyTorch-GAN family, tutorials from before `torch.device`) pick a tensor type once and build with
it: `Tensor = torch.cuda.FloatTensor if cuda else torch.FloatTensor`, then `Tensor(n, 1).fill_(1.0)`,
`Tensor(np.random.normal(0, 1, (n, d)))`, `imgs.type(Tensor)`, `torch.set_default_tensor_type("torch.cuda.
FloatTensor")`. torch's CPU-only build has these names but refuses them ("type torch.cuda.FloatTensor not available.
Torch not compiled with CUDA enabled."). Here each is a class whose call builds on the current gpupool device (sizes:
`torch.empty` there; data: torch's own CPU constructor, then one copy up), whose `isinstance` is a tensor of its dtype
on a gpupool device, and which `Tensor.type(...)` and `torch.set_default_tensor_type(...)` take, by class or by name.
`x.type()` says `torch.cuda.FloatTensor` to the script for a tensor on the device, as on a GPU (torch's own code still
gets `torch.gpupool.FloatTensor`). Installed by `enable()` (client/cuda/__init__.py); `devices.uninstall()` undoes the
torch patches.
"""

from __future__ import annotations

from typing import Any

import torch

from .devices import GPUPOOL, _scripts_call, patch

_DTYPES = {
    "DoubleTensor": torch.float64, "FloatTensor": torch.float32, "HalfTensor": torch.float16,
    "BFloat16Tensor": torch.bfloat16, "LongTensor": torch.int64, "IntTensor": torch.int32, "ShortTensor": torch.int16,
    "CharTensor": torch.int8, "ByteTensor": torch.uint8, "BoolTensor": torch.bool,
}  # fmt: skip
_TYPE = torch.Tensor.type
_SET_DEFAULT_TENSOR_TYPE = torch.set_default_tensor_type


def _sizes(args: tuple[Any, ...]) -> bool:
    """Whether legacy-constructor arguments are sizes (`T(2, 3)`, `T(torch.Size([2, 3]))`, `T()`), not data."""
    if len(args) == 1 and isinstance(args[0], torch.Size):
        return True
    return all(isinstance(a, int) and not isinstance(a, bool) for a in args)


class _LegacyCudaType(type):
    """The metaclass of the mapped `torch.cuda.<Name>Tensor` classes."""

    dtype: torch.dtype
    is_cuda = True
    is_sparse = False

    def __call__(cls, *args: Any, **kwargs: Any) -> torch.Tensor:
        device = kwargs.pop("device", None)
        target = torch.device(GPUPOOL) if device is None else _device(device)
        if kwargs:
            raise TypeError(f"torch.cuda.{cls.__name__}() got unexpected keyword arguments {sorted(kwargs)}")
        if _sizes(args):
            sizes = args[0] if len(args) == 1 and isinstance(args[0], torch.Size) else args
            return torch.empty(tuple(sizes) if args else (0,), dtype=cls.dtype, device=target)
        if len(args) == 1 and isinstance(args[0], torch.Tensor):
            return args[0].to(device=target, dtype=cls.dtype)
        cpu = getattr(torch, cls.__name__)(*args)  # torch's own CPU legacy constructor reads the data
        return cpu.to(target)

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, torch.Tensor) and obj.dtype == cls.dtype and obj.device.type == GPUPOOL


def _device(device: Any) -> torch.device:
    from .devices import to_gpupool

    mapped = to_gpupool(device)
    return mapped if isinstance(mapped, torch.device) else torch.device(mapped)


def _cuda_type(value: Any) -> _LegacyCudaType | None:
    """The mapped class a `Tensor.type`/`set_default_tensor_type` argument names (class or "torch.cuda.X"), or None."""
    if isinstance(value, _LegacyCudaType):
        return value
    if isinstance(value, str) and value.startswith("torch.cuda."):
        found = TYPES.get(value[len("torch.cuda.") :])
        if found is None:
            raise RuntimeError(f"invalid type: '{value}'")
        return found
    return None


def tensor_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    """`Tensor.type`: a mapped CUDA type moves the tensor to the current gpupool device in its dtype; `x.type()`
    names a device tensor `torch.cuda.*` for the script; anything else is torch's own."""
    if dtype is None:
        name = _TYPE(self)
        if name.startswith("torch.gpupool.") and _scripts_call(1):
            return "torch.cuda." + name[len("torch.gpupool.") :]
        return name
    cls = _cuda_type(dtype)
    if cls is None:
        return _TYPE(self, dtype, non_blocking, **kwargs)
    if self.device.type == GPUPOOL and self.dtype == cls.dtype:
        return self
    target = self.device if self.device.type == GPUPOOL else torch.device(GPUPOOL)
    return self.to(device=target, dtype=cls.dtype, non_blocking=non_blocking)


_defaulted: list[bool] = []  # whether set_default_tensor_type made gpupool the default device


def set_default_tensor_type(t: Any) -> None:
    """`torch.set_default_tensor_type`: a CUDA floating type makes its dtype the default and the current gpupool
    device the default device (torch.set_default_device); a CPU type puts the CPU back."""
    cls = _cuda_type(t)
    if cls is None:
        _SET_DEFAULT_TENSOR_TYPE(t)
        if _defaulted:
            torch.set_default_device(None)
            _defaulted.clear()
        return
    if not cls.dtype.is_floating_point:
        raise TypeError("only floating-point types are supported as the default type")
    torch.set_default_dtype(cls.dtype)
    torch.set_default_device(GPUPOOL)
    _defaulted[:] = [True]


TYPES: dict[str, _LegacyCudaType] = {}
for _name, _dtype in _DTYPES.items():
    TYPES[_name] = _LegacyCudaType(_name, (), {"dtype": _dtype, "__module__": "torch.cuda", "__qualname__": _name})


def install() -> None:
    """Put the classes in torch.cuda and the wrappers on Tensor.type and torch.set_default_tensor_type."""
    for name, cls in TYPES.items():
        setattr(torch.cuda, name, cls)
    patch(torch.Tensor, "type", tensor_type)
    patch(torch, "set_default_tensor_type", set_default_tensor_type)
