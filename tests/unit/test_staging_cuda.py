"""server/staging.py: a session's input bytes onto a CUDA device through its pinned buffers, queued without waiting.

The `cuda` tests need a CUDA device (bench/real_gpu.sh's `tests` stage runs them); here only what a CPU-only host
decides runs: no staging where there is no CUDA device or the device is a fake one."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.server import graph_cuda, slices, staging
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession
from test_graph_cuda import _run, _slots
from test_server_graph import _no_reply, op, slot

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
KiB, MiB = 1024, 1024 * 1024


def test_no_staging_without_a_cuda_device() -> None:
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    assert s.staging is None  # a fake GPU's tensors are host memory: nothing to stage
    assert staging.for_device(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        assert staging.for_device(torch.device("cuda", 0)) is None


def _session() -> tuple[CommandExecutor, WorkerSession]:
    from gpupool.server.devices import CudaDevice

    dev = CudaDevice(0)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 30)
    ex = CommandExecutor(slices.SliceLedger())
    ex.exclusive_rng = True
    return ex, s


@cuda
def test_staged_copies_are_exact_and_reuse_two_bounded_buffers() -> None:
    st = staging.Staging(torch.device("cuda"))
    gen = torch.Generator().manual_seed(5)
    outs = []
    for n in [1, 3, 64 * KiB - 1, 64 * KiB, 512 * KiB, 4 * MiB, 7, 1 * MiB + 13]:
        src = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        dst = torch.empty(n + 16, dtype=torch.uint8, device="cuda")
        dst.fill_(0xAB)
        assert st.copy(dst[8 : 8 + n], wire.host_bytes(src))  # a byte range of a tensor, the rest untouched
        outs.append((src, dst, n))
    torch.cuda.synchronize()
    for src, dst, n in outs:
        got = dst.cpu()
        assert torch.equal(got[8 : 8 + n], src) and bool((got[:8] == 0xAB).all()) and bool((got[8 + n :] == 0xAB).all())
    assert st.copies == len(outs) and st.held <= staging.BUFFERS * staging.MAX_BYTES
    assert not st.copy(torch.empty(4 * MiB + 1, dtype=torch.uint8, device="cuda"), bytes(4 * MiB + 1))  # too big
    st.close()
    assert st.held == 0


@cuda
def test_a_buffer_is_not_rewritten_while_the_device_is_still_to_read_it() -> None:
    """The device kept busy (a sleep kernel queued first): every staged copy still lands with its own bytes, though
    the host writes the next bytes into the two buffers long before the device runs the copies."""
    st = staging.Staging(torch.device("cuda"))
    torch.cuda._sleep(200_000_000)  # ~0.1 s of the device's time before the copies
    dsts = []
    for k in range(6):
        dst = torch.empty(256 * KiB, dtype=torch.uint8, device="cuda")
        assert st.copy(dst, bytes([k + 1]) * (256 * KiB))
        dsts.append(dst)
    torch.cuda.synchronize()
    for k, dst in enumerate(dsts):
        assert bool((dst == k + 1).all()), k


@cuda
def test_an_upload_on_a_cuda_device_is_staged_and_exact() -> None:
    ex, s = _session()
    x = torch.randn(128 * KiB, generator=torch.Generator().manual_seed(2))
    h = s.handle_base + 1
    meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(x.dtype), shape=list(x.shape))
    up = device_pb2.Upload(handle=h, meta=meta, data=wire.tensor_to_bytes(x), last=True)
    ex.execute(s, device_pb2.Command(upload=up), _no_reply)
    assert s.error is None, s.error
    assert s.staging is not None and s.staging.copies == 1
    assert torch.equal(s.tensors[h].cpu(), x)


@cuda
def test_a_captured_steps_input_sent_by_value_goes_straight_into_the_capture() -> None:
    """Replays of a CUDA graph with a new input each: each lands in the capture's own input from the pinned buffer
    (no device tensor of its own), and the outputs are those of the eager step."""
    ex, s = _session()
    x0 = torch.zeros(64, 128)
    msg = device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(x0)],
                                 ops=[op("aten::mul.Scalar", slot(1), tensor_pb2.Arg(f=2.0), out=(2,))],
                                 outputs=[2])  # fmt: skip
    ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
    assert s.error is None, s.error
    g = ex.graphs._of(s)[1]
    out = s.handle_base + 100
    gen = torch.Generator().manual_seed(9)
    for k in range(6):  # two eager runs, the capture, then replays
        x = torch.randn(64, 128, generator=gen)
        before = s.staging.copies if s.staging is not None else 0
        [y] = _run(ex, s, [x], [out])
        assert torch.equal(y, x * 2), k
        if k >= 3:
            assert g.cuda is not None and s.staging is not None and s.staging.copies == before + 1
    # a replay that cannot run (a persistent tensor moved: none here, so forced) replays eagerly with the input
    # moved to the device first
    slots: list[Any] = _slots(g, s, [torch.ones(64, 128)])
    graph_cuda.on_device(s, g, slots)
    assert slots[1].device.type == "cuda" and torch.equal(slots[1].cpu(), torch.ones(64, 128))


@cuda
def test_a_big_batch_sent_by_value_is_read_from_the_slice_and_staged_once_and_its_guard_reads_it() -> None:
    """A captured step's indices sent by value, big enough to be taken out of the frame (server/bulk.py): read from
    the slice's payload -- a buffer reused slice after slice, as the worker's shared one -- with no CPU tensor of
    their own (graph._by_value), staged once into the pinned buffer, and read there by the embedding backward's
    index guard before each replay: in-range indices give the eager result, an out-of-range one is refused."""
    from test_graph_cuda import VOCAB, _backward, _define

    ex, s = _session()
    w = s.handle_base + 1
    table = torch.randn(VOCAB, 3)
    s.bind(w, table.cuda())
    body = [op("aten::embedding", slot(2), slot(1), out=(3,)), _backward(1)]
    g = _define(ex, s, body, [torch.zeros(128, 64, dtype=torch.long)], [w], [4])
    shared = memoryview(bytearray(1 << 20))
    gen = torch.Generator().manual_seed(3)
    for k in range(7):  # two eager runs, the capture, replays; the last one with an index out of range
        idx = torch.randint(0, VOCAB, (128, 64), generator=gen)
        if k == 6:
            idx[5, 7] = VOCAB
        out = s.handle_base + 100 + k
        run = device_pb2.RunGraph(graph_id=1, inputs=[0], outputs=[out], input_data=[wire.tensor_to_bytes(idx)])
        raw = device_pb2.ClientFrame(commands=[device_pb2.Command(run_graph=run)]).SerializeToString()
        assert len(raw) > 64 * KiB
        shared[: len(raw)] = raw
        req = slices.SliceRequest(device_free=1 << 30, reply_room=1 << 20, budget=10.0, payload=shared[: len(raw)])
        before = s.staging.copies if s.staging is not None else 0
        slices.run_commands(s, ex.execute, ex.ledger, req, s.device.timed)
        shared[: len(raw)] = bytes(len(raw))  # the next slice's bytes: nothing of the run may still read these
        if k == 6:
            assert s.error is not None and "indices must lie" in s.error.message
            break
        assert s.error is None, s.error
        assert s.staging is not None and s.staging.copies == before + 1, k  # one staged copy of the batch
        expect = torch.bincount(idx.flatten(), minlength=VOCAB)[:, None].float() * table
        assert torch.allclose(s.tensors[out].cpu(), expect, rtol=1e-5, atol=1e-5), k
    assert g.cuda is not None
