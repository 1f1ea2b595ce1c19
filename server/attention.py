"""Fused attention on the daemon: `aten::_scaled_dot_product_fused_attention_overrideable` and its backward.

torch's `scaled_dot_product_attention` takes the decomposed math path (bmm, mul, `_safe_softmax`, views: ~30 autograd
nodes and as many op records per call) on a PrivateUse1 device unless the backend says otherwise. gpupool's clients
(client/torch/native_guard.cpp, client/native/native_client.cpp) choose torch's `overrideable` backend for the calls
this module runs (client/sdpa_choice.h, included by both: 4-D, one floating dtype, equal head sizes, dropout_p in
[0, 1), no GQA, a mask that does not require grad), so that one record goes out a forward and one a backward. No
PrivateUse1 kernel exists on the daemon, whose devices are CPUs (fake GPUs) or CUDA GPUs, so both ops are replacements
(server/checks.py `OpPlan.run`):

- CPU (fake GPUs): `_scaled_dot_product_flash_attention_for_cpu` (+ `_backward`), the kernel local CPU runs for the
  same call, so results are local's bits. Its logsumexp is (B, H, L) with (B, L, H) strides; the overrideable op's
  (torch's meta kernel, which the clients infer from) is contiguous: it is copied to that layout, and the backward
  takes either.
- CUDA: `_scaled_dot_product_efficient_attention` (fp32/fp16/bf16, any float bias) when torch's constraints for it hold
  (`_efficient_ok`: sdp_utils' mem-efficient checks that a caller can see, the device's compute capability included),
  its logsumexp (B, H, ceil(L / 32) * 32) cut to (B, H, L) and padded again for the backward. A call outside those
  constraints runs the math composition below on the GPU instead: slower (L x S scores), never wrong; an eager call
  also does when the kernel itself refuses (a RuntimeError). (Run on an H200 in round 31: the encoder without dropout
  trained eagerly to local CUDA's losses bit for bit.)

Which of them runs is `choose_kernel`'s answer from shapes, strides and dtypes alone: per call for an eager op, once
at DefineGraph for a captured step's call (`graph_kernel`, on the graph's meta tensors; a CUDA graph's capture then
records one kernel, with no fallback inside it). The compositions make their aten calls through an `Ops` object:
run as they come here, written as TorchScript nodes by server/graph_trace.py, so a captured step on a fake GPU runs
this very composition inside its TorchScript graph (the math composition is not written that way: a graph that needs
it keeps the Python replay).
- The math composition (`_math_forward`, `_math_backward`: scores in float32, logsumexp, softmax, recomputed under
  autograd for the backward) also serves the shapes the CPU kernel refuses and a gradient of the bias
  (`grad_input_mask[3]`), which no fused kernel here computes.

Dropout inside attention (0 < dropout_p < 1; no flash kernel here takes it, local CPU's refuses it too) runs the dropout
composition (`_dropout_forward`, `_dropout_backward`, any device): torch's own math path
(`_scaled_dot_product_attention_math`) step by step, each step the kernel the daemon runs for the same op of a client's
math path (fake GPUs: fallbacks' `native_dropout`), so a fused call gives the math path's bits. Its mask is drawn from
the session's seeded stream (the forward is a seeded op: server/executor.py `_seeded`) exactly as the math path's
`native_dropout` draws it, leaving the stream where the math path leaves it. The forward returns the generator state it
drew from in `philox_seed` (a 0-d int64 view of the state's bytes: the CPU's mt19937 state, 5056 bytes, or a CUDA
generator's seed and offset; `philox_offset` is 0), and the backward recomputes the forward with the mask drawn again
from that state on a private generator, then runs the kernels autograd of the math path runs, on the same operands: no L
x S mask lives between the forward and the backward (only the 5 KB state), and the session's stream does not move. An
eager forward (`_dropout_forward_saving`: round 28 on fake GPUs, round 31 on CUDA too) also keeps its softmax and mask
in `philox_seed`'s storage after the state (5 bytes a score in float32, counted as that storage's bytes; the math path's
autograd holds 9), and the backward from such a seed skips the recomputed scores, softmax and draw (the same bits; ~3
of the ~8.5 ms of a classifier's attention forward and backward); on CUDA its state bytes are zeros, as `KEPT`'s (no
generator state read on the host, copied to the device and read back: two waits for the stream a call, round 31);
a graph's forward keeps the state only, except on a CUDA device (`KEPT`):
there it keeps the softmax and mask after 16 zero bytes and reads no generator state, so that a CUDA graph can hold the
call (server/graph_cuda.py; the graph's memory plan counts the kept bytes: `kept_seed_meta`). (Clients send a recorded
step's dropout calls as torch's math path by default: only a client that sends the fused op in a graph reaches this.) A
forged state only changes the session's own results; one of another shape, dtype, device or size is INVALID_ARGUMENT.
Its logsumexp output is zeros (the math path makes none; nothing reads it). No aten op reads or sets a generator's
state, so the composition is two operators of its own (`_LIBRARY`): a traced graph holds each call as one node, which
the TorchScript interpreter calls back. An eager call on a fake GPU calls the composition's function directly, forward
and backward (the library op's dispatch into Python and back cost ~20 us a backward). Inside a learned run the
native runner runs the eager calls with dropout (`_dropout_forward_saving`, `_dropout_backward` from saved scores)
in C++ (server/native_runner.cpp `attn::run`, round 45), and since round 46 those without dropout too (`forward` and
`backward`'s kernel paths: the CPU flash kernels, CUDA's mem-efficient ones; `attn::forward_kernels`,
`attn::backward_kernels`): the same aten ops in the same order, so the same bits and draws; it declines every other
call (the math composition, a bias's gradient, a backward from a state alone, float64 without dropout), and every one
the checks here refuse, to the Python functions here. A change to any of these compositions, to `choose_kernel`,
`_efficient_ok`, `_cuda_bias`, `_dense_or_copy`, `_like` or the checks must be made in both places
(tests/unit/test_server_attention_native.py compares them).

Outputs have exactly the meta kernel's shapes, strides and dtypes (`_like`), which the clients' output tensors
already carry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from gpupool.errors import InvalidArgument

from . import fallbacks
from .opargs import Args, Kwargs, arg, written_whole

Tensor = torch.Tensor
aten = torch.ops.aten
FORWARD = "aten::_scaled_dot_product_fused_attention_overrideable"
BACKWARD = "aten::_scaled_dot_product_fused_attention_overrideable_backward"
NAMES = frozenset({FORWARD, BACKWARD})
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Ops:
    """The aten calls of the fused ops' compositions (CPU kernel, layouts, bias, philox placeholders), run as they
    come: the eager op and a graph's Python replay. graph_trace's subclass writes each call as a TorchScript node
    instead, so a traced graph runs exactly this composition (`traceable`: only where every call goes through here).
    """

    traceable = False

    def call(self, op: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> Any:
        return op._op(*args, **kwargs)

    def device(self, t: Tensor) -> torch.device:
        """The device factories of the composition allocate on (a traced graph's dry run: the real one)."""
        return t.device

    def untraceable(self, why: str) -> None:
        """A part of the composition that is not written through `call` (the math path, the CUDA kernel): fine here."""


EAGER = Ops()


def _tensor(v: Any, name: str) -> Tensor:
    if not isinstance(v, Tensor):
        raise InvalidArgument(f"fused attention: {name} must be a tensor")
    return v


def check_forward(q: Any, k: Any, v: Any, bias: Any, dropout_p: Any, scale: Any, debug: Any = False) -> None:
    """The hostile-input rules of the forward (and the backward's shared arguments): clear errors, no kernel run."""
    q, k, v = _tensor(q, "query"), _tensor(k, "key"), _tensor(v, "value")
    # each shape and dtype read once (round 44: every `.shape` makes a torch.Size, ~1k instructions)
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise InvalidArgument(
            f"fused attention: query, key and value must be 4-D (batch, heads, length, head size), not "
            f"{len(qs)}-D, {len(ks)}-D, {len(vs)}-D"
        )
    dtype = q.dtype
    if dtype not in DTYPES or k.dtype != dtype or v.dtype != dtype:
        raise InvalidArgument(f"fused attention: query, key and value must share one floating dtype, not "
                              f"{dtype}, {k.dtype}, {v.dtype}")  # fmt: skip
    if dtype == torch.float64 and isinstance(dropout_p, float | int) and dropout_p == 0:
        raise InvalidArgument("fused attention: float64 without dropout takes torch's math path (gpupool's clients "
                              "send it so): the CPU flash kernel's float64 logsumexp is not the float32 one torch's "
                              "meta kernel gives the client")  # fmt: skip
    b, h, length, e = qs
    if ks[0] != b or vs[0] != b or ks[1] != h or vs[1] != h:
        raise InvalidArgument("fused attention: query, key and value must have the same batch size and heads")
    if ks[2] != vs[2]:
        raise InvalidArgument("fused attention: key and value must have the same length")
    if ks[3] != e:
        raise InvalidArgument("fused attention: query and key must have the same head size")
    if bias is not None:
        bias = _tensor(bias, "attn_bias")
        if bias.dtype != torch.bool and bias.dtype != dtype:
            raise InvalidArgument(f"fused attention: attn_bias must be bool or {dtype}, not {bias.dtype}")
        scores = (b, h, length, ks[2])
        trailing = zip(reversed(bias.shape), reversed(scores), strict=False)  # bias.dim() <= 4 = len(scores)
        if bias.dim() > 4 or bias.dim() < 2 or any(n not in (1, want) for n, want in trailing):
            raise InvalidArgument(f"fused attention: attn_bias of shape {list(bias.shape)} does not broadcast to "
                                  f"the scores' {list(scores)} (2 to 4 dims, as local SDPA takes)")  # fmt: skip
    if not isinstance(dropout_p, float | int) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise InvalidArgument(f"fused attention: dropout_p must be a number in [0, 1) (gpupool's clients take torch's "
                              f"math path for 1), not {dropout_p!r}")  # fmt: skip
    if scale is not None and (not isinstance(scale, float | int) or not math.isfinite(scale)):
        raise InvalidArgument(f"fused attention: scale must be a finite number or None, not {scale!r}")
    if debug:
        raise InvalidArgument("fused attention: return_debug_mask is not supported")


def _validate_forward(args: Args, kwargs: Kwargs) -> None:
    check_forward(
        arg(args, kwargs, 0, "query"), arg(args, kwargs, 1, "key"), arg(args, kwargs, 2, "value"),
        arg(args, kwargs, 3, "attn_bias"), arg(args, kwargs, 4, "dropout_p", 0.0), kwargs.get("scale"),
        arg(args, kwargs, 6, "return_debug_mask", False),
    )  # fmt: skip


def _validate_backward(args: Args, kwargs: Kwargs) -> None:
    check_backward(
        arg(args, kwargs, 0, "grad_out"), arg(args, kwargs, 1, "query"), arg(args, kwargs, 2, "key"),
        arg(args, kwargs, 3, "value"), arg(args, kwargs, 4, "attn_bias"), arg(args, kwargs, 5, "grad_input_mask"),
        arg(args, kwargs, 6, "out"), arg(args, kwargs, 7, "logsumexp"), arg(args, kwargs, 12, "dropout_p", 0.0),
        arg(args, kwargs, 14, "philox_seed"), kwargs.get("scale"),
    )  # fmt: skip


def check_backward(
    grad_out: Any, q: Any, k: Any, v: Any, bias: Any, mask: Any, out: Any, logsumexp: Any, dropout_p: Any,
    seed: Any, scale: Any,
) -> None:  # fmt: skip
    """The hostile-input rules of the backward (`_validate_backward`'s, its arguments by name: `backward` calls it
    so, round 44: the argument list and its eleven lookups were ~25k instructions a call)."""
    check_forward(q, k, v, bias, dropout_p, scale)
    qs = q.shape
    b, h, length = qs[0], qs[1], qs[2]
    shape = (b, h, length, v.shape[3])
    for name, t in (("grad_out", grad_out), ("out", out)):
        t = _tensor(t, name)
        if t.shape != shape or t.dtype != q.dtype:
            raise InvalidArgument(f"fused attention backward: {name} must be {q.dtype} of shape {list(shape)}")
    lse = _tensor(logsumexp, "logsumexp")
    if lse.shape != (b, h, length) or lse.dtype != torch.float32:
        raise InvalidArgument(f"fused attention backward: logsumexp must be float32 of shape {[b, h, length]}")
    if not isinstance(mask, list | tuple) or len(mask) != 4 or not all(isinstance(m, bool) for m in mask):
        raise InvalidArgument("fused attention backward: grad_input_mask must be 4 bools")
    if dropout_p > 0:  # the forward's generator state (`_saved_generator` at the run)
        if not isinstance(seed, Tensor) or seed.dim() != 0 or seed.dtype != torch.int64 or seed.device != q.device:
            raise InvalidArgument("fused attention backward: with dropout, philox_seed must be the forward's: a 0-d "
                                  "int64 tensor on the query's device")  # fmt: skip


# Both read only their tensors' dims, dtypes and shapes and their other arguments' values (constants of a record
# template), and the backward with dropout its philox_seed's device: learned runs rely on it (`guards.fixed_guard`:
# such a step skips them per record, the native runner compares that device). A check of anything else (a tensor's
# values, its storage) must be declared there too.
VALIDATORS: dict[str, Callable[[Args, Kwargs], None]] = {FORWARD: _validate_forward, BACKWARD: _validate_backward}


def _scale(q: Tensor, scale: float | None) -> float:
    """The scores' scale; any for a head size of 0, whose scores are all 0 (round 21 divided by 0: INTERNAL)."""
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0


def _float_bias(bias: Tensor | None, dtype: torch.dtype, ops: Ops = EAGER) -> Tensor | None:
    """A bool mask as torch's `convert_boolean_attn_mask` makes it: 0 where True, -inf where False."""
    if bias is None or bias.dtype != torch.bool:
        return bias
    zeros = ops.call(aten.zeros.default, list(bias.shape), dtype=dtype, device=ops.device(bias))
    return ops.call(aten.masked_fill_.Scalar, zeros, ops.call(aten.logical_not.default, bias), -math.inf)


def _dense(t: Tensor) -> bool:
    """Whether `t` is non-overlapping and dense (`torch.empty_like` then keeps its strides), for <= 4 dims."""
    expected = 1
    # by stride (then size: among equal strides the order changes nothing, two of size > 1 fail either way), with no
    # key function called per dimension
    for stride, size in sorted(zip(t.stride(), t.shape, strict=True)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _four_d(bias: Tensor | None, ops: Ops = EAGER) -> Tensor | None:
    """A mask of 2 or 3 dims (`check_forward` refuses fewer, as local SDPA does) as a 4-D view: the CPU flash kernels
    take only 2-D or 4-D masks ("Attention mask dim in {2, 4}"), where local SDPA broadcasts a 3-D one (round 21
    answered it, which the clients send fused, with INVALID_ARGUMENT)."""
    while bias is not None and bias.dim() < 4:
        bias = ops.call(aten.unsqueeze.default, bias, 0)
    return bias


def _kernel_layout(t: Tensor) -> bool:
    """Whether a kernel may read `t` as it is: non-overlapping and dense, its last dimension's elements adjacent."""
    return _dense(t) and (t.stride(-1) == 1 or t.shape[-1] <= 1)


def _dense_or_copy(t: Tensor, ops: Ops = EAGER) -> Tensor:
    """A kernel's tensor input as non-overlapping and dense memory, its last dimension contiguous: an expanded
    (stride 0) or overlapping view from a client becomes a copy, so no kernel that walks memory by its sizes reads
    past a storage (round 18's lesson), and so does a dense view whose last dimension is not contiguous (a
    transposed query, key, value, grad_out or out): the CPU flash kernels read each row's head as adjacent
    elements whatever its stride (torch's SDPA front end makes it so before them), and returned values that were
    neither the inputs' nor 0s, different run to run (round 21: up to 8e24 for inputs of randn)."""
    return t if _kernel_layout(t) else ops.call(aten.contiguous.default, t)


def _like(ref: Tensor, t: Tensor, ops: Ops = EAGER) -> Tensor:
    """`t` with `torch.empty_like(ref)`'s strides (the meta kernel's grads), copied only where they differ."""
    if t.shape == ref.shape and t.stride() == ref.stride() and _dense(ref):
        return t  # the usual case: the kernel's grads are laid out as its inputs
    want = torch.empty_like(ref, device="meta").stride()
    if t.stride() == want:
        return t
    return ops.call(aten.copy_.default, ops.call(aten.empty_like.default, ref), t)


def _matching_layout(q: Tensor, t: Tensor, ops: Ops = EAGER) -> Tensor:
    """`t` (the output) in the meta kernel's layout: `alloc_with_matching_layout(query, shape)`."""
    if t.shape == q.shape:
        return _like(q, t, ops)
    order = sorted(range(4), key=lambda i: q.stride()[i], reverse=True)
    strides = [0] * 4
    stride = 1
    for i in reversed(order):
        strides[i] = stride
        stride *= t.shape[i]
    if list(t.stride()) == strides:
        return t
    empty = ops.call(aten.empty_strided.default, list(t.shape), strides, dtype=t.dtype, device=ops.device(t))
    return ops.call(aten.copy_.default, empty, t)


def _scores(q: Tensor, k: Tensor, bias: Tensor | None, is_causal: bool, scale: float) -> Tensor:
    s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(keep.logical_not(), -math.inf)
    fb = _float_bias(bias, q.dtype)
    if fb is not None:
        s = s + fb.float()
    return s


def _math(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, is_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(output, logsumexp) of the math composition; a row with every score masked gives 0s (torch's `_safe_softmax`)."""
    s = _scores(q, k, bias, is_causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    p = torch.where(torch.isfinite(lse).unsqueeze(-1), p, torch.zeros((), device=p.device))
    return torch.matmul(p, v.float()).to(q.dtype), lse


# Kernels a fused call runs: local CPU's flash kernel (fake GPUs), the mem-efficient kernel (CUDA), the math one, and
# torch's math path with its seeded dropout (dropout_p > 0, any device). KEPT: a graph's forward with dropout on a CUDA
# device, which keeps its softmax and mask for the backward and reads no generator state (`_dropout_forward_saving`
# without the state): what a CUDA graph can hold (server/graph_cuda.py).
FLASH_CPU, EFFICIENT, MATH, DROPOUT, KEPT = "flash_cpu", "efficient", "math", "dropout", "dropout_kept"


def _efficient_ok(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, device: torch.device | None = None) -> bool:
    """torch's sdp_utils constraints of the mem-efficient kernel that this call can fail (a CUDA device): dtypes the
    device's architecture has (bfloat16 from sm80, nothing below sm50), the head sizes' gemm alignment (the largest
    `minimum_gemm_alignment` gives), unit last strides, non-empty lengths. `device`: the GPU, when the caller cannot
    read it off `q` (a graph's definition decides on meta tensors)."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    align = 4 if q.dtype == torch.float32 else 8
    if q.shape[-1] % align or v.shape[-1] % align:
        return False
    if any(t.stride(-1) != 1 for t in (q, k, v)) or q.shape[2] == 0 or k.shape[2] == 0:
        return False
    if bias is not None and bias.dtype not in (q.dtype, torch.bool):
        return False
    dev = device if device is not None else q.device
    if dev.type == "cuda" and torch.cuda.is_available():
        major = torch.cuda.get_device_capability(dev)[0]
        if major < 5 or (q.dtype == torch.bfloat16 and major < 8):
            return False
    return True


def choose_kernel(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, device: torch.device, dropout: bool = False
) -> str:
    """The kernel a fused call runs on `device`, decided from the inputs' shapes, strides and dtypes alone (after
    `_dense_or_copy`) and whether it drops out: per call for an eager op, once at a graph's definition for its calls
    (meta tensors)."""
    if dropout:
        return DROPOUT
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return MATH
    if device.type == "cpu":
        return FLASH_CPU if v.shape[3] == q.shape[3] else MATH
    if device.type == "cuda" and _efficient_ok(q, k, v, bias, device):
        return EFFICIENT
    return MATH


def _cuda_bias(bias: Tensor | None, q: Tensor, k: Tensor) -> Tensor | None:
    """The bias as torch's SDPA hands it to the efficient kernel (attention.cpp `preprocess_mask`): float, expanded to
    (B, H, L, S), its last dim's storage padded to a multiple of 16 elements."""
    fb = _float_bias(bias, q.dtype)
    if fb is None:
        return None
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    s = shape[3]
    if s % 16:
        padded = torch.zeros((*shape[:3], s + 16 - s % 16), dtype=fb.dtype, device=fb.device)
        padded[..., :s] = fb.expand(shape)
        return padded[..., :s]
    return fb.expand(shape)


# ---- dropout: torch's math path, its mask from the session's seeded stream ----

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _root_scales(q: Tensor, scale: float | None) -> tuple[float, float]:
    """The factors the math path multiplies the query and the key by: the square root of `sdp::calculate_scale` each,
    the query's negated for a negative scale (a head size of 0: 1, no element is scaled)."""
    if scale is None:
        root = math.sqrt(1.0 / math.sqrt(q.shape[-1])) if q.shape[-1] else 1.0
        return root, root
    root = math.sqrt(abs(scale))
    return (0.0 - root if scale < 0 else root), root


def _drop(attn: Tensor, p: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(attn dropped out, its bool mask) as the daemon's `native_dropout` computes them for a client's math path:
    on a fake GPU fallbacks' (a bool mask drawn by `bernoulli_(1 - p)`, `attn * mask * (1 / (1 - p))`), on CUDA the
    kernel's. `generator` None: the device's default one (the forward: the session's stream, `_seeded`); else a
    private generator in the forward's state (the backward: the same mask again).
    CUDA (both ran on an H200 in round 31, the encoders' eager steps): `native_dropout` takes no generator;
    `_fused_dropout` (p: the probability to keep) is the same `dropout_cuda` kernel with the same philox draws, its
    mask uint8 instead of bool."""
    if attn.device.type == "cuda":
        if generator is None:
            out, mask = aten.native_dropout.default(attn, p, True)
            return out, mask
        out, mask8 = aten._fused_dropout.default(attn, 1.0 - p, generator)
        return out, mask8.bool()
    p1m = 1.0 - p
    mask = torch.empty_like(attn, dtype=torch.bool).bernoulli_(p1m, generator=generator)
    return fallbacks._MUL_SCALAR_(attn.mul(mask.view(torch.uint8)), 1.0 / p1m), mask


def _drop_backward(grad: Tensor, mask: Tensor, p: float) -> Tensor:
    """`native_dropout_backward` as the daemon runs it for a client's math path (fake GPUs: fallbacks')."""
    if grad.device.type == "cuda":
        return aten.native_dropout_backward.default(grad, mask, 1.0 / (1.0 - p))  # type: ignore[no-any-return]
    return fallbacks._native_dropout_backward(grad, mask, 1.0 / (1.0 - p))


def _operands(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """The 3-D operands of `_bmm` and their common batch."""
    batch = (max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1]))
    a3 = a.expand(*batch, a.shape[2], a.shape[3]).reshape(batch[0] * batch[1], a.shape[2], a.shape[3])
    b3 = b.expand(*batch, b.shape[2], b.shape[3]).reshape(batch[0] * batch[1], b.shape[2], b.shape[3])
    return a3, b3, batch


def _bmm(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`torch.matmul` of two 4-D tensors as it decomposes (its batched path): both expanded to the common batch and
    reshaped to 3-D (a view where possible, else a copy), `bmm`, viewed back. Returns (product, a's 3-D operand, b's):
    the tensors autograd of the math path saves for the bmm's gradient, which `_dropout_backward` computes with."""
    a3, b3, batch = _operands(a, b)
    return torch.bmm(a3, b3).view(*batch, a.shape[2], b.shape[3]), a3, b3


def _dropout_math(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, p: float, is_causal: bool, scale: float | None,
    generator: torch.Generator | None, saved: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, list[Any]]:  # fmt: skip
    """(output, what the backward needs) of torch's `_scaled_dot_product_attention_math` with dropout, op by op as a
    client's math path sends them: low precision computed in float32, q and k scaled by the scale's square root each,
    the mask added, `_safe_softmax`, dropout, the second matmul, the query's dtype. `generator`: `_drop`'s. `saved`:
    the forward's softmax and mask (`_dropout_forward_saving`): the backward's recomputation then skips the scores,
    the softmax and the draw, and multiplies the dropped scores again from them as `_drop` did (the same bits)."""
    origin = q.dtype
    if origin in _LOW_PRECISION:
        q, k, v = q.to(torch.float32), k.to(torch.float32), v.to(torch.float32)
    q_root, k_root = _root_scales(q, scale)
    q = aten.mul.Scalar(q, q_root)  # the math path's C++ `tensor * SymFloat`: the .Scalar overload (autograd's too)
    if saved is not None:
        attn, kept = saved
        q3, kt3, _ = _operands(q, aten.mul.Scalar(k.transpose(-2, -1), k_root))
        dropped = fallbacks._MUL_SCALAR_(attn.mul(kept.view(torch.uint8)), 1.0 / (1.0 - p))
        b, h = attn.shape[0], attn.shape[1]
        dropped3 = dropped.reshape(b * h, attn.shape[2], attn.shape[3])
        v3 = v.expand(b, h, v.shape[2], v.shape[3]).reshape(b * h, v.shape[2], v.shape[3])
        return dropped, [None, q3, kt3, attn, kept, dropped3, v3, q_root, k_root]
    mask = _float_bias(bias, origin)  # the front end's `convert_boolean_attn_mask`, in the query's own dtype
    if is_causal:  # the math path's own causal mask (a client's causal call carries no mask; both: both apply)
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        causal = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(keep.logical_not(), -math.inf)
        mask = causal if mask is None else mask + causal
    scores, q3, kt3 = _bmm(q, aten.mul.Scalar(k.transpose(-2, -1), k_root))
    if mask is not None:
        scores = scores + mask
    attn = aten._safe_softmax.default(scores, -1)
    dropped, kept = _drop(attn, p, generator)
    if generator is not None:  # the backward's recomputation: the second matmul's operands, not its product
        b, h = attn.shape[0], attn.shape[1]
        dropped3 = dropped.reshape(b * h, attn.shape[2], attn.shape[3])
        v3 = v.expand(b, h, v.shape[2], v.shape[3]).reshape(b * h, v.shape[2], v.shape[3])
        return dropped, [scores, q3, kt3, attn, kept, dropped3, v3, q_root, k_root]
    out, dropped3, v3 = _bmm(dropped, v)
    return out.to(origin), [scores, q3, kt3, attn, kept, dropped3, v3, q_root, k_root]


def _generator_state(device: torch.device) -> Tensor:
    """The device's default generator state (uint8, on the CPU): the session's stream inside `_seeded`."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _state_bytes(device: torch.device) -> int:
    """Bytes of a generator state of `device`: the CPU's mt19937 (5056), a CUDA generator's seed and offset (16)."""
    return 16 if device.type == "cuda" else _CPU_STATE_BYTES


_CPU_STATE_BYTES = int(torch.Generator().get_state().numel())
_MT_N = 624  # words of the mt19937 state (torch's MERSENNE_STATE_N)


def _check_mt19937(state: Tensor) -> None:
    """A CPU generator state (`CPUGeneratorImplState`'s bytes) whose draws stay inside its 624 words. torch's
    `set_state` checks 1 <= left <= 624 and next <= 624 (next truncated to 32 bits) but each draw reads word
    `next++` and regenerates only when `--left` reaches 0: a state of left 624 and next 624 read the 623 words past
    the array -- the generator object's end and the heap after it -- into a forged `philox_seed`'s mask (round 24).
    Every state a generator reaches has left + next = 625 (or 1 and 0 right after a seed)."""
    head = state[:24].view(torch.int64).tolist()  # the_initial_seed, (left, seeded) as int32s, next
    left = int(state[8:12].view(torch.int32).item())
    seeded = int(state[12:16].view(torch.int32).item())
    nxt = head[2]
    if not (seeded and 1 <= left <= _MT_N and 0 <= nxt <= _MT_N and left + nxt <= _MT_N + 1):
        raise InvalidArgument("fused attention backward: philox_seed holds no generator state a forward saved "
                              f"(mt19937 left {left}, next {nxt})")  # fmt: skip


def _dropout_forward(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, p: float, is_causal: bool, scale: float | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward's outputs: the mask drawn from the device's default generator (the session's stream: the forward
    is a seeded op), `philox_seed` a 0-d int64 view of the state it drew from (`_saved_generator`), `philox_offset` 0,
    and a logsumexp of zeros: torch's math path makes none, the backward recomputes the scores (a real one cost ~15 %
    of the encoder's forward call), and nothing else reads it (a client cannot: SDPA returns the output only).
    """
    state = _generator_state(q.device)
    out, _ = _dropout_math(q, k, v, bias, p, is_causal, scale, None)
    lse = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)  # what nothing reads: `_dropout_forward`
    seed = written_whole(state.view(torch.int64).to(q.device).as_strided([], [], 0))  # the state under it
    offset = torch.zeros((), dtype=torch.long, device=q.device)
    return _matching_layout(q, out), lse, seed, offset


def _saved_generator(philox_seed: Tensor, device: torch.device) -> torch.Generator:
    """A private generator of `device` in the state a forward saved in `philox_seed` (`_dropout_forward`): the whole
    storage under the 0-d view. Hostile: another size is INVALID_ARGUMENT, a state torch refuses too (its mt19937
    check), and a forged one that passes only changes the session's own gradients."""
    want = _state_bytes(device)
    storage = philox_seed.untyped_storage()
    if philox_seed.dtype != torch.int64 or philox_seed.storage_offset() != 0 or storage.nbytes() != want:
        raise InvalidArgument(f"fused attention backward: with dropout, philox_seed must be the forward's (a view of "
                              f"a {want}-byte generator state)")  # fmt: skip
    state = philox_seed.as_strided([want // 8], [1], 0).cpu().view(torch.uint8).clone()
    if device.type != "cuda":
        _check_mt19937(state)
    generator = torch.Generator(device=device)
    try:
        generator.set_state(state)
    except RuntimeError as exc:
        raise InvalidArgument(f"fused attention backward: philox_seed holds no generator state: {exc}") from None
    return generator


def _saved_sizes(q: Tensor, k: Tensor) -> tuple[torch.Size, torch.dtype, int]:
    """(shape, dtype, bytes) of what an eager forward on a fake GPU keeps for its backward after the generator state
    (`_dropout_forward_saving`): the softmax (B, H, L, S) in the dtype the composition computes in, then its bool
    mask, the whole padded to 8 bytes (the state's int64 view)."""
    dtype = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype
    shape = torch.Size((q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    n = shape.numel()
    return shape, dtype, -(-(n * dtype.itemsize + n) // 8) * 8


def _dropout_forward_saving(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, p: float, is_causal: bool, scale: float | None,
    with_state: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """`_dropout_forward` that also keeps the softmax and the mask for the backward, in the storage of `philox_seed`
    after the generator state (an eager call): the backward then skips recomputing the scores, the softmax and the
    draw (the classifier's two attention dropouts a step: ~40 % of its step's random draws, round 28).
    They are B x H x L x S x 5 bytes in float32 (9 in float64) held from the forward to the backward, as the math path
    holds its softmax, mask and dropped scores (9 bytes) under autograd; the storage's bytes count against the quota
    as every storage's do (server/sessions.py), and the forward's admission already counted them among its temporaries
    (`DROPOUT_FORWARD_BYTES`). A graph's forward (the library op) keeps the state only: its backward recomputes; but
    on a CUDA device a graph's forward is this one (`KEPT`) `with_state` False: the state's bytes zeros, no generator
    state read on the host (a CUDA graph could not hold that), the backward from the kept scores alone. An eager call
    on CUDA runs it `with_state` False too (round 31): the state read on the host and copied to the device is a
    synchronous copy of pageable memory, and a backward from it read it back (`.cpu()`: a wait for the whole stream)
    and recomputed the scores, softmax and mask (6 more kernels), per call."""
    state = _generator_state(q.device) if with_state else None
    out, kept_for_backward = _dropout_math(q, k, v, bias, p, is_causal, scale, None)
    attn, kept = kept_for_backward[3], kept_for_backward[4]
    del kept_for_backward  # the scores, the dropped scores: freed before the buffer is allocated
    shape, dtype, extra = _saved_sizes(q, k)
    n = shape.numel()
    head = _state_bytes(q.device)
    buffer = torch.empty(head + extra, dtype=torch.uint8, device=q.device)
    if state is None:
        buffer[:head].zero_()
    else:
        buffer[:head].copy_(state)
    buffer[head : head + n * dtype.itemsize].view(dtype).view(shape).copy_(attn)
    buffer[head + n * dtype.itemsize : head + n * dtype.itemsize + n].view(torch.bool).view(shape).copy_(kept)
    if extra > n * dtype.itemsize + n:  # the padding: no byte of the storage left unwritten
        buffer[head + n * dtype.itemsize + n :].zero_()
    lse = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)  # what nothing reads: `_dropout_forward`
    seed = written_whole(buffer.view(torch.int64).as_strided([], [], 0))  # state, softmax, mask, padding: written
    offset = torch.zeros((), dtype=torch.long, device=q.device)
    return _matching_layout(q, out), lse, seed, offset


def _saved_scores(philox_seed: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor] | None:
    """The softmax and mask an eager forward kept after the generator state in `philox_seed`'s storage
    (`_dropout_forward_saving`), or None where the storage is the state alone (a graph's forward: recompute) or
    anything else (`_saved_generator` refuses it). A forged storage of the right size only changes the session's own
    gradients: its mask is read as uint8 (`_drop_backward`, as `_drop` multiplies), never as bool values."""
    if not isinstance(philox_seed, Tensor) or philox_seed.dtype != torch.int64:
        return None
    head = _state_bytes(q.device)
    shape, dtype, extra = _saved_sizes(q, k)
    storage = philox_seed.untyped_storage()
    if philox_seed.storage_offset() != 0 or storage.nbytes() != head + extra or philox_seed.device != q.device:
        return None
    n = shape.numel()
    size = dtype.itemsize
    if head % size:  # (never: 5056 and 16 bytes of state, 4- or 8-byte scores) the views through a byte tensor
        raw = torch.empty(0, dtype=torch.uint8, device=q.device).set_(storage, 0, (head + extra,), (1,))
        attn = raw[head : head + n * size].view(dtype).view(shape)
        kept = raw[head + n * size : head + n * size + n].view(torch.bool).view(shape)
        return attn, kept
    # each a contiguous view of the storage made at once (round 44: a byte view, a slice and two views each were
    # ~60k instructions of Python an encoder backward); the same bytes, inside the storage whose size is checked above
    strides = _contiguous_strides(shape)
    attn = torch.empty(0, dtype=dtype, device=q.device).set_(storage, head // size, shape, strides)
    kept = torch.empty(0, dtype=torch.bool, device=q.device).set_(storage, head + n * size, shape, strides)
    return attn, kept


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a contiguous tensor of `shape`."""
    strides = []
    stride = 1
    for size in reversed(shape):
        strides.append(stride)
        stride *= max(size, 1)
    return tuple(reversed(strides))


def _dropout_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, p: float, is_causal: bool,
    scale: float | None, philox_seed: Tensor, want_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """The gradients of `_dropout_forward` in the meta kernel's layouts: the forward recomputed with the same mask (the
    forward's state on a private generator: the session's stream does not move), then what autograd of the math path
    runs, kernel for kernel on the same operands (derivatives.yaml: `_to_copy`, `mul.Scalar`, `bmm`, `_safe_softmax`,
    `native_dropout`), so the math path's bits -- without autograd's own cost here (3-4x the kernels' time)."""
    saved = _saved_scores(philox_seed, q, k)
    generator = _saved_generator(philox_seed, q.device) if saved is None else None
    _, (_, q3, kt3, attn, kept, dropped3, v3, q_root, k_root) = _dropout_math(
        q, k, v, bias, p, is_causal, scale, generator, saved
    )
    g = grad.to(torch.float32) if q.dtype in _LOW_PRECISION else grad
    b, h, length, source = attn.shape
    g3 = g.reshape(b * h, length, v3.shape[2])
    grad_v = torch.bmm(dropped3.transpose(1, 2), g3).view(b, h, source, v3.shape[2])
    grad_dropped = torch.bmm(g3, v3.transpose(1, 2)).view(b, h, length, source)
    grad_scores = aten._softmax_backward_data.default(_drop_backward(grad_dropped, kept, p), attn, -1, attn.dtype)
    s3 = grad_scores.view(b * h, length, source)
    grad_q = torch.bmm(s3, kt3.transpose(1, 2)).view(b, h, length, q3.shape[2])
    grad_k = torch.bmm(q3.transpose(1, 2), s3).view(b, h, kt3.shape[1], source)
    if q.dtype not in _LOW_PRECISION:
        gb = grad_scores if want_bias and bias is not None and bias.is_floating_point() else None
        return (
            _scaled_like(q, grad_q, q_root),
            _scaled_like(k, grad_k, k_root, True),
            _like(v, grad_v),
            _bias_grad(bias, gb),
        )
    grad_q = aten.mul.Scalar(grad_q, q_root)
    grad_k = aten.mul.Scalar(grad_k, k_root).transpose(-2, -1)
    grad_q, grad_k, grad_v = grad_q.to(q.dtype), grad_k.to(q.dtype), grad_v.to(q.dtype)
    gb = grad_scores if want_bias and bias is not None and bias.is_floating_point() else None
    return _like(q, grad_q), _like(k, grad_k), _like(v, grad_v), _bias_grad(bias, gb)


def _scaled_like(ref: Tensor, t: Tensor, factor: float, transposed: bool = False) -> Tensor:
    """`_like(ref, aten.mul.Scalar(t, factor))` (`t.transpose(-2, -1)`'s product where `transposed`), the product
    written by the multiply itself into `_like`'s layout where `_like` would copy it (the query's and key's gradients
    of the dropout composition, whose client's views of a packed projection are laid out otherwise than the bmm's
    products): `mul.out` is `mul.Scalar`'s kernel on the same operands (the same bits), one kernel where a multiply
    and a copy were two (round 31)."""
    # `torch.empty_like` keeps a dense tensor's strides: no meta tensor made for them (round 44)
    want = ref.stride() if _dense(ref) else torch.empty_like(ref, device="meta").stride()
    seen = t.transpose(-2, -1) if transposed else t
    if seen.shape != ref.shape or seen.stride() == tuple(want) or t.dtype != ref.dtype:
        product = aten.mul.Scalar(t, factor)
        return _like(ref, product.transpose(-2, -1) if transposed else product)
    target = torch.empty_like(ref)
    torch.mul(t, factor, out=target.transpose(-2, -1) if transposed else target)
    return target


# The dropout composition as two operators of the dispatcher (Python kernels, the CPU's and CUDA's, and meta kernels
# of the overrideable op's shapes): the eager op and a graph's Python replay call them like any other op, and a traced
# graph holds each as one node, whose kernel the TorchScript interpreter calls back -- the composition itself reads
# and sets generator states, which no aten op does, so it could not be written out node by node.
_LIBRARY = torch.library.Library("gpupool_attention", "DEF")
_LIBRARY.define(
    "dropout_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_bias, float dropout_p, bool is_causal, "
    "float? scale) -> (Tensor, Tensor, Tensor, Tensor)"
)
_LIBRARY.define(
    "dropout_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? attn_bias, float dropout_p, "
    "bool is_causal, float? scale, Tensor philox_seed) -> (Tensor, Tensor, Tensor)"
)


def _dropout_backward_qkv(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, p: float, is_causal: bool,
    scale: float | None, philox_seed: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    gq, gk, gv, _ = _dropout_backward(grad, q, k, v, bias, p, is_causal, scale, philox_seed, False)
    return gq, gk, gv


def _dropout_forward_meta(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, p: float, is_causal: bool, scale: float | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out = _matching_layout(q, torch.empty((*q.shape[:3], v.shape[3]), dtype=q.dtype, device=q.device))
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    seed, offset = (torch.empty((), dtype=torch.long, device=q.device) for _ in range(2))
    return out, lse, seed, offset


def _dropout_backward_meta(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, p: float, is_causal: bool,
    scale: float | None, philox_seed: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


for _key in ("CPU", "CUDA"):
    _LIBRARY.impl("dropout_forward", _dropout_forward, _key)
    _LIBRARY.impl("dropout_backward", _dropout_backward_qkv, _key)
_LIBRARY.impl("dropout_forward", _dropout_forward_meta, "Meta")
_LIBRARY.impl("dropout_backward", _dropout_backward_meta, "Meta")
_DROPOUT_FORWARD = torch.ops.gpupool_attention.dropout_forward.default
_DROPOUT_BACKWARD = torch.ops.gpupool_attention.dropout_backward.default


def fused_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_bias: Tensor | None = None, dropout_p: float = 0.0,
    is_causal: bool = False, return_debug_mask: bool = False, *, scale: float | None = None,
) -> tuple[Any, ...]:  # fmt: skip
    """The overrideable forward: (output, logsumexp, None, None, L, S, seed, offset, None) as torch's meta kernel."""
    return forward(EAGER, None, query, key, value, attn_bias, dropout_p, is_causal, return_debug_mask, scale=scale)


def forward(
    ops: Ops, kernel: str | None, query: Tensor, key: Tensor, value: Tensor, attn_bias: Tensor | None = None,
    dropout_p: float = 0.0, is_causal: bool = False, return_debug_mask: bool = False, *, scale: float | None = None,
) -> tuple[Any, ...]:  # fmt: skip
    """`fused_attention` through `ops`; `kernel`: the kernel decided at a graph's definition (None: decide here, and
    an eager call on CUDA also falls back to the math composition when the kernel itself refuses)."""
    check_forward(query, key, value, attn_bias, dropout_p, scale, return_debug_mask)
    scale = None if scale is None else float(scale)
    if kernel == KEPT or (kernel is None and dropout_p > 0):  # keeps its scores: every eager call
        dropped = _dropout_forward_saving(query, key, value, attn_bias, float(dropout_p), is_causal, scale,
                                          with_state=kernel is None and query.device.type != "cuda")  # fmt: skip
        return (dropped[0], dropped[1], None, None, query.shape[2], key.shape[2], dropped[2], dropped[3], None)
    if kernel == DROPOUT or (kernel is None and dropout_p > 0):  # one call (`_LIBRARY`): a traced graph's node too
        dropped = ops.call(_DROPOUT_FORWARD, query, key, value, attn_bias, float(dropout_p), is_causal, scale)
        return (dropped[0], dropped[1], None, None, query.shape[2], key.shape[2], dropped[2], dropped[3], None)
    q, k, v = _dense_or_copy(query, ops), _dense_or_copy(key, ops), _dense_or_copy(value, ops)
    bias = _four_d(attn_bias, ops)
    length, source = q.shape[2], k.shape[2]
    chosen = kernel if kernel is not None else choose_kernel(q, k, v, bias, q.device)
    out: Tensor | None = None
    lse: Tensor | None = None
    if chosen == FLASH_CPU:
        mask = _float_bias(bias, q.dtype, ops)
        out, lse = ops.call(aten._scaled_dot_product_flash_attention_for_cpu.default, q, k, v, 0.0, is_causal,
                            attn_mask=mask, scale=scale)  # fmt: skip
    elif chosen == EFFICIENT:
        ops.untraceable("the mem-efficient kernel")
        try:
            out, lse, _, _ = aten._scaled_dot_product_efficient_attention.default(
                q, k, v, _cuda_bias(bias, q, k), True, 0.0, is_causal, scale=scale
            )
            lse = lse[..., :length]
        except RuntimeError:
            if kernel is not None:  # a graph's choice stands: its run fails with the kernel's error
                raise
            out = lse = None  # an eager call: a constraint not checked above, the math composition on the same GPU
    if out is None or lse is None:
        ops.untraceable("the math composition")
        out, lse = _math(q, k, v, bias, is_causal, _scale(q, scale))
    seed = ops.call(aten.zeros.default, [], dtype=torch.long, device=ops.device(q))
    offset = ops.call(aten.zeros.default, [], dtype=torch.long, device=ops.device(q))
    lse = ops.call(aten.contiguous.default, lse)
    return (_matching_layout(query, out, ops), lse, None, None, length, source, seed, offset, None)


def _math_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, is_causal: bool, scale: float,
    want_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """The gradients of `_math`, by autograd over it (recomputed: L x S memory, as torch's math path holds)."""
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        bb = None
        if bias is not None:
            bb = bias.detach()
            if want_bias and bb.is_floating_point():
                bb = bb.requires_grad_()
        out, _ = _math(qq, kk, vv, bb, is_causal, scale)
        inputs = [qq, kk, vv] + ([bb] if bb is not None and bb.requires_grad else [])
        grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    gb = grads[3] if len(grads) > 3 else None
    return grads[0], grads[1], grads[2], gb


def fused_attention_backward(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, attn_bias: Tensor | None, grad_input_mask: list[bool],
    out: Tensor, logsumexp: Tensor, cum_seq_q: Any, cum_seq_k: Any, max_q: int, max_k: int, dropout_p: float,
    is_causal: bool, philox_seed: Any, philox_offset: Any, *, scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """The overrideable backward: (grad_query, grad_key, grad_value, grad_attn_bias) as torch's meta kernel (a bias's
    grad is zeros unless `grad_input_mask[3]` asks for it; None without a bias)."""
    return backward(
        EAGER, None, grad_out, query, key, value, attn_bias, grad_input_mask, out, logsumexp, cum_seq_q, cum_seq_k,
        max_q, max_k, dropout_p, is_causal, philox_seed, philox_offset, scale=scale,
    )  # fmt: skip


def backward_kernel(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, grad_input_mask: Any, device: torch.device
) -> str:
    """The backward's kernel: the forward's, except the math composition for a bias's gradient (no kernel here
    computes one)."""
    if bool(grad_input_mask[3]) and bias is not None and bias.is_floating_point():
        return MATH
    return choose_kernel(q, k, v, bias, device)


def backward(
    ops: Ops, kernel: str | None, grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
    attn_bias: Tensor | None, grad_input_mask: list[bool], out: Tensor, logsumexp: Tensor, cum_seq_q: Any,
    cum_seq_k: Any, max_q: int, max_k: int, dropout_p: float, is_causal: bool, philox_seed: Any, philox_offset: Any,
    *, scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """`fused_attention_backward` through `ops`; `kernel` as `forward`'s."""
    check_backward(grad_out, query, key, value, attn_bias, grad_input_mask, out, logsumexp, dropout_p, philox_seed,
                   scale)  # fmt: skip
    scale = None if scale is None else float(scale)
    want_bias = bool(grad_input_mask[3]) and attn_bias is not None and attn_bias.is_floating_point()
    if kernel == DROPOUT or (kernel is None and dropout_p > 0):
        # a bias's gradient too (no client asks the fused op for it), or an eager call (its forward kept its scores:
        # `forward`), not through the library op: the same function as its kernels, without the dispatcher's round
        # trip into Python and back (~20 us of the encoder's ~120 us call)
        if want_bias or kernel is None:
            if want_bias:
                ops.untraceable("dropout with a bias's gradient")
            return _dropout_backward(grad_out, query, key, value, attn_bias, float(dropout_p), is_causal, scale,
                                     philox_seed, want_bias)  # fmt: skip
        gq, gk, gv = ops.call(_DROPOUT_BACKWARD, grad_out, query, key, value, attn_bias, float(dropout_p), is_causal,
                              scale, philox_seed)  # fmt: skip
        return gq, gk, gv, _bias_grad(attn_bias, None, ops)
    q, k, v = _dense_or_copy(query, ops), _dense_or_copy(key, ops), _dense_or_copy(value, ops)
    grad_out, out = _dense_or_copy(grad_out, ops), _dense_or_copy(out, ops)
    logsumexp = _dense_or_copy(logsumexp, ops)
    bias = _four_d(attn_bias, ops)
    chosen = kernel if kernel is not None else backward_kernel(q, k, v, bias, grad_input_mask, q.device)
    gq = gk = gv = gb = None
    if chosen == FLASH_CPU:
        mask = _float_bias(bias, q.dtype, ops)
        gq, gk, gv = ops.call(aten._scaled_dot_product_flash_attention_for_cpu_backward.default, grad_out, q, k, v,
                              out, logsumexp, 0.0, is_causal, attn_mask=mask, scale=scale)  # fmt: skip
    elif chosen == EFFICIENT:
        ops.untraceable("the mem-efficient kernel")
        try:
            length = q.shape[2]
            padded = torch.zeros((*logsumexp.shape[:2], -(-length // 32) * 32), dtype=torch.float32,
                                 device=q.device)  # fmt: skip
            padded[..., :length] = logsumexp
            seed = torch.zeros((), dtype=torch.long, device=q.device)
            gq, gk, gv, _ = aten._scaled_dot_product_efficient_attention_backward.default(
                grad_out, q, k, v, _cuda_bias(bias, q, k), out, padded, seed, seed, 0.0,
                [True, True, True, False], is_causal, scale=scale,
            )  # fmt: skip
        except RuntimeError:
            if kernel is not None:
                raise
            gq = gk = gv = None
    if gq is None or gk is None or gv is None:
        ops.untraceable("the math composition")
        gq, gk, gv, gb = _math_backward(grad_out, q, k, v, bias, is_causal, _scale(q, scale), want_bias)
    return _like(query, gq, ops), _like(key, gk, ops), _like(value, gv, ops), _bias_grad(attn_bias, gb, ops)


def _bias_grad(attn_bias: Tensor | None, gb: Tensor | None, ops: Ops = EAGER) -> Tensor | None:
    """The bias's gradient as the meta kernel's: None without a bias, zeros unless one was computed."""
    if attn_bias is None:
        return None
    if gb is None:
        return ops.call(aten.zeros_like.default, attn_bias)  # type: ignore[no-any-return]
    return _like(attn_bias, _reduce_to(gb, attn_bias).to(attn_bias.dtype))


def _reduce_to(g: Tensor, like: Tensor) -> Tensor:
    """A broadcast bias's gradient summed back to the bias's own shape (autograd already did, kept as a guard)."""
    if g.shape == like.shape:
        return g
    return torch.ops.aten.sum_to_size(g, like.shape)


REPLACEMENTS: dict[str, Callable[..., Any]] = {FORWARD: fused_attention, BACKWARD: fused_attention_backward}


def _drops(name: str, args: Args, kwargs: Kwargs) -> bool:
    """Whether a fused call (through its validator) drops out: the dropout composition runs."""
    p = arg(args, kwargs, 4, "dropout_p", 0.0) if name == FORWARD else arg(args, kwargs, 12, "dropout_p", 0.0)
    return isinstance(p, float | int) and p > 0


def graph_kernel(name: str, args: Args, kwargs: Kwargs, device: torch.device) -> str:
    """The kernel a graph's fused call runs, decided at the graph's definition from its meta arguments (already
    through the validators): the same choice as an eager call's, made once; on CUDA no RuntimeError picks it."""
    base = 0 if name == FORWARD else 1
    q, k, v = (_dense_or_copy(arg(args, kwargs, base + i, n)) for i, n in enumerate(("query", "key", "value")))
    bias = arg(args, kwargs, base + 3, "attn_bias")
    if _drops(name, args, kwargs):
        return KEPT if name == FORWARD and device.type == "cuda" else DROPOUT
    if name == FORWARD:
        return choose_kernel(q, k, v, bias, device)
    return backward_kernel(q, k, v, bias, arg(args, kwargs, 5, "grad_input_mask"), device)


def kept_seed_meta(args: Args, kwargs: Kwargs) -> Tensor:
    """The `philox_seed` a `KEPT` forward returns, as a meta tensor for a graph's dry run: a 0-d int64 view of a storage
    of the state's bytes and the kept softmax and mask, so that the graph's memory plan counts what it holds until
    the backward (the op's own meta kernel returns an 8-byte one)."""
    q, k = arg(args, kwargs, 0, "query"), arg(args, kwargs, 1, "key")
    _, _, extra = _saved_sizes(q, k)
    words = (_state_bytes(torch.device("cuda")) + extra) // 8
    return torch.empty(words, dtype=torch.int64, device="meta").as_strided([], [], 0)


def graph_call(name: str, kernel: str) -> Callable[..., Any]:
    """A graph's fused call: the eager composition with its kernel decided (`graph_kernel`)."""
    composed = forward if name == FORWARD else backward

    def run(*args: Any, **kwargs: Any) -> Any:
        return composed(EAGER, kernel, *args, **kwargs)

    return run


def _uses_math(q: Tensor, k: Tensor, v: Any, bias: Any, device: torch.device) -> bool:
    """Whether the math composition runs for these inputs on `device` (before a CUDA kernel's own failure):
    `choose_kernel`'s answer (v None: the math composition whatever the device, a bias's gradient)."""
    if not isinstance(v, Tensor) or v.dim() != 4:
        return True
    return choose_kernel(q, k, v, bias if isinstance(bias, Tensor) else None, device) == MATH


# Bytes of the math composition's temporaries per score (B x H x L x S), measured on CPU (ru_maxrss, L = S = 2048,
# float32, bench/attention_temporaries.py): the forward's peak 3.5-4.5 x 4 bytes (scores, their masked and
# exponentiated copies), the backward's (recomputed under autograd, which keeps every step's result for its
# gradient) 11-13 x 4 bytes.
MATH_FORWARD_BYTES = 20
MATH_BACKWARD_BYTES = 56
# The dropout composition's (`_dropout_forward`, `_dropout_backward`; measured the same way, dropout_p 0.1: 74.2 and
# 122.8 MiB for 4 Mi scores, 18.6 and 30.7 bytes each): the forward's scores, softmax, bool mask and its products; the
# backward's recomputation of them and the gradients of the scores.
# float64 computes them in 8-byte elements (measured: 34.6 and 50.7 bytes a score), twice the float32 figures admitted
# (round 24: 24 and 40 admitted let a float64 call take 1.4x and 1.3x of them unseen); low precision runs in float32.
DROPOUT_FORWARD_BYTES = 24
DROPOUT_BACKWARD_BYTES = 40


# Bytes per element of the call's tensors (their whole sizes, in 4-byte units; float64: twice) that a composition
# takes besides its scores: q and k scaled by their roots, the products of the second matmul, the backward's gradients
# before they are cast and laid out (and, recomputed under autograd, each step's result). Round 24 counted per score
# only, so a large head size over few scores ran unadmitted: L = S = 128, head size 2^14, float32 (bench/
# attention_temporaries.py "head size 2^14" cases): the dropout forward took 24.6 MB beyond its output with 0.4 MB
# admitted, its backward 41 MB with 0.7, the math backward (value head 2^13) 57.7 MB with 0.9 -- measured 1.0, 1.0
# and 2.0 elements' bytes of its tensors; counted 1.5, 1.5 and 3 (and bfloat16's, float64's: within them).
FORWARD_ELEMENT_BYTES = 6
BACKWARD_ELEMENT_BYTES = 6
MATH_FORWARD_ELEMENT_BYTES = 2  # (measured 0.04: its scaled q and k are views of the float32 copies)
MATH_BACKWARD_ELEMENT_BYTES = 12


def _dropout_bytes(q: Any, per_score: int) -> int:
    """`per_score` of the dropout composition for the dtype it computes in (float64: twice float32's)."""
    return 2 * per_score if isinstance(q, Tensor) and q.dtype == torch.float64 else per_score


def _temporaries(
    tensors: list[Any], q: Any, k: Any, v: Any, bias: Any, math_bytes: int, lse: Any = None,
    device: torch.device | None = None, backward: bool = False, element_bytes: int = FORWARD_ELEMENT_BYTES,
) -> int:  # fmt: skip
    """Bytes a call allocates besides its outputs while it runs, admitted with them (server/cost.py `temporary`):
    dense copies of the `tensors` a client gave expanded or overlapping (`_dense_or_copy`: an expanded view of one
    element is a copy of its whole size), a bool mask's floating copy and its negation (`_float_bias`, on every
    path), and where a composition runs (math or dropout) its scores (`math_bytes` per score), `element_bytes` per
    element of the `tensors` (twice for float64) and, for another dtype than float32, float32 copies of them;
    on CPU the flash kernels' own buffers (`_flash_buffers`); on CUDA the efficient kernel's bias expanded to the
    scores' shape (and the backward's padded logsumexp).
    `device`: where the call runs (a graph's definition sees meta tensors; default: the query's device)."""
    if not isinstance(q, Tensor) or not isinstance(k, Tensor) or q.dim() != 4 or k.dim() != 4:
        return 0
    dev = device if device is not None else q.device
    total = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor) and not _kernel_layout(t))
    scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    if isinstance(bias, Tensor) and bias.dtype == torch.bool:
        total += bias.numel() * (q.element_size() + 1)
    if _uses_math(q, k, v, bias, dev):
        total += math_bytes * scores
        elements = sum(t.numel() for t in tensors if isinstance(t, Tensor))  # (v too where v is None: a composition)
        total += element_bytes * (2 if q.dtype == torch.float64 else 1) * elements
        if q.dtype != torch.float32:
            total += 4 * elements
        if isinstance(bias, Tensor) and bias.dtype != torch.float32:
            total += 4 * bias.numel()
    elif dev.type == "cpu":
        total += _flash_buffers(q, k, backward, v)
    elif dev.type == "cuda":
        if isinstance(bias, Tensor):
            total += scores // k.shape[2] * -(-k.shape[2] // 16) * 16 * q.element_size()
        if lse is not None:
            total += 4 * q.shape[0] * q.shape[1] * -(-q.shape[2] // 32) * 32
    return total


def _flash_buffers(q: Tensor, k: Tensor, backward: bool, v: Any = None) -> int:
    """The CPU flash kernels' own buffers (torch's FlashAttentionKernel.cpp), per thread of the calling thread's
    team: a block of qSplit x kvSplit scores in the accumulation type (float32, float64 for float64), with the
    forward's row maxima and sums and a qSplit x head size block of output, the backward's block of score gradients
    and its row sums; for float16 and bfloat16 the score blocks again in that dtype; the float16 forward's packed
    path (where the CPU has it) reorders key and value, padded to 64; the backward a copy of query, key and value
    in their dtype. qSplit: 256 from 768 query rows, 64 from 192, else 32 (the backward of this
    torch picks it by the heads: the larger of both is taken), at most the rows; kvSplit: 512, at most the keys.
    Round 22 left them out: a head size of 2^14 over 32 rows took a query's size (2 MiB) per thread, unadmitted.
    The packed path is torch's `cpublas::could_pack`: AMX-FP16 for float16, AMX-BF16 for bfloat16, a CPU's own;
    both are admitted wherever it runs (round 25 admitted float16's only, written on a CPU packing float16: a
    bfloat16 forward on this box's AMX-BF16 took 8.2 MiB with 0.1 admitted; the reduced backward's copies were
    not admitted at all: 16 MiB with 6 KiB for a key and value of 65,536 x 64; float32's 1.25 MiB with 0.26 for
    2 heads of 512 queries, 1,024 keys, head size 64; bench/attention_temporaries.py)."""
    length, source, head = q.shape[2], k.shape[2], q.shape[3]
    rows = max(length, q.shape[1]) if backward else length
    qs = min(length, 256 if rows >= 768 else 64 if rows >= 192 else 32)
    kvs = min(source, 512)
    acc = 8 if q.dtype == torch.float64 else 4
    reduced = q.element_size() if q.dtype in (torch.float16, torch.bfloat16) else 0
    if backward:
        per = (2 * qs * kvs + qs) * acc + 4 * qs * kvs * reduced  # (float16's: 2 measured, and 1.2 of them again)
    else:
        per = (qs * kvs + 2 * qs + qs * head) * acc + qs * kvs * reduced
    total = torch.get_num_threads() * per
    if reduced and not backward:
        padded = -(-head // 64) * 64 + 1
        total += 2 * q.shape[0] * q.shape[1] * padded * (-(-source // 64) * 64 + 64) * q.element_size()
        total += torch.get_num_threads() * 2 * (qs + kvs) * padded * reduced  # its blocks' packing (measured 31-80 KiB)
    elif backward:  # a copy of query, key and value in their dtype (measured, every dtype)
        total += q.element_size() * (q.numel() + k.numel() + (v.numel() if isinstance(v, Tensor) else k.numel()))
    return total


def forward_bytes(args: Args, kwargs: Kwargs, device: torch.device | None = None) -> int:
    """The forward's temporaries (`_temporaries`)."""
    q, k, v, bias = (arg(args, kwargs, i, n) for i, n in ((0, "query"), (1, "key"), (2, "value"), (3, "attn_bias")))
    if _drops(FORWARD, args, kwargs) and isinstance(q, Tensor):  # v None: a composition; and the generator's state
        state = _state_bytes(device if device is not None else q.device)
        per_score = _dropout_bytes(q, DROPOUT_FORWARD_BYTES)
        return _temporaries([q, k, v], q, k, None, bias, per_score, device=device) + 2 * state
    return _temporaries([q, k, v], q, k, v, bias, MATH_FORWARD_BYTES, device=device,
                        element_bytes=MATH_FORWARD_ELEMENT_BYTES)  # fmt: skip


def backward_bytes(args: Args, kwargs: Kwargs, device: torch.device | None = None) -> int:
    """The backward's temporaries (`_temporaries`): the math composition also for a bias's gradient."""
    names = ("grad_out", "query", "key", "value", "attn_bias", "grad_input_mask", "out", "logsumexp")
    grad, q, k, v, bias, mask, out, lse = (arg(args, kwargs, i, n) for i, n in enumerate(names))
    if _drops(BACKWARD, args, kwargs):  # the dropout composition (and a copy of the forward's generator state)
        dev = device if device is not None else q.device if isinstance(q, Tensor) else torch.device("cpu")
        extra = 2 * _state_bytes(dev)
        per_score = _dropout_bytes(q, DROPOUT_BACKWARD_BYTES)
        tensors = [grad, q, k, v, out, lse]
        return (
            _temporaries(tensors, q, k, None, bias, per_score, None, device, element_bytes=BACKWARD_ELEMENT_BYTES)
            + extra
        )
    if isinstance(mask, list | tuple) and len(mask) == 4 and mask[3] and isinstance(bias, Tensor):
        v_used = None  # None: the math composition whatever the device
    else:
        v_used = v
    total = _temporaries([grad, q, k, v, out, lse], q, k, v_used, bias, MATH_BACKWARD_BYTES, lse, device, True,
                         MATH_BACKWARD_ELEMENT_BYTES)  # fmt: skip
    if isinstance(grad, Tensor) and _kernel_layout(grad) and not grad.is_contiguous():
        total += grad.numel() * grad.element_size()  # the CPU flash backward's own `grad_out.contiguous()`
    return total


def graph_temporary(name: str, args: Args, kwargs: Kwargs, device: torch.device) -> int:
    """A graph's fused call's temporaries, decided at the graph's definition from its meta arguments for the device
    it runs on (a meta tensor tells no device: without it, a fake GPU's call was sized by the CUDA rule, so a call
    whose math composition runs there -- unequal head sizes -- was admitted without its scores)."""
    return (forward_bytes if name == FORWARD else backward_bytes)(args, kwargs, device)
