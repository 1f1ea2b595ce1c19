"""Serde of tensors, scalars and op arguments: bit-exact round trips and clear refusals."""

from __future__ import annotations

import pytest
import torch

from gpupool import wire
from gpupool._proto import tensor_pb2
from gpupool.errors import InvalidArgument

DEV = torch.device("cpu")


@pytest.mark.parametrize("dtype", list(wire.DTYPES))
def test_tensor_bytes_round_trip(dtype: torch.dtype) -> None:
    t = (torch.randn(3, 5) * 100).to(dtype)
    back = wire.bytes_to_tensor(wire.tensor_to_bytes(t), dtype, t.shape)
    assert back.dtype == dtype and torch.equal(back, t)


def test_non_contiguous_and_empty() -> None:
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(wire.bytes_to_tensor(wire.tensor_to_bytes(t), t.dtype, t.shape), t)
    assert wire.bytes_to_tensor(b"", torch.float32, [0, 4]).shape == (0, 4)
    assert wire.tensor_to_bytes(torch.tensor(2.0)) == torch.tensor([2.0]).numpy().tobytes()


def test_length_mismatch_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="needs 16"):
        wire.bytes_to_tensor(b"\0" * 15, torch.float32, [4])
    with pytest.raises(InvalidArgument, match="negative"):
        wire.bytes_to_tensor(b"", torch.float32, [-1])


@pytest.mark.parametrize("value", [True, 3, -7, 2.5, 1 + 2j])
def test_scalars(value: object) -> None:
    back = wire.scalar_from_proto(wire.scalar_to_proto(value))
    assert back == value and type(back) is type(value)


def _no_tensors(t: torch.Tensor) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(inline=wire.inline_to_proto(t))


@pytest.mark.parametrize(
    "value",
    [None, True, 4, 0.5, 1j, "mean", torch.float16, torch.strided, torch.channels_last, [1, 2], [0.5, 2.0], [True]],
)
def test_args_round_trip(value: object) -> None:
    arg = wire.encode_arg(value, _no_tensors)
    assert wire.decode_arg(arg, lambda h: torch.empty(0), DEV) == value


def test_handles_and_devices() -> None:
    store = {7: torch.ones(2), 9: torch.zeros(1)}

    def encode(t: torch.Tensor) -> tensor_pb2.Arg:
        return tensor_pb2.Arg(tensor=next(h for h, v in store.items() if v is t))

    arg = wire.encode_arg([store[7], None, store[9]], encode)
    assert list(arg.tensors.handles) == [7, 0, 9]
    decoded = wire.decode_arg(arg, store.__getitem__, DEV)
    assert decoded[0] is store[7] and decoded[1] is None
    remote = torch.device("meta")
    cpu_arg = wire.encode_arg(torch.device("cpu"), encode)
    assert wire.decode_arg(cpu_arg, store.__getitem__, remote) == torch.device("cpu")
    gp = tensor_pb2.Arg(device=tensor_pb2.DeviceRef(type="gpupool", index=0))
    assert wire.decode_arg(gp, store.__getitem__, remote) == remote
    with pytest.raises(InvalidArgument, match="not available"):
        wire.decode_arg(tensor_pb2.Arg(device=tensor_pb2.DeviceRef(type="cuda")), store.__getitem__, remote)


def test_inline_limits() -> None:
    big = tensor_pb2.Arg(
        inline=tensor_pb2.InlineTensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[70000], data=b"\0" * 70000)
    )
    with pytest.raises(InvalidArgument, match="upload it"):
        wire.decode_arg(big, lambda h: torch.empty(0), DEV)
    with pytest.raises(InvalidArgument, match="empty argument"):
        wire.decode_arg(tensor_pb2.Arg(), lambda h: torch.empty(0), DEV)
    with pytest.raises(InvalidArgument, match="cannot send"):
        wire.encode_arg(object(), _no_tensors)


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**32, 2**64 - 1])
def test_varint_matches_protobuf(n: int) -> None:
    from gpupool._proto import device_pb2

    encoded = device_pb2.Free(handles=[n]).SerializeToString()  # tag, length, packed varint
    assert encoded[2:] == wire.varint(n)


def test_host_bytes_is_a_view() -> None:
    t = torch.zeros(4, dtype=torch.int32)
    view = wire.host_bytes(t)
    view[0:4] = (7).to_bytes(4, "little")
    assert t.tolist() == [7, 0, 0, 0] and len(view) == 16
    assert len(wire.host_bytes(torch.empty(0))) == 0


def test_host_bytes_leaves_no_garbage_cycles() -> None:
    """Every upload and download takes a view: a ctypes array type per size (what `(c_char * n)` makes, kept only
    weakly by ctypes) is a class with reference cycles that only the cyclic collector frees, and is built again
    after each collection."""
    import gc

    tensors = [torch.arange(n, dtype=torch.uint8) for n in (3, 128, 2048, 4099)]
    gc.collect()
    gc.disable()
    try:
        for t in tensors:
            view = wire.host_bytes(t)
            assert bytes(view) == bytes(t.tolist()) and view.format == "B" and not view.readonly
            del view
        assert gc.collect() == 0
    finally:
        gc.enable()
