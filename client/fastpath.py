"""torch's transformer "fast path" off for gpupool tensors, on either client.

`nn.MultiheadAttention`, `nn.TransformerEncoderLayer` and `nn.TransformerEncoder` in `eval()` under
`torch.no_grad()` call fused kernels (`aten::_native_multi_head_attention`, `aten::_transformer_encoder_layer_fwd`,
and with a `src_key_padding_mask` a nested tensor, `_nested_tensor_from_mask`) for cpu, cuda, xpu and any
PrivateUse1 device. The daemon's allowlist has none of them (CPU/CUDA-only kernels no trace reached, and a nested
tensor's storage no client can describe), so both clients failed there. `install()` wraps the three modules'
`forward`: where an argument or the module's first parameter is on the gpupool device, torch's
`get_fastpath_enabled()` answers False on this thread for that call, and torch takes its ordinary path (the ops
of training, already allowed), as with `torch.backends.mha.set_fastpath_enabled(False)`. Everywhere else
(local CPU/CUDA modules) each call is torch's own. With a padding mask the ordinary path leaves attention values at
the padded positions, where the nested-tensor path writes zeros (as on CUDA with grad enabled)."""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.backends.mha as mha

_off = threading.local()
_installed: list[str] = []


def _get_fastpath_enabled(original: Callable[[], bool]) -> Callable[[], bool]:
    @functools.wraps(original)
    def get_fastpath_enabled() -> bool:
        return original() and not getattr(_off, "depth", 0)

    return get_fastpath_enabled


def _on_device(device_type: str, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type == device_type  # the first tensor (query, src): torch checks them all alike
    first = next(module.parameters(), None)
    return first is not None and first.device.type == device_type


def _wrap(cls: type[torch.nn.Module], device_type: str) -> None:
    original = cls.forward
    if getattr(original, "_gpupool_fastpath", False):
        return

    on_device, off = _on_device, _off  # free variables: the wrapper runs with torch's module globals (below)

    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not on_device(device_type, self, args, kwargs):
            return original(self, *args, **kwargs)
        off.depth = getattr(off, "depth", 0) + 1
        try:
            return original(self, *args, **kwargs)
        finally:
            off.depth -= 1

    # torch.jit.script compiles the original's source (inspect follows __wrapped__) and resolves its names (F,
    # Optional) in the wrapper's globals and closure: the wrapper gets the original's globals
    code = forward.__code__
    forward = functools.wraps(original)(
        types.FunctionType(code, original.__globals__, code.co_name, None, forward.__closure__)
    )
    forward._gpupool_fastpath = True  # type: ignore[attr-defined]
    cls.forward = forward  # type: ignore[method-assign]


def install(device_type: str) -> None:
    """Idempotent: gpupool tensors (device type `device_type`) take torch's ordinary transformer path."""
    if _installed:
        return
    mha.get_fastpath_enabled = _get_fastpath_enabled(mha.get_fastpath_enabled)
    for cls in (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer, torch.nn.TransformerEncoder):
        _wrap(cls, device_type)
    _installed.append(device_type)
