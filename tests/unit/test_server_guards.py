"""The fused optimizers' guard (server/guards.py `_fused_optimizer`) in-process: what torch's own optimizers send
passes (every fused optimizer, channels_last weights, amsgrad, SGD without momentum, a tensor lr), and lists that
torch's CPU kernels would walk out of bounds are refused before the kernel runs. (Through a daemon:
tests/integration/test_daemon_abuse.py.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.server import guards
from gpupool.server.cost import FAKE_GPU_FLOPS
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gpupool import metas
from gpupool.errors import InvalidArgument


class _Guarded(TorchDispatchMode):
    """Runs the daemon's guard on every fused optimizer call torch makes, before the kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if "_fused_" in func.name():
            guards.validate(func, list(args), dict(kwargs), FAKE_GPU_FLOPS)
            self.seen.append(str(func))
        return func(*args, **kwargs)


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.1, fused=True, amsgrad=True),
    "adamw-tensor-lr": lambda p: torch.optim.AdamW(p, lr=torch.tensor(0.1), fused=True),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, fused=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, fused=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_what_torch_optimizers_send_passes(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model[0].to(memory_format=torch.channels_last)
    opt = OPTIMIZERS[name](model.parameters())
    mode = _Guarded()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)).sum().backward()
        with mode:
            opt.step()
    assert len(mode.seen) == 2, mode.seen


def _adam_args(p: Any = None, g: Any = None, steps: Any = None, **kw: Any) -> tuple[list[Any], dict[str, Any]]:
    n = 1000
    p = torch.zeros(n) if p is None else p
    g = torch.ones(n) if g is None else g
    args = [[p], [g], [torch.zeros(n)], [torch.zeros(n)], [], steps or [torch.tensor(1.0)]]
    kwargs = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False, **kw)
    return args, kwargs


@pytest.mark.parametrize(
    "case, match",
    [
        (_adam_args(p=torch.zeros(1).expand(1000)), "must be dense"),  # the kernel wrote 999 floats past it
        (_adam_args(g=torch.ones(1)), "must match its parameter"),  # read 999 floats past the grad
        (_adam_args(g=torch.ones(2000)[::2]), "must match its parameter"),  # strides the kernel does not follow
        (_adam_args(g=torch.ones(1000, dtype=torch.float64)), "must match its parameter"),
        (_adam_args(steps=[torch.tensor(1.0), torch.tensor(1.0)]), "2 tensors for 1 parameters"),
        (_adam_args(steps=[torch.zeros(0)]), "one number"),
        (_adam_args(found_inf=torch.zeros(0)), "found_inf must be one number"),  # read from an empty tensor
        (_adam_args(p=torch.zeros(1000, dtype=torch.int64), g=torch.ones(1000, dtype=torch.int64)), "floating"),
    ],
)
def test_lists_the_kernel_would_walk_out_of_bounds_are_refused(case: Any, match: str) -> None:
    args, kwargs = case
    with pytest.raises(InvalidArgument, match=match):
        guards.validate(torch.ops.aten._fused_adam_.default, args, kwargs, FAKE_GPU_FLOPS)


@pytest.mark.parametrize(
    "op",
    [
        torch.ops.aten._fused_adam.default,
        torch.ops.aten._fused_adam.out,
        torch.ops.aten._fused_adamw.default,
        torch.ops.aten._fused_adamw.tensor_lr_out,
    ],
    ids=str,
)
def test_the_functional_and_out_forms_are_guarded_as_the_in_place_one(op: Any) -> None:
    """`_fused_adam` (no underscore) runs the in-place kernel on clones of the lists it writes: a one-element grad
    was read 999 floats past its storage (the worker's heap came back in exp_avg)."""
    args, kwargs = _adam_args(g=torch.ones(1))
    if "tensor_lr" in str(op):
        kwargs["lr"] = torch.tensor(0.1)
    if str(op).endswith("out"):
        kwargs["out"] = [torch.zeros(1000)]
    with pytest.raises(InvalidArgument, match="must match its parameter"):
        guards.validate(op, args, kwargs, FAKE_GPU_FLOPS)
    args, _ = _adam_args()
    guards.validate(op, args, kwargs, FAKE_GPU_FLOPS)  # honest lists pass
    if str(op).endswith("out"):
        kwargs["out"] = [torch.zeros(1)]
        with pytest.raises(InvalidArgument, match="out\\[0\\]"):
            guards.validate(op, args, kwargs, FAKE_GPU_FLOPS)


def test_a_tensor_lr_must_be_one_number() -> None:
    args, kwargs = _adam_args()
    kwargs["lr"] = torch.zeros(3)
    with pytest.raises(InvalidArgument, match="lr must be one number"):
        guards.validate(torch.ops.aten._fused_adam_.tensor_lr, args, kwargs, FAKE_GPU_FLOPS)
    kwargs["lr"] = torch.tensor(0.1)
    guards.validate(torch.ops.aten._fused_adam_.tensor_lr, args, kwargs, FAKE_GPU_FLOPS)


def test_what_the_fused_optimizers_guard_lets_through_stays_in_its_tensors() -> None:
    """Round 19's hostile read of the guard: random calls of every fused optimizer overload (lists of other
    lengths, 0-dim, empty, expanded and transposed tensors, other dtypes, a parameter twice, the same tensor as
    parameter and grad or exp_avg, one-element or wrong-sized steps, lr, grad_scale, found_inf), all of them views
    of one sentinel buffer. Whatever the guard lets through and torch's kernel then runs writes nothing of the
    buffer outside the calls' own tensors (aliasing among them is the caller's own memory, updated in place)."""
    import random

    from gpupool import metas
    from gpupool.errors import GpupoolError

    metas.register()
    aten = torch.ops.aten
    rng = random.Random(19)
    overloads = [
        getattr(getattr(aten, f"_fused_{name}{form}"), overload)
        for name in guards.FUSED_OPTIMIZERS
        for form, overloads_ in (("_", ("default", "tensor_lr")), ("", ("default", "out", "tensor_lr_out")))
        for overload in overloads_
    ]
    buf = torch.full((4096,), 12345.0)
    others = {dt: torch.full((4096,), 7.0, dtype=dt) for dt in (torch.float64, torch.float16, torch.int64)}

    def carve(shape: list[int], dtype: torch.dtype = torch.float32, expanded: bool = False) -> torch.Tensor:
        base = buf if dtype == torch.float32 else others[dtype]
        stride = [0] * len(shape) if expanded else [int(torch.tensor(shape[k + 1 :]).prod()) for k in range(len(shape))]
        return torch.as_strided(base, shape, stride, rng.randrange(200))

    def anything() -> torch.Tensor:
        shape = rng.choice([[4], [2, 3], [1], [], [0], [3, 1]])
        dtype = rng.choice([torch.float32] * 6 + [torch.float64, torch.float16, torch.int64])
        if rng.random() < 0.15 and len(shape) == 2:
            return carve(shape[::-1], dtype).t()
        return carve(shape, dtype, expanded=rng.random() < 0.1)

    ran = refused = 0
    for _ in range(2500):
        op = rng.choice(overloads)
        k, shape = rng.randint(1, 3), rng.choice([[4], [2, 3], [1], [], [0]])
        wide = rng.random() < 0.05  # expanded parameters, and lists that match them
        params = [carve(shape, expanded=wide) for _ in range(k)]
        if rng.random() < 0.2:
            params[-1] = params[0]
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for spec in op._schema.arguments:
            kind = str(spec.type)
            v: Any = None
            if spec.name == "self":
                v = params
            elif kind == "List[Tensor]":
                m = k if rng.random() < 0.93 else rng.choice([k - 1, k + 1, 0])
                if spec.name == "state_steps":
                    v = [rng.choice([carve([]), carve([1]), anything()]) for _ in range(m)]
                else:  # mostly the parameter's shape (expanded when it is), else anything, or a parameter itself
                    how = rng.choices(["like", "expanded", "anything", "first", "last"], [12, 1, 1, 1, 1], k=m)
                    v = [
                        params[0] if h == "first" else params[-1] if h == "last" else anything()
                        if h == "anything" else carve(shape, expanded=wide or h == "expanded")
                        for h in how
                    ]  # fmt: skip
            elif "Tensor" in kind:
                v = rng.choice([carve([]), carve([1]), anything(), carve([], torch.float64)])
                if "Optional" in kind and rng.random() < 0.4:
                    v = None
            elif kind == "float":
                v = rng.choice([0.1, 0.0, -1.0, float("nan"), 1e30])
            elif kind == "bool":
                v = rng.random() < 0.5
            if spec.kwarg_only:
                kwargs[spec.name] = v
            else:
                args.append(v)
        try:
            guards.validate(op, args, kwargs, 10**9)
        except GpupoolError:
            refused += 1
            continue
        mine = torch.zeros(4096, dtype=torch.bool)
        for t in [*args, *kwargs.values()]:
            for x in t if isinstance(t, list) else [t]:
                if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr():
                    mine[torch.as_strided(torch.arange(4096), x.shape, x.stride(), x.storage_offset()).reshape(-1)] = (
                        True
                    )
        before = buf.clone()
        try:
            op(*args, **kwargs)
            ran += 1
        except RuntimeError:  # torch's own checks (dtypes, list lengths it checks itself)
            pass
        changed = (buf != before) & ~(buf.isnan() & before.isnan())
        assert not (changed & ~mine).any(), (op, [(t.shape, t.stride()) for t in params])
        buf.copy_(before)
    assert ran > 150 and refused > 1000, (ran, refused)


# ---- index ranges read on the host at once (round 31) ----

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_bounds_are_min_and_max_for_every_layout(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randint(0, 100, (6, 7), generator=g).to(dtype)
    for t in (base, base.t(), base[::2, 1:], base[3, 4], base.expand(2, 6, 7), base.reshape(-1)[:1]):
        assert guards.bounds(t) == (int(t.min()), int(t.max()))
    for t in (torch.tensor([1.9, -0.5]), torch.tensor([True, False])):  # a hostile client's other dtypes: as before
        assert guards.bounds(t) == (int(t.min()), int(t.max()))


class _Calls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_an_index_range_guard_runs_one_kernel() -> None:
    """The embedding backward's guard (what the launch-bound encoders and the CNN send once a step): one `aminmax`
    where `int(t.min())`, `int(t.max())` were two kernels (on a GPU its two values are read with one copy:
    `test_bounds_on_a_gpu_read_the_host_once`)."""
    weight_grad = torch.randn(2, 5, 3)
    indices = torch.randint(0, 10, (2, 5))
    op = torch.ops.aten.embedding_dense_backward.default
    calls = _Calls()
    with calls:
        guards.validate(op, [weight_grad, indices, 10, -1, False], {}, 1 << 40)
    assert calls.names.count("aminmax") == 1
    assert "min" not in calls.names and "max" not in calls.names
    bad = indices.clone()
    bad[1, 3] = 10
    with pytest.raises(InvalidArgument, match=r"indices must lie in \[0, 10\), got values in \[\d+, 10\]"):
        guards.validate(op, [weight_grad, bad, 10, -1, False], {}, 1 << 40)
    bad[0, 0] = -1
    with pytest.raises(InvalidArgument, match=r"got values in \[-1, 10\]"):
        guards.validate(op, [weight_grad, bad, 10, -1, False], {}, 1 << 40)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_bounds_on_a_gpu_read_the_host_once(dtype: torch.dtype) -> None:
    """`aminmax` written into the two elements of one CUDA tensor, read with one copy: no `_local_scalar_dense`, one
    `tolist` (never run: no GPU at hand)."""
    base = torch.randint(0, 100, (6, 7), dtype=dtype, device="cuda")
    for t in (base, base.t(), base[::2, 1:], base[3, 4]):
        calls = _Calls()
        with calls:
            got = guards.bounds(t)
        assert got == (int(t.min()), int(t.max()))
        assert calls.names.count("aminmax") == 1 and "_local_scalar_dense" not in calls.names


def _offsets(shape: list[int], strides: list[int]) -> list[int]:
    offsets = [0]
    for n, st in zip(shape, strides, strict=True):
        offsets = [o + k * st for o in offsets for k in range(n)]
    return offsets


def test_overlaps_itself_never_passes_a_layout_whose_elements_share_a_location() -> None:
    """`guards.overlaps_itself` against every element's offset, over random small layouts: a layout it passes has
    distinct offsets (so a kernel writing it as if contiguous stays in its storage); the ones torch's views make
    (dense, permuted, sliced, channels-last) pass; expanded and aliasing ones do not."""
    import random

    rng = random.Random(0)
    for _ in range(4000):
        dims = rng.randint(1, 4)
        shape = [rng.randint(0, 4) for _ in range(dims)]
        strides = [rng.choice([0, 1, 2, 3, 4, 6, 12, 20]) for _ in range(dims)]
        t = torch.zeros(200).as_strided(shape, strides)
        offsets = _offsets(shape, strides)
        if not guards.overlaps_itself(t):
            assert len(set(offsets)) == len(offsets), (shape, strides)
        if min(shape) and len(set(offsets)) < len(offsets):
            assert guards.overlaps_itself(t), (shape, strides)
    x = torch.zeros(2, 3, 4, 5)
    channels_last = x.to(memory_format=torch.channels_last)
    empty = torch.zeros(0, 4).expand(3, 0, 4)
    for dense in (x, x.permute(3, 1, 0, 2), x[:, ::2, 1:], channels_last, torch.zeros(1).expand(1, 1), empty):
        assert not guards.overlaps_itself(dense), dense.stride()
    for bad in (torch.zeros(1).expand(4), x[:, :1].expand(2, 3, 4, 5), torch.zeros(5).as_strided([3, 3], [1, 1])):
        assert guards.overlaps_itself(bad), bad.stride()


def test_check_written_reads_the_schemas_written_arguments() -> None:
    aten = torch.ops.aten
    e = torch.zeros(1).expand(4)
    with pytest.raises(InvalidArgument, match="aten::add: .*'out'.*single memory location"):
        guards.check_written(aten.add.out, [torch.ones(4), torch.ones(4)], {"out": e})
    with pytest.raises(InvalidArgument, match="'self\\[1\\]'"):
        guards.check_written(aten._foreach_add_.Scalar, [[torch.zeros(4), e], 1.0], {})
    with pytest.raises(InvalidArgument, match="'running_var'"):
        guards.check_written(aten._native_batch_norm_legit.default, [None, None, None, torch.zeros(4), e], {})
    guards.check_written(aten.add.out, [e, e], {"out": torch.zeros(4)})  # overlapping inputs are read only
    guards.check_written(aten.fill_.Scalar, [e, 1.0], {})  # torch writes it through the strides
    guards.check_written(aten.unsqueeze_.default, [e, 0], {})  # metadata only
    assert guards.written_params(aten.mm.default) == ()


def test_native_batch_norm_writes_its_running_statistics_unmarked() -> None:
    """`native_batch_norm`'s schema marks running_mean/running_var read only (`Tensor?`), yet in training it updates
    them: check_written covers them as it covers `_native_batch_norm_legit`'s (`Tensor(a!)`)."""
    aten = torch.ops.aten
    assert not aten.native_batch_norm.default._schema.is_mutable
    for op in (aten.native_batch_norm.default, aten.native_batch_norm.out):
        assert {"running_mean", "running_var"} <= {name for _, name in guards.written_params(op)}
    x, stats = torch.randn(4, 3), torch.zeros(3)
    for at, name in ((3, "running_mean"), (4, "running_var")):
        args: list[Any] = [x, None, None, stats, stats.clone(), True, 0.1, 1e-5]
        args[at] = torch.zeros(1).expand(3)
        with pytest.raises(InvalidArgument, match=f"aten::native_batch_norm: .*'{name}'.*single memory location"):
            guards.check_written(aten.native_batch_norm.default, args, {})
    guards.check_written(aten.native_batch_norm.default, [x, None, None, stats, stats.clone(), True, 0.1, 1e-5], {})
    guards.check_written(aten.native_batch_norm.default, [x, None, None, None, None, True, 0.1, 1e-5], {})


def test_check_reads_refuses_an_overlapping_argument_a_kernel_reads_as_contiguous() -> None:
    """The arguments of `guards.READ_DENSE` (tests/integration/oob_sweep.py found their CPU kernels reading past the
    storage) must not overlap themselves; the others of the same op may (autograd sends layer norm an expanded
    grad_out for `x.sum().backward()`), and dense views (transposed, sliced) pass."""
    aten = torch.ops.aten
    x = torch.randn(4, 6)
    w, b = torch.ones(6), torch.zeros(6)
    _, mean, rstd = aten.native_layer_norm.default(x, [6], w, b, 1e-5)
    expanded = torch.zeros(1).expand(4, 1)
    args: list[Any] = [torch.ones(1).expand(4, 6), x, [6], expanded, rstd, w, b, [True, True, True]]
    with pytest.raises(InvalidArgument, match="aten::native_layer_norm_backward: .*'mean' as contiguous memory"):
        guards.check_reads(aten.native_layer_norm_backward.default, args, {})
    args[3], args[4] = mean, torch.zeros(8).as_strided([4, 1], [0, 1], 7)
    with pytest.raises(InvalidArgument, match="'rstd'"):
        guards.check_reads(aten.native_layer_norm_backward.out, args, {})
    args[4] = rstd
    guards.check_reads(aten.native_layer_norm_backward.default, args, {})  # the expanded grad_out is read by strides
    with pytest.raises(InvalidArgument, match="aten::median: .*'self'"):
        guards.check_reads(aten.median.dim, [torch.zeros(1).expand(3, 4), 1], {})
    with pytest.raises(InvalidArgument, match="aten::nanmedian: .*'self'"):
        guards.check_reads(aten.nanmedian.dim_values, [], {"self": torch.zeros(3, 1).expand(3, 4), "dim": 1})
    guards.check_reads(aten.median.dim, [x.t(), 1], {})
    guards.check_reads(aten.median.dim, [x[:, ::2], 1], {})
    assert guards.read_params(aten.mm.default) == ()
    for name, params in guards.READ_DENSE.items():  # every name is an argument of the op (no typo guards nothing)
        packet = getattr(aten, name.removeprefix("aten::"))
        for overload in packet.overloads():
            assert {n for _, n in guards.read_params(getattr(packet, overload))} == set(params), (name, overload)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [2, 3])
def test_convolutions_lay_their_outputs_out_as_the_meta_kernels_do(dims: int, dtype: torch.dtype) -> None:
    """The clients compute an op's outputs on torch's meta kernels and send views of them as that geometry, so the
    daemon's `convolution` and `convolution_backward` return the meta kernels' layouts (the forward's contiguous where
    the CPU kernel gives channels_last for a channels_last input or weight), with the CPU kernel's values. Until round
    38 the forward returned the kernel's channels_last: a client's `torch.flatten` of it read scrambled values."""
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    aten = torch.ops.aten
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, *(5,) * dims)
    for x_fmt, w_fmt in ((fmt, torch.contiguous_format), (torch.contiguous_format, fmt), (fmt, fmt)):
        x = torch.randn(shape, generator=gen, dtype=dtype).to(memory_format=x_fmt)
        w = torch.randn((4, 3, *(3,) * dims), generator=gen, dtype=dtype).to(memory_format=w_fmt)
        args = (x, w, None, [1] * dims, [1] * dims, [1] * dims, False, [0] * dims, 1)
        plain = aten.convolution.default(*args)
        assert plain.is_contiguous() == (dims == 3 and dtype is torch.float64)  # else the CPU kernel's channels_last
        out = guards.replacement(aten.convolution.default)(*args)  # type: ignore[misc]
        meta = aten.convolution.default(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
        assert out.stride() == meta.stride() and torch.equal(out, plain)
        grad = torch.randn(plain.shape, generator=gen, dtype=dtype)
        bargs = (grad, x, w, [4], *args[3:], [True, True, False])
        grads = guards.replacement(aten.convolution_backward.default)(*bargs)  # type: ignore[misc]
        mets = aten.convolution_backward.default(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in bargs])
        want = aten.convolution_backward.default(*bargs)
        for got, m, ref in zip(grads[:2], mets[:2], want[:2], strict=True):
            assert got.stride() == m.stride() and torch.equal(got, ref)
        assert not guards.keeps_kernel_layout("aten::convolution", args, {})
        assert not guards.keeps_kernel_layout("aten::convolution_backward", bargs, {})
    plain_args = (x.contiguous(), w.contiguous(), None, [1] * dims, [1] * dims, [1] * dims, False, [0] * dims, 1)
    assert guards.keeps_kernel_layout("aten::convolution", plain_args, {})  # a captured graph calls the kernel
    assert guards.replacement(aten.convolution.out) is None  # the out= form writes the client's own `out`


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [2, 3])
def test_a_conv_layout_session_lays_conv_outputs_out_as_cudnn_and_as_its_meta_kernel(
    dims: int, dtype: torch.dtype
) -> None:
    """Under the "conv_layout" feature (round 43; a session worker's thread: `metas.conv_layout_for`) the daemon's
    `convolution` returns cuDNN's layout (channels_last or channels_last_3d where the input or weight is; contiguous
    for float64 and for a contiguous input and weight) and the Meta kernel the clients and graph definitions run gives
    the same strides, with the CPU kernel's values; in a session without it both stay contiguous."""
    metas.register()  # the Meta kernel of `convolution` (the clients and graph_build.py register it at import)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    aten = torch.ops.aten
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, *(5,) * dims)
    for x_fmt, w_fmt in ((fmt, torch.contiguous_format), (torch.contiguous_format, fmt), (fmt, fmt), (None, None)):
        x = torch.randn(shape, generator=gen, dtype=dtype)
        w = torch.randn((4, 3, *(3,) * dims), generator=gen, dtype=dtype)
        x, w = (x, w) if x_fmt is None else (x.to(memory_format=x_fmt), w.to(memory_format=w_fmt))
        args = (x, w, None, [1] * dims, [1] * dims, [1] * dims, False, [0] * dims, 1)
        margs = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        plain = aten.convolution.default(*args)
        with metas.conv_layout_for(True):
            out = guards.replacement(aten.convolution.default)(*args)  # type: ignore[misc]
            meta = aten.convolution.default(*margs)
        want = fmt if x_fmt is not None and dtype is torch.float32 else torch.contiguous_format
        assert out.is_contiguous(memory_format=want) and out.stride() == meta.stride() and torch.equal(out, plain)
        with metas.conv_layout_for(False):  # a session without it: contiguous, as before round 43
            assert aten.convolution.default(*margs).is_contiguous()
            assert guards.replacement(aten.convolution.default)(*args).is_contiguous()  # type: ignore[misc]


def test_the_fused_optimizers_guard_checks_each_distinct_entry_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 44 (hostile44): a graph naming one slot in every list of `_fused_adam_` 16,384 times had the guard compare
    every entry's strides with its parameter's (~30 us a reference: ~1.5 s of the definition's ~3 s; b647913 calls
    `_strides` twice an entry, 8 times 1,000 here). Now each distinct parameter and each distinct (parameter, tensor)
    pair once; a mismatch among repeated entries is still refused."""
    calls = [0]
    real = guards._strides

    def counted(t: torch.Tensor) -> list[int]:
        calls[0] += 1
        return real(t)

    monkeypatch.setattr(guards, "_strides", counted)
    schema = torch.ops.aten._fused_adam_.default._schema
    p, step = torch.ones(3), torch.zeros(())
    n = 1000
    kwargs = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    guards._fused_optimizer([[p] * n, [p] * n, [p] * n, [p] * n, [], [step] * n], kwargs, schema)
    assert calls[0] <= 8, calls[0]
    bad = [p] * (n - 1) + [torch.ones(4)]
    with pytest.raises(InvalidArgument, match=r"grads\[999\]"):
        guards._fused_optimizer([[p] * n, bad, [p] * n, [p] * n, [], [step] * n], kwargs, schema)
