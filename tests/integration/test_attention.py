"""scaled_dot_product_attention on gpupool takes the fused backend (one
`_scaled_dot_product_fused_attention_overrideable` op and its backward, run by server/attention.py) where the clients'
choice allows, torch's math path elsewhere, and gives local CPU's outputs and gradients either way: the Python shim
here, the C++ client in a child process (TORCH_DEVICE_BACKEND_AUTOLOAD=0: it must own PrivateUse1); hostile arguments
to the fused ops get INVALID_ARGUMENT from a real daemon, which keeps serving the session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from gpupool.client.session import Handle, Session
from torch.utils._python_dispatch import TorchDispatchMode

from gpupool import errors

ROOT = Path(__file__).resolve().parents[2]
FUSED = "aten._scaled_dot_product_fused_attention_overrideable.default"


class OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def inputs(dtype: torch.dtype = torch.float32, lq: int = 16, lk: int = 12, ev: int = 8, hk: int = 4) -> list[Any]:
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, lq, 8, generator=g, dtype=dtype)
    k = torch.randn(2, hk, lk, 8, generator=g, dtype=dtype)
    v = torch.randn(2, hk, lk, ev, generator=g, dtype=dtype)
    return [q, k, v]


MASKS = {
    "none": None,
    "float": lambda: torch.randn(16, 12, generator=torch.Generator().manual_seed(3)),
    "bool": lambda: torch.rand(2, 1, 16, 12, generator=torch.Generator().manual_seed(4)) > 0.3,
}
CASES = {  # name: (dtype, mask, is_causal, scale)
    "plain": (torch.float32, "none", False, None),
    "causal": (torch.float32, "none", True, None),
    "causal-scale": (torch.float32, "none", True, 0.3),
    "float-mask": (torch.float32, "float", False, None),
    "bool-mask-scale": (torch.float32, "bool", False, 0.5),
    "bf16": (torch.bfloat16, "none", False, None),
    "bf16-mask-scale": (torch.bfloat16, "bool", False, 0.25),
}


def run_sdpa(device: Any, tensors: list[torch.Tensor], mask: Any, **kw: Any) -> tuple[list[str], Any, list[Any]]:
    """(ops dispatched, output, grads of q, k, v) of SDPA on `device`, all on the CPU."""
    ts = [t.to(device).requires_grad_() for t in tensors]
    m = None if mask is None else mask.to(device)
    with OpLog() as log:
        out = F.scaled_dot_product_attention(*ts, attn_mask=m, **kw)
    grad = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)
    grads = torch.autograd.grad(out, ts, grad.to(device))
    return log.ops, out.detach().cpu(), [x.cpu() for x in grads]


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert (a.float() - b.float()).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_fused_attention_equals_local_cpu(dev: torch.device, case: str) -> None:
    dtype, mask_kind, causal, scale = CASES[case]
    make = MASKS[mask_kind]
    mask = make() if make is not None else None
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    tensors = inputs(dtype)
    ops, out, grads = run_sdpa(dev, tensors, mask, is_causal=causal, scale=scale)
    _, want, want_grads = run_sdpa("cpu", tensors, mask, is_causal=causal, scale=scale)
    assert FUSED in ops and "aten.bmm.default" not in ops  # one fused op, no math path
    assert_close(out, want)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close(g, w)


@pytest.mark.parametrize(
    "why, kw",
    [
        ("dropout", {"dropout_p": 0.3}),
        ("gqa", {"enable_gqa": True, "hk": 2}),
        ("unequal head sizes", {"ev": 6}),
        ("mask needs grad", {"mask_grad": True}),
    ],
)
def test_the_math_path_stays_where_the_fused_op_would_refuse(dev: torch.device, why: str, kw: dict[str, Any]) -> None:
    tensors = inputs(ev=kw.pop("ev", 8), hk=kw.pop("hk", 4))
    mask = torch.zeros(16, 12).requires_grad_() if kw.pop("mask_grad", False) else None
    ts = [t.to(dev).requires_grad_() for t in tensors]
    with OpLog() as log:
        out = F.scaled_dot_product_attention(*ts, attn_mask=None if mask is None else mask.to(dev), **kw)
    assert FUSED not in log.ops and "aten.bmm.default" in log.ops, why
    if "dropout_p" not in kw:  # dropout draws the daemon's random numbers
        want = F.scaled_dot_product_attention(*tensors, attn_mask=mask, **kw)
        assert_close(out.detach().cpu(), want.detach())


def autograd_nodes(t: torch.Tensor) -> int:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return len(seen)


def test_the_encoders_graph_is_local_cpus(dev: torch.device) -> None:
    """launch_bound.py's encoder (eval mode: no dropout) builds as many autograd nodes a forward as on local CPU (round
    20: 153 against 121, torch's math path) and the same loss; in train mode (dropout 0.1) the math path stays, as on
    local CPU."""
    sys.path.insert(0, str(ROOT / "bench"))
    from launch_bound import workload

    model, data, loss_fn = workload("encoder")
    model.eval()
    x, y = data[0]
    local = loss_fn(model(x), y)
    remote_model = model.to(dev)
    with OpLog() as log:
        remote = loss_fn(remote_model(x.to(dev)), y.to(dev))
    assert log.ops.count(FUSED) == 2  # one a layer
    assert autograd_nodes(remote) == autograd_nodes(local)
    assert abs(remote.item() - local.item()) <= 1e-5
    remote.backward()
    remote_model.train()
    with OpLog() as log:
        remote_model(x.to(dev))
    assert FUSED not in log.ops


# ---- hostile arguments, straight to a real daemon ----


@pytest.fixture
def session(serve: Any) -> Iterator[Session]:
    with Session.attach(serve.address, serve.token(tenant="attention")) as s:
        yield s


def _fused(s: Session, q: Any, k: Any, v: Any, *rest: Any, **kw: Any) -> list[int]:
    return s.call("aten::_scaled_dot_product_fused_attention_overrideable.default", q, k, v, *rest, outputs=9, **kw)


@pytest.mark.parametrize(
    "what, match",
    [
        ("3-D query", "must be 4-D"),
        ("int dtype", "floating dtype"),
        ("mixed dtypes", "floating dtype"),
        ("other batch", "batch size and heads"),
        ("other head size", "same head size"),
        ("mask shape", "does not broadcast"),
        ("mask dtype", "attn_bias must be bool"),
        ("dropout", "dropout_p must be 0"),
        ("dropout range", r"dropout_p must be a number in \[0, 1\]"),
        ("nan scale", "scale must be a finite number"),
        ("debug mask", "return_debug_mask"),
    ],
)
def test_hostile_forward_arguments_are_invalid(session: Session, what: str, match: str) -> None:
    s = session
    q = Handle(s.upload(torch.randn(2, 4, 16, 8)))
    k = Handle(s.upload(torch.randn(2, 4, 12, 8)))
    v = Handle(s.upload(torch.randn(2, 4, 12, 8)))
    args: list[Any] = [q, k, v]
    kw: dict[str, Any] = {}
    if what == "3-D query":
        args[0] = Handle(s.upload(torch.randn(4, 16, 8)))
    elif what == "int dtype":
        args = [Handle(s.upload(torch.ones(2, 4, 16, 8, dtype=torch.int64)))] * 3
    elif what == "mixed dtypes":
        args[1] = Handle(s.upload(torch.randn(2, 4, 12, 8, dtype=torch.float64)))
    elif what == "other batch":
        args[1] = Handle(s.upload(torch.randn(3, 4, 12, 8)))
    elif what == "other head size":
        args[1] = Handle(s.upload(torch.randn(2, 4, 12, 4)))
    elif what == "mask shape":
        args.append(Handle(s.upload(torch.randn(16, 13))))
    elif what == "mask dtype":
        args.append(Handle(s.upload(torch.ones(16, 12, dtype=torch.int32))))
    elif what == "dropout":
        args += [None, 0.5]
    elif what == "dropout range":
        args += [None, 2.0]
    elif what == "nan scale":
        kw["scale"] = float("nan")
    elif what == "debug mask":
        args += [None, 0.0, False, True]
    outs = _fused(s, *args, **kw)
    with pytest.raises(errors.InvalidArgument, match=match):
        s.sync()
    with pytest.raises(errors.InvalidArgument):
        s.download(outs[0])  # poisoned, never a value
    [ok] = s.call("aten::add.Tensor", Handle(s.upload(torch.ones(3))), 1)
    assert torch.equal(s.download(ok), torch.full((3,), 2.0))


def test_hostile_backward_arguments_are_invalid_and_a_good_call_works(session: Session) -> None:
    s = session
    tensors = inputs()
    q, k, v = (Handle(s.upload(t)) for t in tensors)
    out, lse, _, _, _, _, seed, offset, _ = (Handle(h) for h in _fused(s, q, k, v))
    want, want_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*tensors)
    assert torch.equal(s.download(out), want)
    assert torch.equal(s.download(lse), want_lse.contiguous())
    grad = Handle(s.upload(torch.ones(2, 4, 16, 8)))
    name = "aten::_scaled_dot_product_fused_attention_overrideable_backward.default"
    good = [grad, q, k, v, None, [True, True, True, False], out, lse, None, None, 16, 12, 0.0, False, seed, offset]
    bad_lse = Handle(s.upload(torch.zeros(2, 4, 15)))
    for i, value, match in [
        (7, bad_lse, "logsumexp must be float32"),
        (0, Handle(s.upload(torch.ones(2, 4, 16, 7))), "grad_out must be"),
        (5, [True, True], "grad_input_mask must be 4 bools"),
        (12, 0.5, "dropout_p must be 0"),
    ]:
        args = list(good)
        args[i] = value
        s.call(name, *args, outputs=4)
        with pytest.raises(errors.InvalidArgument, match=match):
            s.sync()
    gq, gk, gv, gb = s.call(name, *good, outputs=4)
    want_g = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        torch.ones(2, 4, 16, 8), *tensors, want, want_lse, 0.0, False
    )
    for h, w in zip((gq, gk, gv), want_g, strict=True):
        assert torch.equal(s.download(h), w)


# ---- the C++ client ----

_NATIVE = r"""
import json, sys
import torch, torch.nn.functional as F
from gpupool.client.native import backend as nc
from gpupool.client.session import Session
from gpupool.client.engine import run_backward_on_calling_thread
torch.set_num_threads(1)
nc.load(); nc.claim(); run_backward_on_calling_thread()
nc.connect(Session.attach(sys.argv[1], sys.argv[2], timeout=120.0), None)
dev = nc.device()
torch.ops.gpupool_native.set_fused_sdp(sys.argv[3] == "1")
g = torch.Generator().manual_seed(7)
result = {}
for name, dtype, mask, causal, scale in [
    ("plain", torch.float32, None, False, None), ("causal-scale", torch.float32, None, True, 0.3),
    ("float-mask", torch.float32, torch.randn(16, 12, generator=g), False, None),
    ("bool-mask", torch.float32, torch.rand(2, 1, 16, 12, generator=g) > 0.3, False, 0.5),
    ("bf16", torch.bfloat16, None, True, None)]:
    ts = [torch.randn(2, 4, n, 8, generator=g, dtype=dtype) for n in (16, 12, 12)]
    m = None if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    m = mask if mask is not None and mask.dtype == torch.bool else m
    diffs = []
    outs = {}
    for where in ("cpu", dev):
        xs = [t.to(where).requires_grad_() for t in ts]
        out = F.scaled_dot_product_attention(*xs, attn_mask=None if m is None else m.to(where), is_causal=causal,
                                             scale=scale)
        grad = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype)
        gs = torch.autograd.grad(out, xs, grad.to(where))
        outs[str(where)] = [out.detach().cpu()] + [x.cpu() for x in gs]
        if where != "cpu":
            result[name + ":node"] = type(out.grad_fn).__name__
    a, b = outs.values()
    result[name] = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
print(json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False])
def test_the_cpp_client_equals_local_cpu(serve: Any, fused: bool) -> None:
    from gpupool.client.native.backend import compiler_missing

    why = compiler_missing()
    if why is not None:
        pytest.skip(f"C++ client: {why}")
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _NATIVE, serve.address, serve.token(), "1" if fused else "0"],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    node = "ScaledDotProductFusedAttentionOverrideableBackward0" if fused else "UnsafeViewBackward0"
    for name in ("plain", "causal-scale", "float-mask", "bool-mask"):
        assert result[name] <= 1e-5, (name, result)
        assert result[name + ":node"] == node, (name, result)
    # bf16: the fused op runs local's kernel (the same bits); the math path rounds elsewhere (round 20: 1 bf16 ulp off)
    assert result["bf16"] <= (1e-5 if fused else 2e-2), result


_NATIVE_ENV = r"""
import sys
import torch, torch.nn.functional as F
from gpupool.client.native import backend as nc
from gpupool.client.session import Session
from gpupool.client.engine import run_backward_on_calling_thread
torch.set_num_threads(1)
nc.load(); nc.claim(); run_backward_on_calling_thread()
nc.connect(Session.attach(sys.argv[1], sys.argv[2], timeout=120.0), None)
xs = [torch.randn(2, 4, 16, 8).to(nc.device()).requires_grad_() for _ in range(3)]
print(type(F.scaled_dot_product_attention(*xs).grad_fn).__name__)
"""


@pytest.mark.parametrize(
    ("value", "node"),
    [(" 0", "UnsafeViewBackward0"), ("1\n", "ScaledDotProductFusedAttentionOverrideableBackward0"), ("off", None)],
)
def test_the_cpp_client_takes_gpupool_fused_sdpa_as_the_shim_parses_it(
    serve: Any, value: str, node: str | None
) -> None:
    """The C++ client reads no environment: client/native/backend.py hands it $GPUPOOL_FUSED_SDPA at connect as
    gpupool/config.py `fused_sdpa` (the shim's parser) reads it. Before round 22 it compared the raw value with "0"
    itself: " 0" was the math path in the shim and the fused one here, and "off" was silently on."""
    from gpupool.client.native.backend import compiler_missing

    why = compiler_missing()
    if why is not None:
        pytest.skip(f"C++ client: {why}")
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONPATH": str(ROOT), "GPUPOOL_FUSED_SDPA": value}
    proc = subprocess.run(
        [sys.executable, "-c", _NATIVE_ENV, serve.address, serve.token()], env=env, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    if node is None:
        assert proc.returncode != 0
        want = f"ValueError: GPUPOOL_FUSED_SDPA={value} is not 0 (torch's math path) or 1 (the fused backend)"
        assert proc.stderr.strip().splitlines()[-1] == want, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proc.stdout.split()[-1] == node


def test_torchs_opinfo_samples_equal_local_cpu(dev: torch.device) -> None:
    """PyTorch's own SDPA samples (OpInfo, float32 and bfloat16, without dropout): 3-D and 4-D, masks, causal, GQA;
    some take the fused op, the rest the math path, all give local CPU's outputs and gradients."""
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.utils._pytree import tree_map

    (op,) = [o for o in op_db if o.name == "nn.functional.scaled_dot_product_attention"]
    samples = fused = 0
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        for s in op.sample_inputs("cpu", dtype, requires_grad=True):
            if s.kwargs.get("dropout_p", 0.0) > 0:
                continue

            def to(x: Any) -> Any:
                return x.detach().to(dev).requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x

            args, kwargs = tree_map(to, [s.input, *s.args]), tree_map(to, s.kwargs)
            with OpLog() as log:
                out = F.scaled_dot_product_attention(*args, **kwargs)
            want = F.scaled_dot_product_attention(s.input, *s.args, **s.kwargs)
            torch.testing.assert_close(out.cpu(), want, atol=tol, rtol=tol)
            ins = [x for x in [s.input, *s.args] if isinstance(x, torch.Tensor) and x.requires_grad]
            remote_ins = [x for x in args if isinstance(x, torch.Tensor) and x.requires_grad]
            grad = torch.ones_like(want)
            for got, w in zip(
                torch.autograd.grad(out, remote_ins, grad.to(dev), allow_unused=True),
                torch.autograd.grad(want, ins, grad, allow_unused=True),
                strict=True,
            ):
                if w is not None:
                    torch.testing.assert_close(got.cpu(), w, atol=tol, rtol=tol)
            samples += 1
            fused += FUSED in log.ops
    assert samples >= 20 and 0 < fused < samples


def test_expanded_inputs_are_read_as_their_values(session: Session) -> None:
    """A client's expanded (stride 0) query, key, value and logsumexp: the daemon's kernels get dense copies (no kernel
    walks a one-element storage by the view's sizes), and the results are local's for the same values."""
    s = session
    one = torch.randn(1, 1, 1, 8)
    whole = Handle(s.upload(one))
    name = "aten::_scaled_dot_product_fused_attention_overrideable.default"
    [q] = s.call("aten::expand.default", whole, [2, 4, 16, 8])
    out, lse = s.call(name, Handle(q), Handle(q), Handle(q), outputs=9)[:2]
    want, want_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*[one.expand(2, 4, 16, 8)] * 3)
    assert torch.equal(s.download(out), want)
    [lse1] = s.call("aten::expand.default", Handle(s.upload(torch.zeros(1, 1, 1))), [2, 4, 16])
    grads = s.call(
        "aten::_scaled_dot_product_fused_attention_overrideable_backward.default",
        Handle(q), Handle(q), Handle(q), Handle(q), None, [True, True, True, False], Handle(out), Handle(lse1),
        None, None, 16, 16, 0.0, False, None, None, outputs=4,
    )  # fmt: skip
    e = one.expand(2, 4, 16, 8)
    want_g = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        e, e, e, e, want, torch.zeros(2, 4, 16), 0.0, False
    )
    for h, w in zip(grads[:3], want_g, strict=True):
        assert_close(s.download(h), w)  # the kernel on dense copies: local's on the expanded views, to the last bits
    assert s.download(lse).shape == want_lse.shape
