"""torch's transformer "fast path" off for gpupool tensors, on either client.

`nn.MultiheadAttention`, `nn.TransformerEncoderLayer` and `nn.TransformerEncoder` in `eval()` under
`torch.no_grad()` call fused kernels (`aten::_native_multi_head_attention`, `aten::_transformer_encoder_layer_fwd`,
and with a `src_key_padding_mask` a nested tensor, `_nested_tensor_from_mask`) for cpu, cuda, xpu and any
PrivateUse1 device. The daemon's allowlist has none of them (CPU/CUDA-only kernels no trace reached, and a nested
tensor's storage no client can describe), so both clients failed there. `install()` wraps the three modules'
`forward`: where an argument or the module's first parameter is on the gpupool device, torch's
`get_fastpath_enabled()` answers False on this thread for that call, and torch takes its ordinary path (the ops
of training, already allowed), as with `torch.backends.mha.set_fastpath_enabled(False)`. Everywhere else
(local CPU/CUDA modules) each call is torch's own.

With a `src_key_padding_mask`, torch's encoder runs a nested tensor of the kept positions where its fast path would
(`_encoder_padded`: eval, no grad, a left-aligned mask, ...) and pads the result with zeros before its final `norm`;
the ordinary path leaves attention values at the padded positions (as on CUDA with grad enabled). There the wrapper
runs the layers on the ordinary path with the mask and writes zeros at the padded positions before the norm, so a
pooled encoder gives what the same call gives on a local GPU or CPU (round 41; until then the padded rows differed)."""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.backends.mha as mha
import torch.nn.functional as F

_off = threading.local()
_torch_fastpath = mha.get_fastpath_enabled  # (before install() wraps it)
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


_ENCODER_ARGS = ("src", "mask", "src_key_padding_mask", "is_causal")


def _encoder_padded(encoder: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The output of `nn.TransformerEncoder.forward` where torch (on a CPU or CUDA tensor) would run its layers on a
    nested tensor of the kept positions (the conditions of its forward, but the device's), else None."""
    if len(args) > len(_ENCODER_ARGS) or not set(kwargs) <= set(_ENCODER_ARGS):
        return None  # (torch's forward says what is wrong)
    bound = {**dict(zip(_ENCODER_ARGS, args, strict=False)), **kwargs}
    src, mask, padding = bound.get("src"), bound.get("mask"), bound.get("src_key_padding_mask")
    first = encoder.layers[0]
    if not (
        _torch_fastpath()  # torch's own switch (set_fastpath_enabled), not this thread's off
        and getattr(encoder, "use_nested_tensor", False)
        and not first.training
        and isinstance(src, torch.Tensor)
        and src.dim() == 3
        and isinstance(padding, torch.Tensor)
        and mask is None
        and not src.is_nested
        and not torch.is_autocast_enabled()
    ):
        return None
    attn, norm1, norm2, lin1, lin2 = first.self_attn, first.norm1, first.norm2, first.linear1, first.linear2
    weights = (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias, norm1.weight,
               norm1.bias, norm2.weight, norm2.bias, lin1.weight, lin1.bias, lin2.weight, lin2.bias)  # fmt: skip
    if torch.is_grad_enabled() and any(t.requires_grad for t in (src, *weights)):
        return None
    padding = F._canonical_mask(
        mask=padding, mask_name="src_key_padding_mask", other_type=None, other_name="mask", target_type=src.dtype
    )
    assert padding is not None  # (a tensor in, a tensor out)
    keep = padding.logical_not()
    if getattr(encoder, "mask_check", True) and bool((keep[:, 1:] & ~keep[:, :-1]).any()):
        return None  # not left-aligned: torch's ordinary path too (its _nested_tensor_from_mask_left_aligned)
    output = src
    for layer in encoder.layers:
        output = layer(output, src_mask=None, is_causal=bound.get("is_causal") is True, src_key_padding_mask=padding)
    output = output.masked_fill(~keep.unsqueeze(-1), 0.0)  # to_padded_tensor(0.0, src.size())
    return output if encoder.norm is None else encoder.norm(output)


def _wrap(cls: type[torch.nn.Module], device_type: str) -> None:
    original = cls.forward
    if getattr(original, "_gpupool_fastpath", False):
        return

    # free variables: the wrapper runs with torch's module globals (below)
    on_device, off = _on_device, _off
    padded = _encoder_padded if cls is torch.nn.TransformerEncoder else None

    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not on_device(device_type, self, args, kwargs):
            return original(self, *args, **kwargs)
        off.depth = getattr(off, "depth", 0) + 1
        try:
            if padded is not None:
                output = padded(self, args, kwargs)
                if output is not None:
                    return output
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
