"""The shim's registration with torch and its local policies, no daemon needed: the device type, the
backend module torch.manual_seed reaches, the foreach default of optimizers, the error mapping."""

from __future__ import annotations

import os
import pickle
import shutil

import grpc
import pytest
import torch
import torch.optim.optimizer as optimizer
import torch.utils._foreach_utils as foreach_utils
import torch.utils.backend_registration as registration
from gpupool.client.torch import api, native, runtime
from gpupool.client.torch.errors import DeviceLost, OutOfMemoryError, RemoteError, translate
from gpupool.client.torch.runtime import DeviceRuntime
from gpupool.client.torch.tensor import wrap

import gpupool.torch as gt
from gpupool import errors


class _Seeds:
    """A session stand-in that only records seeds (the seed path is all this test drives)."""

    quota_bytes = 0

    def __init__(self) -> None:
        self.seeds: list[int] = []
        self.closed = False

    def seed(self, seed: int) -> None:
        self.seeds.append(seed)

    def close(self) -> None:
        self.closed = True


def test_device_type_is_registered() -> None:
    assert torch._C._get_privateuse1_backend_name() == "gpupool"
    d = torch.device("gpupool:1")
    assert d.type == "gpupool" and d.index == 1
    assert torch.gpupool.is_available() and torch.gpupool.device_count() >= 1  # type: ignore[attr-defined]
    import gpupool.client.torch.backend as backend

    backend.register()  # idempotent
    assert torch._C._get_privateuse1_backend_name() == "gpupool"


def test_native_device_guard_answers_for_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's C++ asks the device guard for the device and stream: the native guard answers, not torch's Python one
    (whose every answer would ask its Python object for `type_`). tests/integration/test_native_guard.py compares the
    two guards in a training run."""
    if not native.enabled():
        pytest.skip("GPUPOOL_NATIVE=0")
    if shutil.which((os.environ.get("CXX") or "c++").split()[0]) is None:
        pytest.skip("no C++ compiler: the native guard cannot be built (scripts/setup.sh installs g++)")
    assert native.active()
    calls: list[int] = []
    python_type = registration._DummyDeviceGuard.type_
    monkeypatch.setattr(registration._DummyDeviceGuard, "type_", lambda self: calls.append(1) or python_type(self))
    assert torch.accelerator.current_device_index() == 0  # the guard's getDevice
    stream = torch.accelerator.current_stream()  # its getStream
    assert (stream.device, stream.stream_id) == (torch.device("gpupool:0"), 0)
    with torch.accelerator.device_index(1):  # exchangeDevice: gpupool's own current device, per thread
        assert torch.accelerator.current_device_index() == 1 == api.current_index()
        stream = torch.accelerator.current_stream()
        assert (stream.device, stream.stream_id) == (torch.device("gpupool:1"), 0)
    assert torch.accelerator.current_device_index() == 0 == api.current_index()
    assert calls == []


def test_current_index_is_one_c_call_into_the_native_guard() -> None:
    """api.current_index (a captured step with CPU arguments asks it every replay) reads the native guard's
    per-thread device through native_ops.cpp's `current_device`, not ctypes (~11k instructions a call): the same
    variable torch's guards set, per thread."""
    import threading

    from gpupool.client.torch import native_ops

    if not native.active() or native_ops.load() is None:
        pytest.skip("the native guard or the native op path is not built here")
    assert native.current_device is native_ops.load().current_device
    seen: list[int] = []

    def other() -> None:
        seen.append(api.current_index())
        with torch.accelerator.device_index(1):
            seen.append(api.current_index())
        seen.append(api.current_index())

    with torch.accelerator.device_index(1):
        assert api.current_index() == 1
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen == [0, 1, 0] and api.current_index() == 0


def test_a_captured_step_s_cpu_arguments_are_their_bytes_either_way() -> None:
    """A replay sends small CPU arguments by value (client/torch/capture.py `_host_bytes`): native_ops.cpp's
    `bytes_at` gives the bytes numpy gives, for a transposed tensor, one that requires grad, a bool one and an
    empty one, as the Python path (wire.host_bytes) does."""
    import importlib

    from gpupool.client.torch import native_ops

    ops = native_ops.load()
    if ops is None:
        pytest.skip("the native op path is not built here")
    host_bytes = importlib.import_module("gpupool.client.torch.capture")._host_bytes  # (the package's `capture` is
    # the function)
    for x in (torch.arange(12, dtype=torch.float32).reshape(3, 4).t(), torch.ones(5, requires_grad=True),
              torch.tensor([True, False, True]), torch.ones(0, 3, dtype=torch.int64)):  # fmt: skip
        want = x.detach().contiguous().numpy().tobytes()
        assert host_bytes(x, ops) == want == host_bytes(x, None), x


def test_manual_seed_reaches_attached_and_later_sessions() -> None:
    first = _Seeds()
    rt = DeviceRuntime(runtime.next_free_index(), first)
    runtime.add(rt)
    try:
        torch.manual_seed(1234)
        assert first.seeds[-1:] == [1234]  # (it got the process's earlier seed, if any, on attach)
        later = _Seeds()
        rt2 = DeviceRuntime(runtime.next_free_index(), later)
        runtime.add(rt2)  # attached after the seed: gets it on attach
        assert later.seeds == [1234]
    finally:
        gt.detach_all()
    assert first.closed and later.closed
    assert gt.device_count() == 0


def test_optimizers_default_to_foreach_on_gpupool() -> None:
    rt = DeviceRuntime(98, _Seeds())
    params = [wrap(rt, 0, (3,), (1,), 0, torch.float32) for _ in range(2)]  # handle 0: nothing to free
    fused, foreach = optimizer._default_to_fused_or_foreach(params, differentiable=False)
    assert (fused, foreach) == (False, True)
    assert foreach_utils._has_foreach_support(params, torch.device("gpupool:98"))
    # Plain CPU tensors keep torch's own choice.
    assert optimizer._default_to_fused_or_foreach([torch.zeros(3)], False) == (False, False)


def test_error_translation() -> None:
    quota = errors.ResourceExhausted(
        "memory quota exceeded: 1 bytes requested, 4096 used of a 8192 byte limit",
        op="aten::empty.memory_format",
        used_bytes=4096,
        limit_bytes=8192,
    )
    oom = translate(quota)
    assert isinstance(oom, torch.OutOfMemoryError) and isinstance(oom, errors.ResourceExhausted)
    assert isinstance(oom, OutOfMemoryError)
    assert (oom.used_bytes, oom.limit_bytes) == (4096, 8192)
    # The numbers come from the error's fields, never from its English text.
    worded = translate(errors.ResourceExhausted("memory quota exceeded: 4096 used of a 8192 byte limit"))
    assert isinstance(worded, OutOfMemoryError) and (worded.used_bytes, worded.limit_bytes) == (None, None)
    assert str(oom).startswith("aten::empty.memory_format: ")
    bad = translate(errors.InvalidArgument("index 5 is out of bounds", op="aten::index.Tensor"))
    assert isinstance(bad, RuntimeError)
    assert isinstance(bad, RemoteError)
    assert bad.op == "aten::index.Tensor" and bad.code is grpc.StatusCode.INVALID_ARGUMENT
    assert str(bad) == "aten::index.Tensor: index 5 is out of bounds"
    lost = translate(errors.Unavailable("daemon gone"))
    assert isinstance(lost, DeviceLost) and lost.code is grpc.StatusCode.UNAVAILABLE
    other = ValueError("x")
    assert translate(other) is other


def test_daemon_errors_are_also_the_errors_class_of_their_status() -> None:
    """Since round 39 `except gpupool.errors.InvalidArgument` catches a daemon's INVALID_ARGUMENT as it catches the
    clients' own refusals (until then a RemoteError whose `.code` said so, which it missed); `except RemoteError`
    still catches every daemon error, the name stays `RemoteError`/`DeviceLost`, and a pickled one comes back alike."""
    for cls in (errors.InvalidArgument, errors.NotFound, errors.PermissionDenied, errors.Internal):
        got = translate(cls("no", op="aten::x"))
        assert isinstance(got, RemoteError) and isinstance(got, cls) and isinstance(got, RuntimeError), cls
        assert type(got).__name__ == "RemoteError" and got.code is cls.code and str(got) == "aten::x: no"
        back = pickle.loads(pickle.dumps(got))
        assert type(back) is type(got) and (back.op, back.code, str(back)) == (got.op, got.code, str(got))
    for cls in (errors.Unavailable, errors.FailedPrecondition):
        lost = translate(cls("gone"))
        assert isinstance(lost, DeviceLost) and isinstance(lost, cls) and type(lost).__name__ == "DeviceLost"
    made = RemoteError("by hand", code=grpc.StatusCode.NOT_FOUND)  # any construction picks its status's class
    assert isinstance(made, errors.NotFound) and not isinstance(made, errors.InvalidArgument)
    plain = RemoteError("odd", code=grpc.StatusCode.DATA_LOSS)  # a status without a class of its own
    assert type(plain) is RemoteError and plain.code is grpc.StatusCode.DATA_LOSS


def test_detached_device_refuses_work() -> None:
    rt = DeviceRuntime(97, _Seeds())
    t = wrap(rt, 0, (2,), (1,), 0, torch.float32)
    rt.close()
    with pytest.raises(DeviceLost, match="detached"):
        rt.sync()
    assert "detached" in repr(t)
