"""The native runner's `filled` (native_runner.cpp, `CommandExecutor._upload`'s one-chunk path): a new CPU tensor
holding exactly the given bytes, the same tensor torch's `empty` makes (dtype, sizes, contiguous strides, dispatch
keys, its own storage), and anything else refused before a tensor exists: a length that is not the tensor's bytes
(shorter would leave memory unwritten, longer would drop bytes), negative or overflowing sizes, too many dimensions,
a shape that is not a list, a dtype that is not a torch.dtype. Through the executor: a session bound with the
same handles, bytes and accounting as the chunked path binds."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import torch
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession
from test_server_native_free import mod as runner_module

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2

mod = runner_module  # the fixture: the runner's module, or a skip where it cannot be built
NUMBER = 3
BASE = NUMBER << 32


@pytest.mark.parametrize("dtype", list(wire.TORCH_DTYPES.values()))
@pytest.mark.parametrize("shape", [[], [0], [4, 0], [5], [2, 3, 4]])
def test_filled_is_torch_empty_with_the_bytes_written(mod: Any, dtype: torch.dtype, shape: list[int]) -> None:
    n = torch.Size(shape).numel() * dtype.itemsize
    data = bytes((i * 37 + 11) % 256 for i in range(n))
    t = mod.filled(shape, dtype, data)
    ref = torch.empty(shape, dtype=dtype)
    assert (t.dtype, t.shape, t.stride(), t.storage_offset()) == (ref.dtype, ref.shape, ref.stride(), 0)
    assert torch._C._dispatch_keys(t) == torch._C._dispatch_keys(ref) and not t.requires_grad
    assert t.untyped_storage().nbytes() == n and wire.tensor_to_bytes(t) == data
    again = mod.filled(shape, dtype, memoryview(data))  # a storage of its own each time
    assert wire.tensor_to_bytes(again) == data and (n == 0 or again.data_ptr() != t.data_ptr())


@pytest.mark.parametrize(
    ("shape", "dtype", "data", "error"),
    [
        ([4], torch.float32, b"x" * 15, ValueError),  # one byte short: a byte left unwritten
        ([4], torch.float32, b"x" * 17, ValueError),  # one byte long
        ([0], torch.float32, b"x", ValueError),
        ([-1], torch.uint8, b"", ValueError),
        ([-2, -3], torch.uint8, b"x" * 6, ValueError),  # negative sizes whose product matches
        ([1 << 62, 1 << 62], torch.uint8, b"", ValueError),  # the element count overflows
        ([1 << 62], torch.float64, b"", ValueError),  # the byte count overflows
        ([1] * 65, torch.uint8, b"x", ValueError),  # more dimensions than a tensor may have here
        ((4,), torch.uint8, b"x" * 4, ValueError),  # not a list
        ([4.0], torch.uint8, b"x" * 4, ValueError),
        ([4], "float32", b"x" * 16, ValueError),
        ([4], torch.uint8, "xxxx", TypeError),  # no buffer
    ],
)
def test_filled_refuses_what_does_not_fit(mod: Any, shape: Any, dtype: Any, data: Any, error: type) -> None:
    with pytest.raises(error):
        mod.filled(shape, dtype, data)


def _session() -> WorkerSession:
    dev = FakeDevice(0, "h", 1 << 30)
    return WorkerSession("u", NUMBER, dev, DeviceMemory(dev), 1 << 20)


def _upload(h: int, t: torch.Tensor, offset: int = 0, last: bool = True, data: bytes | None = None) -> Any:
    meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(t.dtype), shape=list(t.shape))
    body = wire.tensor_to_bytes(t) if data is None else data
    up = device_pb2.Upload(handle=h, offset=offset, data=body, last=last)
    if offset == 0:
        up.meta.CopyFrom(meta)
    return device_pb2.Command(upload=up)


def test_a_one_chunk_upload_binds_what_the_chunked_path_binds(mod: Any) -> None:
    """The same uploads (over a fresh handle, over a live one, over a failed one) on two sessions: one executor with
    the runner, one without; the same tensors, storages counted, bytes used and errors."""
    sessions = []
    for native in (mod, None):
        ex = CommandExecutor(ledger=_Ledger())
        ex.native = native
        s = _session()
        a, b = torch.arange(10.0), torch.arange(6, dtype=torch.int16).view(2, 3)
        ex.execute(s, _upload(BASE + 1, a), _no_reply)
        ex.execute(s, _upload(BASE + 2, b), _no_reply)
        ex.execute(s, _upload(BASE + 1, b), _no_reply)  # over a live handle
        ex.execute(s, _upload(BASE + 3, a, data=b"\0" * 8), _no_reply)  # short: fails, poisoned
        ex.execute(s, _upload(BASE + 3, a), _no_reply)  # over the failed handle
        ex.execute(s, _upload(BASE + 4, torch.ones(1 << 20)), _no_reply)  # past the 1 MiB quota
        sessions.append((s, ex.ledger))
    (s, led), (r, ref) = sessions
    assert s.tensors.keys() == r.tensors.keys() == {BASE + 1, BASE + 2, BASE + 3}
    for h in s.tensors:
        assert wire.tensor_to_bytes(s.tensors[h]) == wire.tensor_to_bytes(r.tensors[h])
        assert s.tensors[h].dtype == r.tensors[h].dtype and s.tensors[h].shape == r.tensors[h].shape
    assert (s.used, s.memory.used, len(s._storages), s.uploads) == (r.used, r.memory.used, len(r._storages), {})
    assert s.used == 40 + 12 + 12 and s.poisoned.keys() == r.poisoned.keys() == {BASE + 4}
    assert led.codes == ref.codes and led.uploaded == ref.uploaded


class _Ledger:
    def __init__(self) -> None:
        self.codes: list[Any] = []
        self.uploaded = 0

    def error(self, s: Any, code: Any) -> None:
        self.codes.append(code)

    def transfer(self, direction: str, n: int) -> None:
        self.uploaded += n

    def op(self, s: Any) -> None:
        pass


def _no_reply(item: Any) -> None:
    raise AssertionError("an upload answered")


@pytest.mark.parametrize(
    ("shape", "dtype", "overflows"),
    [
        ([1 << 62, 1 << 62, 0, 0], torch.complex128, True),  # the count overflows before the zero (uint64 too)
        ([1 << 62, 2, 0], torch.uint8, True),  # only int64's count overflows: base bound it with the runner off only
        ([0, 1 << 62, 1 << 62], torch.float32, True),  # the contiguous strides overflow
        ([1 << 62, 0], torch.float32, False),  # no overflow anywhere: a tensor of no element, bound either way
        ([0, (1 << 63) - 1], torch.int64, False),
    ],
)
def test_a_shape_of_no_element_that_overflows_fails_alike_with_the_runner_on_and_off(
    mod: Any, shape: list[int], dtype: torch.dtype, overflows: bool
) -> None:
    """Found by scripts/fuzz_native.py (runs mode, seed 7): an upload of no element whose sizes overflow int64 on
    the way (a zero among huge sizes) was refused by torch's `empty` with the runner off ("Storage size calculation
    overflowed", "Stride calculation overflowed") and by the runner's `filled` with it on ("a bad size"), and
    [2**62, 2, 0] bound with the runner off but failed with it on. Now `_upload` refuses such a shape itself (the
    same poison either way), and a shape that overflows nothing binds either way."""
    got = []
    for native in (mod, None):
        ex = CommandExecutor(ledger=_Ledger())
        ex.native = native
        s = _session()
        up = device_pb2.Upload(handle=BASE + 1, data=b"", last=True)
        up.meta.dtype, up.meta.shape[:] = wire.dtype_to_proto(dtype), shape
        ex.execute(s, device_pb2.Command(upload=up), _no_reply)
        poison = s.poisoned.get(BASE + 1)
        t = s.tensors.get(BASE + 1)
        got.append((None if poison is None else (poison.code, poison.message), None if t is None else list(t.shape)))
    assert got[0] == got[1], got
    assert (got[0][0] is not None) == overflows and (got[0][1] == shape) != overflows, got
    if overflows:
        assert got[0][0][0] == grpc.StatusCode.INVALID_ARGUMENT and "bad upload shape" in got[0][0][1], got
