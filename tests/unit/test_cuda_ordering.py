"""CUDA-only paths of rounds 32-35 that no `cuda` test ran yet, each against what the device actually orders (round 36,
gpu36's reading of them against torch 2.11/2.13's sources):

- a session's pinned staging buffers given back (its end) while a copy from one is still queued: torch's caching host
  allocator must not hand that block out again before the copy ran (the non-blocking copy's `recordEvent`, Copy.cu);
- an upload staged in a slice that returns before the GPU ran it (the slice timer's run-ahead, devices.SliceTimer):
  a read of the tensor in the next slice sees every byte;
- a CUDA graph's capture and replays in slices that run ahead (the timer's events pending on the stream while
  torch.cuda.graph synchronizes and captures on its own stream), inputs staged into the capture's own;
- a view bound to a handle over a bigger CUDA storage: the rest zeroed on the device (sessions.`_zero_outside`).

No GPU was lent when these were written: every one of them skips here and has never run (bench/real_gpu.sh's `tests`
stage runs them)."""

from __future__ import annotations

import pytest
import torch
from gpupool.server import slices, staging
from gpupool.server.devices import CudaDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession
from test_graph_cuda import _run
from test_server_graph import _no_reply, op, slot

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
KiB = 1024
SLEEP = 200_000_000  # torch.cuda._sleep cycles: ~0.1 s of the device's time queued ahead of what follows


def _session() -> tuple[CommandExecutor, WorkerSession]:
    dev = CudaDevice(0)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 30)
    ex = CommandExecutor(slices.SliceLedger())
    ex.exclusive_rng = True
    return ex, s


def _upload(ex: CommandExecutor, s: WorkerSession, h: int, x: torch.Tensor) -> None:
    meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(x.dtype), shape=list(x.shape))
    up = device_pb2.Upload(handle=h, meta=meta, data=wire.tensor_to_bytes(x), last=True)
    ex.execute(s, device_pb2.Command(upload=up), _no_reply)
    assert s.error is None, s.error


@cuda
def test_buffers_given_back_with_a_copy_queued_are_not_handed_out_before_it_ran() -> None:
    """The session's end (`close`) with its copy still queued behind ~0.1 s of the device's work, then another
    staging's buffers of the same size, written at once: if the caching host allocator gave the first block out
    again, the queued copy would read the second staging's bytes."""
    first = staging.Staging(torch.device("cuda"))
    torch.cuda._sleep(SLEEP)
    dst = torch.empty(256 * KiB, dtype=torch.uint8, device="cuda")
    assert first.copy(dst, b"\x01" * (256 * KiB))
    first.close()
    second = staging.Staging(torch.device("cuda"))
    others = []
    for k in range(4):
        other = torch.empty(256 * KiB, dtype=torch.uint8, device="cuda")
        assert second.copy(other, bytes([k + 2]) * (256 * KiB))
        others.append(other)
    torch.cuda.synchronize()
    assert bool((dst == 1).all())
    for k, other in enumerate(others):
        assert bool((other == k + 2).all()), k
    second.close()


@cuda
def test_an_upload_staged_in_a_slice_that_runs_ahead_is_whole_in_the_next_slice() -> None:
    ex, s = _session()
    timer = s.device.slice_timer()
    x = torch.randn(64 * KiB, generator=torch.Generator().manual_seed(4))
    h = s.handle_base + 1
    with timer():
        torch.cuda._sleep(SLEEP)
        _upload(ex, s, h, x)
    assert timer.busy  # the slice returned with the upload's copy still queued
    assert s.staging is not None and s.staging.copies == 1
    with timer():  # a Get's copy to the host: torch's pageable copy, on the same stream, after the upload's
        got = s.tensors[h].cpu()
    assert torch.equal(got, x)
    with timer():
        timer.settle()
    assert not timer.busy and timer.reported > 0.0


@cuda
def test_a_capture_and_its_replays_in_slices_that_run_ahead() -> None:
    """A graph's two eager runs, its capture and replays, each in a slice of the session's timer that does not wait
    for the GPU (a queued sleep keeps slices pending): the outputs are the step's, every slice is booked once."""
    ex, s = _session()
    timer = s.device.slice_timer()
    x0 = torch.zeros(32, 64)
    msg = device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(x0)],
                                 ops=[op("aten::mul.Scalar", slot(1), tensor_pb2.Arg(f=3.0), out=(2,))],
                                 outputs=[2])  # fmt: skip
    ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
    assert s.error is None, s.error
    g = ex.graphs._of(s)[1]
    out = s.handle_base + 100
    gen = torch.Generator().manual_seed(6)
    reported = 0.0
    for k in range(6):
        x = torch.randn(32, 64, generator=gen)
        with timer() as seconds:
            torch.cuda._sleep(SLEEP // 10)
            run = device_pb2.RunGraph(graph_id=1, inputs=[0], outputs=[out])
            run.input_data.append(x.numpy().tobytes())
            ex.execute(s, device_pb2.Command(run_graph=run), _no_reply)
            assert s.error is None, s.error
        reported += seconds[0]
        assert torch.equal(s.tensors[out].cpu(), x * 3), k
    assert g.cuda is not None  # captured as a CUDA graph, replayed from the pinned buffer
    [y] = _run(ex, s, [torch.ones(32, 64)], [out])
    assert torch.equal(y, torch.full((32, 64), 3.0))
    with timer() as seconds:
        timer.settle()
    reported += seconds[0]
    assert not timer.busy and reported == pytest.approx(timer.reported) and reported > 0.0


@cuda
def test_a_view_bound_over_a_bigger_cuda_storage_has_the_rest_zeroed() -> None:
    _, s = _session()
    whole = torch.full((1024,), 7.0, device="cuda")
    view = whole[8:12]
    s.bind(s.handle_base + 1, view)
    got = whole.cpu()
    assert bool((got[8:12] == 7.0).all())
    assert bool((got[:8] == 0).all()) and bool((got[12:] == 0).all())
