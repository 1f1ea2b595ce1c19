"""The shim's local parts, no daemon needed: op schemas, the meta-inference cache and its keys."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from gpupool.client.torch import meta, tensor
from gpupool.client.torch.runtime import DeviceRuntime
from gpupool.client.torch.tensor import RemoteTensor, wrap

import gpupool.torch  # noqa: F401  (registers the device)

aten = torch.ops.aten


class _NoSession:
    """Wrappers made for key and inference tests never reach a session."""

    quota_bytes = 0

    def new_handle(self) -> int:
        raise AssertionError("no handle expected")


RT = DeviceRuntime(99, _NoSession())


def remote(*shape: int, dtype: torch.dtype = torch.float32) -> RemoteTensor:
    t = torch.empty(shape, dtype=dtype)
    return wrap(RT, 0, t.shape, t.stride(), 0, dtype)  # handle 0: owns nothing, frees nothing


def key(func: object, *args: object, **kwargs: object) -> object:
    return meta.cache_key(meta.schema_of(func), args, kwargs)  # type: ignore[arg-type]


def test_schema_facts() -> None:
    add_ = meta.schema_of(aten.add_.Tensor)
    assert add_.name == "aten::add_.Tensor" and add_.write_alias == ["self"] and add_.mutates
    assert meta.schema_of(aten.relu.default).name == "aten::relu"
    assert meta.schema_of(aten.nonzero.default).dynamic
    assert not meta.schema_of(aten.arange.start_out).has_tensor_inputs  # out= is not an input
    assert meta.schema_of(aten.add.Tensor).has_tensor_inputs
    assert meta.schema_of(aten.t_.default).inplace_view
    assert meta.schema_of(aten.max.dim).tensor_returns == 2
    assert meta.schema_of(aten.split.Tensor).list_return


def test_ops_with_a_kernel_of_their_own_run_whole_not_decomposed() -> None:
    """An op with both a CompositeImplicitAutograd kernel and a CPU kernel that the daemon allows is sent whole (what
    torch runs on CPU and CUDA, and what the C++ client sends); the shim decomposed `silu_backward` into five rounded
    ops until round 39, so bfloat16 SiLU gradients differed from the kernel's. Every such op is named in
    meta.KERNEL_OVER_COMPOSITE (a new one in torch fails here)."""
    from pathlib import Path

    allowed = (Path(__file__).resolve().parents[2] / "server" / "allowed_ops.txt").read_text().split()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    both = {
        name
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("aten::") and has(name, "CompositeImplicitAutograd") and has(name, "CPU")
    }
    assert {n for n in both if any(a.startswith(n + ".") for a in allowed)} == meta.KERNEL_OVER_COMPOSITE
    silu = meta.schema_of(aten.silu_backward.default)
    assert not silu.implicit and silu.plain
    assert meta.schema_of(aten.native_channel_shuffle.default).implicit  # not on the allowlist: still decomposed
    g = torch.Generator().manual_seed(0)
    grad, a = torch.randn(2, 64, generator=g).bfloat16()
    composed = aten.silu_backward.default.decompose(grad, a)  # what the shim ran: the kernels differ in bfloat16
    assert not torch.equal(aten.silu_backward(grad, a), composed)


def test_scalars_keyed_by_type_on_ops_with_tensor_inputs() -> None:
    x = remote(3, 4)
    # An Adam step's changing step sizes are Scalars: the same key, a dict hit.
    assert key(aten.add.Tensor, x, x, alpha=0.1) == key(aten.add.Tensor, x, x, alpha=0.2)
    assert key(aten.mul.Scalar, x, 2.0) == key(aten.mul.Scalar, x, 3.5)
    div_ = aten._foreach_div_.ScalarList
    assert key(div_, [x, x], [1.0, 2.0]) == key(div_, [x, x], [3.0, 4.0])
    # ... but their type decides promotion: int and float differ.
    assert key(aten.mul.Scalar, x, 2) != key(aten.mul.Scalar, x, 2.0)
    # Python numbers passed for a Tensor argument too.
    assert key(aten.add.Tensor, x, 1.0) == key(aten.add.Tensor, x, 2.0)


def test_factories_and_floats_keyed_by_value() -> None:
    assert key(aten.arange.start_step, 0, 5, 1) != key(aten.arange.start_step, 0, 6, 1)
    out = remote(0)
    assert key(aten.arange.start_out, 2, 3, 1, out=out) != key(aten.arange.start_out, 2, 4, 1, out=out)
    x = remote(1, 1, 4, 4)
    up = aten.upsample_nearest2d.default
    assert key(up, x, None, [2.0, 2.0]) != key(up, x, None, [3.0, 3.0])  # scale factors decide shapes
    assert key(aten.sum.dim_IntList, x, [1]) != key(aten.sum.dim_IntList, x, [2])
    assert key(aten.leaky_relu.default, x, 0.1) == key(aten.leaky_relu.default, x, 0.2)  # Scalar slope


def test_tensor_keys_include_layout() -> None:
    x = remote(4, 6)
    xt = wrap(RT, 0, (6, 4), (1, 6), 0, torch.float32)
    assert key(aten.relu.default, x) != key(aten.relu.default, xt)
    assert key(aten.relu.default, x) != key(aten.relu.default, remote(4, 6, dtype=torch.float64))
    assert key(aten.relu.default, x) != key(aten.relu.default, wrap(RT, 0, (4, 6), (6, 1), 2, torch.float32))


def test_inference_matches_cpu_and_is_cached() -> None:
    cache = meta.MetaCache()
    a, b = remote(8, 5), remote(5, 3)
    sch = meta.schema_of(aten.mm.default)
    out = cache.outputs(sch, (a, b), {})
    cpu = torch.mm(torch.empty(8, 5), torch.empty(5, 3))
    assert out.spec is None and out.metas[0] == meta.OutMeta((8, 3), tuple(cpu.stride()), 0, torch.float32)
    assert (cache.hits, cache.misses) == (0, 1)
    cache.outputs(sch, (remote(8, 5), remote(5, 3)), {})
    assert (cache.hits, cache.misses) == (1, 1)


def test_views_multi_outputs_and_promotion() -> None:
    x = remote(4, 6)
    t = meta.infer(meta.schema_of(aten.t.default), (x,), {})
    assert t.metas[0] == meta.OutMeta((6, 4), (1, 6), 0, torch.float32)
    sl = meta.infer(meta.schema_of(aten.slice.Tensor), (x, 1, 2, 5), {})
    assert sl.metas[0] == meta.OutMeta((4, 3), (6, 1), 2, torch.float32)
    mx = meta.infer(meta.schema_of(aten.max.dim), (x, 1), {})
    assert [m.dtype for m in mx.metas if m] == [torch.float32, torch.int64]
    parts = meta.infer(meta.schema_of(aten.split.Tensor), (x, 4, 1), {})
    assert [m.shape for m in parts.metas if m] == [(4, 4), (4, 2)]
    # A 0-dim CPU tensor mixes with any device and promotes like one.
    r = meta.infer(meta.schema_of(aten.add.Tensor), (remote(3, dtype=torch.int32), torch.tensor(1.5)), {})
    assert r.metas[0] is not None and r.metas[0].dtype == torch.float32


def test_data_dependent_ops_have_no_meta() -> None:
    import pytest

    x = remote(5)
    with pytest.raises(meta.NoMeta):
        meta.infer(meta.schema_of(aten.nonzero.default), (x,), {})
    mask = remote(5, dtype=torch.bool)
    with pytest.raises(meta.NoMeta):
        meta.infer(meta.schema_of(aten.index.Tensor), (x, [mask]), {})
    # Integer indexing has a shape known in advance: no round trip.
    idx = remote(2, dtype=torch.int64)
    assert meta.infer(meta.schema_of(aten.index.Tensor), (x, [idx]), {}).metas[0].shape == (2,)  # type: ignore[union-attr]


def test_unsupported_dtypes_and_layouts_are_refused() -> None:
    import pytest

    with pytest.raises(TypeError, match="uint64"):
        meta.infer(meta.schema_of(aten._to_copy.default), (remote(3),), {"dtype": torch.uint64})


# ---- compact records (gpupool/compact.py): the same key as an Op's, and arguments that decode back ----


def _compact_cases() -> list[tuple[object, tuple[object, ...], dict[str, object]]]:
    def handled(h: int, *shape: int, dtype: torch.dtype = torch.float32) -> RemoteTensor:
        t = torch.empty(shape, dtype=dtype)
        return wrap(RT, h, t.shape, t.stride(), 0, dtype)  # a real handle (0 in a list means None)

    a, b, i = handled(11, 4, 8), handled(12, 8, 3), handled(13, 4, dtype=torch.int64)
    return [
        (aten.mm.default, (a, b), {}),
        (aten.add.Tensor, (a, 2.5), {"alpha": 3}),
        (aten.add.Tensor, (a, a), {}),
        (aten.sum.dim_IntList, (a, [1], True), {"dtype": torch.float64}),
        (aten._foreach_add_.List, ([a, a], [a, a]), {"alpha": 0.1}),
        (aten.cat.default, ([a, a], 0), {}),
        (aten.ones.default, ([2, 3],), {"device": torch.device("gpupool", 99), "dtype": torch.float16}),
        (aten.arange.start_step, (0, 10, 2), {"layout": torch.strided}),
        (aten.clamp.default, (a, None, 1.0), {}),
        (aten.index_select.default, (a, 0, i), {}),
    ]


def test_compact_records_share_op_keys_and_decode_back() -> None:
    from gpupool.client.torch import encode

    from gpupool import compact

    for func, args, kwargs in _compact_cases():
        sch = meta.schema_of(func)  # type: ignore[arg-type]
        _, op_key, _, _ = encode.build(RT, sch, args, kwargs)
        rt, compact_key, tail = encode.build_compact(RT, sch, args, kwargs)
        assert rt is RT and compact_key == op_key, sch.name  # one meta-cache entry whichever way the op travels
        rec = compact.decode(compact.head(1, sch.name, [5]) + tail, lambda h: ("handle", h), torch.device("meta"))

        def plain(v: object) -> object:
            if isinstance(v, RemoteTensor):
                return ("handle", v._gp_h)
            if isinstance(v, torch.device):
                return torch.device("meta")
            if isinstance(v, list | tuple):
                return [plain(x) for x in v]
            return v

        assert rec.name == sch.name and rec.outputs == [5]
        assert rec.args == [plain(v) for v in args], sch.name
        assert rec.kwargs == {k: plain(v) for k, v in kwargs.items()}, sch.name


def test_values_only_an_op_carries_fall_back() -> None:
    from gpupool.client.torch import encode

    from gpupool import compact

    a = remote(3)
    for func, args, kwargs in [
        (aten.div.Tensor_mode, (a, a), {"rounding_mode": "floor"}),  # a string
        (aten.add.Tensor, (a, torch.tensor(2.0)), {}),  # a 0-dim CPU tensor travels inline in an Op
        (aten.mul.Tensor, (a, 1j), {}),  # complex
    ]:
        try:
            encode.build_compact(RT, meta.schema_of(func), args, kwargs)  # type: ignore[arg-type]
        except compact.Unencodable:
            continue
        raise AssertionError(f"{func} should need an Op")


def test_int_arguments_keyed_and_encoded_once_alike_with_values_that_compare_equal() -> None:
    """`encode._c_one` keeps the key part and bytes of ints and int lists: a value equal to a kept one but of
    another type (True, 1.0, -0.0, a bool inside a list) still gets its own key and bytes, in any order."""
    from gpupool.client.torch import encode

    from gpupool import compact

    values: list[object] = [
        [1, 2], [True, 2], [1.0, 2], [1, 2], 1, True, 1.0, 1, [0], [0.0], [-0.0], [False], [0], [], [[1], [2]],
        [2**62, -(2**62)], 7, [7], (7,),
    ]  # fmt: skip
    for rounds in range(2):  # the second round answers from the kept ones
        for v in values if rounds == 0 else values[::-1]:
            got = _outcome(lambda v=v: encode._c_one(None, meta.V, v, True))
            want = _outcome(lambda v=v: (meta.arg_key(meta.V, v, True), compact.encode_value(v), None))
            assert got == want, v
    assert encode._INTS, "ints and int lists are kept"


def _outcome(fn: Any) -> str:
    """What `fn` returns as its repr (True is not 1, -0.0 is not 0.0, where == says they are), or what it raises."""
    try:
        return repr(fn())
    except Exception as exc:
        return type(exc).__name__


def test_wrappers_get_exactly_their_metadata() -> None:
    """`wrap` and the meta cache's outputs leave contiguous strides and offset 0 to torch's defaults (cheaper to parse):
    every wrapper must still have exactly the shape, strides and offset asked for, contiguous or not."""
    cases = [
        ((3, 4), (4, 1), 0),
        ((3, 4), (1, 3), 0),
        ((2, 1, 5), (5, 5, 1), 0),
        ((2, 1, 5), (5, 1, 1), 0),  # contiguous to torch, but not the strides torch would pick
        ((2, 0, 3), (3, 3, 1), 0),
        ((2, 0, 3), (0, 3, 1), 0),  # an empty tensor's strides need not be the default ones either
        ((4,), (1,), 2),
        ((4,), (2,), 0),
        ((), (), 0),
        ((), (), 5),
    ]
    for shape, stride, offset in cases:
        for t in (wrap(RT, 0, shape, stride, offset, torch.float32),
                  wrap(RT, 0, list(shape), list(stride), offset, torch.float32)):  # fmt: skip
            assert (tuple(t.shape), t.stride(), t.storage_offset()) == (shape, stride, offset)
            assert t._gp_key == (shape, stride, offset, torch.float32)
        outs = meta.Outputs((meta.OutMeta(shape, stride, offset, torch.float32), None), None)
        strides, off = outs.wrapper[0]  # type: ignore[misc]
        assert outs.wrapper[1] is None
        t = torch.Tensor._make_wrapper_subclass(RemoteTensor, shape, strides, off, None, torch.float32)
        assert (tuple(t.shape), t.stride(), t.storage_offset()) == (shape, stride, offset)
    # through the remote path's own wrappers: a transposed view and a sliced one come out as the meta kernel says
    x = torch.empty(3, 4, device="meta")
    for view in (x.t(), x[1:], x[:, 1:]):
        out = meta.infer(meta.schema_of(torch.ops.aten.alias.default), (view,), {})
        (m,) = out.metas
        assert m is not None
        assert (m.shape, m.stride, m.offset) == (tuple(view.shape), view.stride(), view.storage_offset())


class _Sink:
    """A session that takes the op records the shim sends and keeps them (the sends are not what these tests check)."""

    quota_bytes = 0
    handle_base = 1 << 40

    def __init__(self) -> None:
        self._handles = itertools.count(1)
        self.records: list[bytes] = []

    def new_handle(self) -> int:
        return self.handle_base + next(self._handles)

    def eager_op(self, record: bytes) -> None:
        self.records.append(record)

    def flush(self) -> None:
        pass

    def free(self, handles: Any) -> None:
        pass

    def close(self) -> None:
        pass


def test_caches_stay_bounded_under_changing_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long run whose shapes keep changing (an NLP loop's per-batch sequence lengths) must not grow the meta cache
    or the wrapper-argument cache without end; the ops a loop keeps using stay cached across the caches' turns, and
    every op still gets the right outputs."""
    limit = 32
    # start empty: earlier tests of the same process (the in-process shim tests) leave thousands of entries, which
    # the smaller limit would only drop at the caches' next turns
    meta.CACHE.clear()
    tensor._WRAPPER_ARGS.clear()
    monkeypatch.setattr(meta.CACHE, "limit", limit)
    monkeypatch.setattr(tensor, "_WRAPPER_ARGS_MAX", limit)
    sink = _Sink()
    rt = DeviceRuntime(97, sink)  # not attached (no registry entry): its tensors' ops find it themselves
    try:
        w = wrap(rt, rt.new_handle(), (4, 4), (4, 1), 0, torch.float32)  # the fixed-shape weight of every step
        misses = meta.CACHE.misses
        for n in range(1, 400):  # 399 sequence lengths, each a new key for every op below but the last
            x = wrap(rt, rt.new_handle(), (n, 4), (4, 1), 0, torch.float32)
            y = torch.relu(x @ w)
            z = torch.cat([x, y.t().t()], 1)  # several new keys per step
            assert (tuple(z.shape), z.stride()) == ((n, 8), (8, 1))
            assert len(meta.CACHE) <= 2 * limit and len(tensor._WRAPPER_ARGS) <= limit
            u = w * 2.0  # a key used on every step: it must never be inferred again
            if n == 1:
                misses_per_step = meta.CACHE.misses - misses
            assert tuple(u.shape) == (4, 4)
        new_keys_per_step = misses_per_step - 1  # all of the first step's keys but w * 2.0's
        assert meta.CACHE.misses - misses == misses_per_step + 398 * new_keys_per_step
        assert len(sink.records) >= 399 * 4  # mm, relu, cat (its view travels in its list: no record), mul
    finally:
        rt.close()


def test_list_and_no_outputs_come_back_without_pytree() -> None:
    """An op returning a list of tensors (the foreach ops) is rebuilt without pytree: a list, each tensor with the
    shape, strides and dtype the meta kernel gives, each with a handle of its own."""
    sink = _Sink()
    rt = DeviceRuntime(96, sink)
    try:
        xs = [wrap(rt, rt.new_handle(), s, torch.empty(s).stride(), 0, torch.float32) for s in ((3, 4), (5,), ())]
        sch = meta.schema_of(aten._foreach_sqrt.default)
        assert meta.CACHE.outputs(sch, (xs,), {}).flat_list
        out = RemoteTensor.__torch_dispatch__(aten._foreach_sqrt.default, (), (xs,), None)  # what torch gets back
        assert type(out) is list and len(out) == 3
        assert [tuple(y.shape) for y in torch._foreach_sqrt(xs)] == [(3, 4), (5,), ()]  # and hands the caller
        for x, y in zip(xs, out, strict=True):
            assert type(y) is RemoteTensor and y._gp_rt is rt and y._gp_h not in {t._gp_h for t in xs}
            assert (y.shape, y.stride(), y.dtype) == (x.shape, x.stride(), x.dtype)
        assert len({y._gp_h for y in out}) == 3
        assert not meta.CACHE.outputs(meta.schema_of(aten.max.dim), (xs[0], 0), {}).flat_list  # a tuple: flat_tuple
        # an in-place foreach op returns nothing (one None, no pytree either), and sends its op all the same
        sent = len(sink.records)
        assert meta.CACHE.outputs(meta.schema_of(aten._foreach_add_.Scalar), (xs, 1.0), {}).spec is None
        assert RemoteTensor.__torch_dispatch__(aten._foreach_add_.Scalar, (), (xs, 1.0), None) is None
        torch._foreach_add_(xs, 2.0)
        assert len(sink.records) == sent + 2
    finally:
        rt.close()
