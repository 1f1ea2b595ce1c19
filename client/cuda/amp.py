"""Mixed precision on gpupool: torch.autocast's cast policy for the AutocastPrivateUse1 dispatch key.

torch ships autocast kernels for CUDA/CPU/XPU/MPS but none for PrivateUse1, so `autocast("gpupool")` (and
`autocast("cuda")` under `--cuda`) would fail at the first op. These kernels follow CUDA's policy
(aten/src/ATen/autocast_mode.cpp): ops that are fast and safe in lower precision (matmuls, convolutions,
linear, attention, RNN cells) run in the autocast dtype; ops that need range (softmax, norms, losses,
exp/log, reductions) run in float32; ops mixing inputs (addcmul, cat-like) run in the widest input type.
Every other op falls through unchanged. Only floating tensors on the gpupool device, not float64, are cast,
as torch does. Casts are ordinary ops, so autograd records them. Weight casts are not cached (torch's CUDA
autocast caches casts of leaf weights within a region): a cast weight is cast again per use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .devices import GPUPOOL

LOWER = (
    "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv",
    "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "lstm_cell",
    "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell",
    "scaled_dot_product_attention",
)  # fmt: skip
FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "group_norm", "frobenius_norm",
    "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d",
    "upsample_trilinear3d", "upsample_bicubic2d", "upsample_linear1d", "grid_sampler", "prod", "trace",
    "softmax", "log_softmax", "cross_entropy_loss", "cumprod", "cumsum", "sum", "linalg_vector_norm",
)  # fmt: skip
PROMOTE = (
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "index_put", "scatter_add", "tensordot", "stack", "cat",
    "index_copy",
)  # fmt: skip

_KEY = torch._C.DispatchKey.AutocastPrivateUse1  # type: ignore[attr-defined]
_libraries: list[torch.library.Library] = []


def _eligible(t: Any) -> bool:
    return (
        isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == GPUPOOL
    )


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if _eligible(value) and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, list | tuple) and any(_eligible(v) for v in value):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _widest(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.dtype | None:
    found: list[torch.dtype] = []
    for v in (*args, *kwargs.values()):
        for t in v if isinstance(v, list | tuple) else (v,):
            if _eligible(t):
                found.append(t.dtype)
    if not found:
        return None
    widest = found[0]
    for d in found[1:]:
        widest = torch.promote_types(widest, d)
    return widest


def _kernel(op: torch._ops.OpOverload, policy: str) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        if policy == "lower":
            dtype: torch.dtype | None = torch.get_autocast_dtype(GPUPOOL)
        elif policy == "fp32":
            dtype = torch.float32
        else:
            dtype = _widest(args, kwargs)
        if dtype is not None:
            args = tuple(_cast(a, dtype) for a in args)
            kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_KEY)):
            return op(*args, **kwargs)

    return kernel


def install() -> None:
    """Register the policy (idempotent); `torch.gpupool.get_amp_supported_dtype` lets autocast accept gpupool."""
    if _libraries:
        return
    module = getattr(torch, GPUPOOL)
    if not hasattr(module, "get_amp_supported_dtype"):
        module.get_amp_supported_dtype = lambda: [torch.float16, torch.bfloat16]
    fallback = torch.library.Library("_", "IMPL")  # noqa: TOR901 - a fallback needs the global namespace
    fallback.fallback(torch.library.fallthrough_kernel, "AutocastPrivateUse1")
    ops = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - kernels for existing aten ops
    for policy, names in (("lower", LOWER), ("fp32", FP32), ("promote", PROMOTE)):
        for name in names:
            packet = getattr(torch.ops.aten, name, None)
            if packet is None:
                continue
            for overload in packet.overloads():
                op = getattr(packet, overload)
                if overload.endswith("out") or op._schema.is_mutable:
                    continue
                qualified = name if overload == "default" else f"{name}.{overload}"
                ops.impl(qualified, _kernel(op, policy), "AutocastPrivateUse1")
    _libraries.extend([fallback, ops])
